"""`llamacli bench` and the fast path it measures: JSON shape and sane values (never wall-clock thresholds),
fused projections equal to the module-by-module forward, and the half-precision compute policy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llamacli.bench import bench_model, kv_bytes_per_step, parse_int_list, run_bench, weight_bytes_per_step
from llamacli.errors import UsageError
from llamacli.kv_cache import KVCache
from llamacli.model import HALF_ROWS_MAX, compute_dtype
from llamacli.weights import load_model

PROMPT = [1, 17, 43, 99, 5, 64, 23, 77, 12, 8, 101, 33]


def test_parse_int_list():
    assert parse_int_list("128, 512", "--prompt-tokens") == [128, 512]
    for bad in ("", "x", "0", "4,-1"):
        with pytest.raises(UsageError):
            parse_int_list(bad, "--batch-size")


def test_bytes_per_step(tiny_dir):
    model = load_model(tiny_dir, dtype="float32", device="cpu")
    cfg = model.config
    untied = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) - cfg.vocab_size * cfg.dim
    assert weight_bytes_per_step(model) == 4 * untied  # the embedding table is not read (lm_head is untied)
    assert kv_bytes_per_step(model, 10, 3, torch.float16) == 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 2 * 30


def test_bench_model_values(tiny_dir):
    model = load_model(tiny_dir, dtype="float32", device="cpu")
    rows = bench_model(model, [4, 8], gen_tokens=3, batch_sizes=[1, 2], repetitions=2)
    assert [(r.batch_size, r.prompt_tokens) for r in rows] == [(1, 4), (1, 8), (2, 4), (2, 8)]
    for r in rows:
        for s in (r.prefill_tokens_per_s, r.decode_tokens_per_s):
            assert 0 < s.min <= s.median <= s.max and s.stdev >= 0
        assert r.decode_bytes_per_step > weight_bytes_per_step(model)
        assert r.decode_gb_per_s > 0 and r.peak_memory_mb > 0 and r.dtype == "float32"


def test_bench_rejects_too_long(tiny_dir):
    model = load_model(tiny_dir, dtype="float32", device="cpu")
    with pytest.raises(UsageError, match="exceeds the model's context"):
        bench_model(model, [60], gen_tokens=10, batch_sizes=[1])


def test_run_bench_report(tiny_dir):
    report = run_bench(tiny_dir, [4], 2, [1], ["float32", "bfloat16"], device="cpu", repetitions=1, threads=1)
    d = report.as_dict()
    assert d["threads"] == 1 and d["memory_bandwidth_gb_per_s"] > 0
    assert [r["dtype"] for r in d["rows"]] == ["float32", "bfloat16"]
    assert d["rows"][1]["decode_bytes_per_step"] < d["rows"][0]["decode_bytes_per_step"]  # half the weight bytes
    assert all(r["bandwidth_pct"] > 0 for r in d["rows"])
    json.dumps(d)


def test_cli_bench_json(tiny_dir):
    from typer.testing import CliRunner

    from llamacli.cli import app

    result = CliRunner().invoke(app, ["bench", "--model", str(tiny_dir), "-p", "4,6", "-g", "2", "-b", "1,2",
                                      "-r", "1", "--device", "cpu", "--threads", "1", "--json"])
    assert result.exit_code == 0, result.output
    d = json.loads(result.stdout)
    assert set(d) >= {"model", "threads", "memory_bandwidth_gb_per_s", "rows"}
    assert len(d["rows"]) == 4
    row = d["rows"][0]
    assert set(row) >= {"dtype", "batch_size", "prompt_tokens", "gen_tokens", "prefill_tokens_per_s",
                        "decode_tokens_per_s", "decode_gb_per_s", "bandwidth_pct", "peak_memory_mb"}
    assert set(row["decode_tokens_per_s"]) == {"median", "stdev", "min", "max"}


def test_cli_bench_table_and_errors(tiny_dir, tmp_path):
    run = [sys.executable, "-c", "from llamacli.cli import main; main()", "bench"]
    ok = subprocess.run(run + ["--model", str(tiny_dir), "-p", "4", "-g", "2", "-r", "1", "--device", "cpu"],
                        capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "decode tok/s" in ok.stdout and "float32" in ok.stdout
    bad = subprocess.run(run + ["--model", str(tiny_dir), "--dtype", "int4"], capture_output=True, text=True)
    assert bad.returncode == 2 and bad.stderr.startswith("error: --dtype") and "Traceback" not in bad.stderr
    missing = subprocess.run(run + ["--model", str(tmp_path / "nothing")], capture_output=True, text=True)
    assert missing.returncode == 1 and missing.stderr.startswith("error: ") and "Traceback" not in missing.stderr


# -- the fast path against the reference path --------------------------------------------------------------


@pytest.mark.parametrize("overrides", [{}, dict(attention_bias=True, mlp_bias=True),
                                       dict(tie_word_embeddings=True), dict(num_key_value_heads=4)],
                         ids=["gqa", "bias", "tied", "mha"])
@pytest.mark.parametrize("pack", [False, True], ids=["views", "onednn"])
def test_fused_equals_unfused(tiny_checkpoint, overrides, pack):
    path = tiny_checkpoint(**overrides)
    fused = load_model(path, dtype="float32", device="cpu", pack=pack)
    plain = load_model(path, dtype="float32", device="cpu", fuse=False)
    assert fused._fused is not None and plain._fused is None
    assert fused._fused.packed == pack  # oneDNN is part of the x86 CPU wheels CI installs
    # HF names and shapes are unchanged; the tied head is still the embedding
    assert {n: p.shape for n, p in fused.named_parameters()} == {n: p.shape for n, p in plain.named_parameters()}
    for (n, a), (_, b) in zip(fused.state_dict().items(), plain.state_dict().items()):
        if pack and a.is_meta:  # packed: the plain layer weights are released, only their shapes remain
            assert "layers." in n or n == "lm_head.weight", n
            continue
        assert torch.equal(a, b), n
    def tied(m):
        return m.lm_head.weight is m.model.embed_tokens.weight

    assert tied(fused) == tied(plain)
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    with torch.no_grad():
        torch.testing.assert_close(fused(ids), plain(ids), atol=1e-5, rtol=0)
        caches = [KVCache(m.config, 2, 20) for m in (fused, plain)]
        outs = [m(ids, 0, c, last_only=True) for m, c in zip((fused, plain), caches)]
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
        step = torch.tensor([[5], [9]])
        pos = torch.tensor([len(PROMPT), len(PROMPT) - 2])  # per-row positions
        outs = [m(step, pos, c) for m, c in zip((fused, plain), caches)]
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


def test_packed_model_refuses_unfuse_and_cast(tiny_dir):
    model = load_model(tiny_dir, dtype="float32", device="cpu")
    assert model._fused.packed
    with pytest.raises(RuntimeError, match="packed for oneDNN"):
        model.unfuse_projections()
    model.to(torch.float64)
    with pytest.raises(RuntimeError, match="load it again to change its dtype or device"):
        model(torch.tensor([PROMPT]))


def test_unfuse_and_refuse_after_cast(tiny_dir):
    model = load_model(tiny_dir, dtype="float32", device="cpu", pack=False)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        fused = model(ids)
        model.unfuse_projections()
        torch.testing.assert_close(model(ids), fused, atol=1e-5, rtol=0)
        model.fuse_projections(pack=False)
        model.to(torch.float64)  # a cast after fusing: the forward fuses the new weights again
        assert model(ids).dtype == torch.float64
        torch.testing.assert_close(model(ids).float(), fused, atol=1e-4, rtol=0)


def test_compute_dtype_policy():
    cpu = torch.device("cpu")
    assert compute_dtype(torch.float32, cpu, 512) == torch.float32
    assert compute_dtype(torch.float16, cpu, 1) == torch.float16
    assert compute_dtype(torch.float16, cpu, HALF_ROWS_MAX) == torch.float16
    assert compute_dtype(torch.float16, cpu, HALF_ROWS_MAX + 1) == torch.float32
    assert compute_dtype(torch.bfloat16, cpu, 1) == torch.bfloat16
    assert compute_dtype(torch.bfloat16, torch.device("cuda"), 512) == torch.bfloat16


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_half_weights_stay_close_to_fp32(tiny_dir, dtype):
    """Half weights, in both compute regimes (few rows in half, many rows upcast), track the fp32 model."""
    ref = load_model(tiny_dir, dtype="float32", device="cpu")
    half = load_model(tiny_dir, dtype=dtype, device="cpu")
    ids = torch.tensor([PROMPT])  # more than HALF_ROWS_MAX rows: the prefill regime
    with torch.no_grad():
        cache_r, cache_h = KVCache(ref.config, 1, 20), KVCache(half.config, 1, 20, dtype=getattr(torch, dtype))
        want = ref(ids, 0, cache_r, last_only=True)
        got = half(ids, 0, cache_h, last_only=True)
        assert got.dtype == getattr(torch, dtype)
        scale = want.abs().max()
        assert (got.float() - want).abs().max() < 0.05 * scale
        for pos, tok in enumerate([3, 7, 11], start=len(PROMPT)):  # one row: the decode regime
            want = ref(torch.tensor([[tok]]), pos, cache_r)
            got = half(torch.tensor([[tok]]), pos, cache_h)
            assert (got.float() - want).abs().max() < 0.05 * want.abs().max()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("rows", [2, 6])  # half compute, and (fp16 past HALF_ROWS_MAX) upcast compute
def test_half_batched_decode_at_per_row_positions_stays_close_to_fp32(tiny_dir, dtype, rows):
    """Several rows at their own positions through a positions-last cache (decode_attention) in half weights
    track the fp32 model row by row."""
    ref = load_model(tiny_dir, dtype="float32", device="cpu")
    half = load_model(tiny_dir, dtype=dtype, device="cpu")
    lengths = [4 + 2 * b for b in range(rows)]
    with torch.no_grad():
        caches = KVCache(ref.config, rows, 24), KVCache(half.config, rows, 24, dtype=getattr(torch, dtype))
        assert caches[1].positions_last
        for model, cache in zip((ref, half), caches):
            for b, n in enumerate(lengths):
                model(torch.tensor([PROMPT[b:b + n]]), 0, cache.rows(b, b + 1))
        start = torch.tensor(lengths)
        for step, tok in enumerate([3, 7, 11]):
            tokens = torch.tensor([[tok + b] for b in range(rows)])
            want = ref(tokens, start + step, caches[0])
            got = half(tokens, start + step, caches[1])
            assert got.dtype == getattr(torch, dtype)
            for b in range(rows):
                assert (got[b].float() - want[b]).abs().max() < 0.05 * want[b].abs().max()


def test_bf16_is_packed_exactly_where_the_cpu_has_native_bf16(tiny_dir):
    from llamacli.model import cpu_has_native_bf16

    model = load_model(tiny_dir, dtype="bfloat16", device="cpu")
    plain = load_model(tiny_dir, dtype="bfloat16", device="cpu", fuse=False)
    assert model._fused.packed == cpu_has_native_bf16()
    assert load_model(tiny_dir, dtype="float16", device="cpu")._fused.packed is False
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).float(), plain(ids).float(), atol=3e-2, rtol=3e-2)


def test_many_upcast_rows_are_packed_on_the_spot_with_the_same_result(monkeypatch):
    """Above HALF_PACK_ROWS_MIN rows, half weights are upcast and oneDNN-packed per call: same product."""
    import llamacli.model as model_module

    torch.manual_seed(0)
    w_t = torch.randn(40, 96).half().t()  # (in, out) view of an (out, in) fp16 weight, as the fast path holds
    bias = torch.randn(40).half()
    x = torch.randn(model_module.HALF_PACK_ROWS_MIN, 96)
    want = torch.addmm(bias.float(), x, w_t.float())
    torch.testing.assert_close(model_module._mm(x, w_t, bias), want, atol=1e-5, rtol=1e-5)
    calls = []
    reorder = torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", lambda *a: calls.append(a[1]) or reorder(*a),
                        raising=False)
    model_module._mm(x, w_t, bias)
    model_module._mm(x[:8], w_t, bias)  # few rows: a plain upcast product, no pack
    # Without oneDNN (some non-x86 builds) nothing is packed; the product above is then the plain one.
    assert calls == ([model_module.HALF_PACK_ROWS_MIN] if model_module._onednn_available(torch.float32) else [])

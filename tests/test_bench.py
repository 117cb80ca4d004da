"""`llamacli bench` and the runtime it measures: JSON shape and sane values (never wall-clock thresholds),
the runtime's weight formats equal to the reference modules, and the half-precision compute policy."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from llamacli.bench import bench_model, kv_bytes_per_step, parse_int_list, run_bench, weight_bytes_per_step
from llamacli.errors import UsageError
from llamacli.kv_cache import KVCache
from llamacli.model import Llama, Runtime
from llamacli.model.cpu import HALF_PACK_ROWS_MIN, HALF_ROWS_MAX, compute_dtype, cpu_has_native_bf16, onednn_available
from llamacli.model.linear import build_linear
from llamacli.request import DEFAULT_DRAFT_TOKENS
from llamacli.weights import load_model

PROMPT = [1, 17, 43, 99, 5, 64, 23, 77, 12, 8, 101, 33]


def test_parse_int_list():
    assert parse_int_list("128, 512", "--prompt-tokens") == [128, 512]
    for bad in ("", "x", "0", "4,-1"):
        with pytest.raises(UsageError):
            parse_int_list(bad, "--batch-size")


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_bytes_per_step(tiny_checkpoint, tied):
    path = tiny_checkpoint(tie_word_embeddings=tied)
    reference = load_model(path, dtype="float32", device="cpu", runtime=False)
    cfg = reference.config
    n = sum(p.numel() for p in {id(p): p for p in reference.parameters()}.values())
    # Untied, the embedding table is not read (a row is looked up); tied, the lm_head reads it: once.
    want = 4 * (n if tied else n - cfg.vocab_size * cfg.dim)
    assert weight_bytes_per_step(reference) == want
    for pack in (True, False):
        assert weight_bytes_per_step(load_model(path, dtype="float32", device="cpu", pack=pack)) == want
    assert weight_bytes_per_step(load_model(path, dtype="bfloat16", device="cpu")) == want // 2
    model = load_model(path, dtype="float32", device="cpu")
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


# -- the runtime against the reference modules -------------------------------------------------------------


def _linears(block) -> dict[str, list]:
    """A reference block's Linear layers by the name of the runtime format that fuses them."""
    a, m = block.self_attn, block.mlp
    return {"self_attn.qkv_proj": [a.q_proj, a.k_proj, a.v_proj], "self_attn.o_proj": [a.o_proj],
            "mlp.gate_up_proj": [m.gate_proj, m.up_proj], "mlp.down_proj": [m.down_proj]}


@pytest.mark.parametrize("overrides", [{}, dict(attention_bias=True, mlp_bias=True),
                                       dict(tie_word_embeddings=True), dict(num_key_value_heads=4)],
                         ids=["gqa", "bias", "tied", "mha"])
@pytest.mark.parametrize("pack", [False, True], ids=["transposed", "onednn"])
def test_runtime_equals_reference(tiny_checkpoint, overrides, pack):
    """Each fused format multiplies as its reference Linear layers side by side, in the format the CPU runs
    fastest, and the runtime's logits equal the reference modules' (full, prefill, per-row decode)."""
    path = tiny_checkpoint(**overrides)
    runtime = load_model(path, dtype="float32", device="cpu", pack=pack)
    plain = load_model(path, dtype="float32", device="cpu", runtime=False)
    assert isinstance(runtime, Runtime) and isinstance(plain, Llama)
    assert (runtime.dtype, runtime.device) == (plain.dtype, plain.device) == (torch.float32, torch.device("cpu"))
    formats = runtime.formats()
    # oneDNN is part of the x86 CPU wheels CI installs
    assert {type(f).__name__ for f in formats.values()} == {"Packed" if pack else "Transposed"}
    torch.manual_seed(0)
    with torch.no_grad():
        for i, block in enumerate(plain.model.layers):
            for name, mods in _linears(block).items():
                f = formats[f"model.layers.{i}.{name}"]
                assert (f.out_features, f.in_features) == (sum(m.out_features for m in mods), mods[0].in_features)
                x = torch.randn(3, f.in_features)
                torch.testing.assert_close(f.mm(x), torch.cat([m(x) for m in mods], -1), atol=1e-5, rtol=0)
        x = torch.randn(2, plain.config.dim)
        torch.testing.assert_close(formats["lm_head"].mm(x), plain.lm_head(x), atol=1e-5, rtol=0)
    assert runtime.weight_bytes_per_step() == plain.weight_bytes_per_step()  # a tied table still counts once
    ids = torch.tensor([PROMPT, PROMPT[::-1]])
    with torch.no_grad():
        torch.testing.assert_close(runtime(ids), plain(ids), atol=1e-5, rtol=0)
        caches = [KVCache(m.config, 2, 20) for m in (runtime, plain)]
        outs = [m(ids, 0, c, last_only=True) for m, c in zip((runtime, plain), caches)]
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)
        step = torch.tensor([[5], [9]])
        pos = torch.tensor([len(PROMPT), len(PROMPT) - 2])  # per-row positions
        outs = [m(step, pos, c) for m, c in zip((runtime, plain), caches)]
        torch.testing.assert_close(outs[0], outs[1], atol=1e-5, rtol=0)


@pytest.mark.parametrize("pack", [False, True], ids=["transposed", "onednn"])
def test_runtime_is_independent_of_the_llama_it_was_built_from(tiny_dir, pack):
    """A runtime owns its weights: casting, moving or replacing the Llama's parameters afterwards changes
    nothing, and the runtime has no cast of its own. Built with `release` (as load_model does), the Llama's
    weights are gone and it cannot be built from again."""
    llama = load_model(tiny_dir, dtype="float32", device="cpu", runtime=False)
    runtime = Runtime.build(llama, pack=pack)
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        before = runtime(ids)
        torch.testing.assert_close(before, llama(ids), atol=1e-5, rtol=0)
        llama.to(torch.float64)  # the reference modules can be cast; the runtime stays as built
        assert llama(ids).dtype == torch.float64
        torch.testing.assert_close(llama(ids).float(), before, atol=1e-4, rtol=0)
        llama.model.layers[0].mlp.down_proj.weight = torch.nn.Parameter(torch.zeros(1), requires_grad=False)
        llama.model.norm.weight = torch.nn.Parameter(torch.zeros(1, dtype=torch.float64), requires_grad=False)
        after = runtime(ids)
    assert after.dtype == torch.float32 and runtime.dtype == torch.float32
    assert torch.equal(after, before)
    assert not hasattr(runtime, "to") and not hasattr(runtime, "float") and not hasattr(runtime, "half")
    llama = load_model(tiny_dir, dtype="float32", device="cpu", runtime=False)
    Runtime.build(llama, pack=pack, release=True)
    assert all(p.is_meta for n, p in llama.named_parameters() if "layers." in n and n.endswith("proj.weight"))
    with pytest.raises(RuntimeError, match="weights were released"):
        Runtime.build(llama)


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
    def kinds(model):
        return {type(f).__name__ for f in model.formats().values()}

    model = load_model(tiny_dir, dtype="bfloat16", device="cpu")
    plain = load_model(tiny_dir, dtype="bfloat16", device="cpu", runtime=False)
    assert kinds(model) == {"Packed" if cpu_has_native_bf16() else "Dense"}
    assert {f.dtype for f in model.formats().values()} == {torch.bfloat16}
    assert kinds(load_model(tiny_dir, dtype="float16", device="cpu")) == {"Dense"}  # fp16: never packed
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).float(), plain(ids).float(), atol=3e-2, rtol=3e-2)


def test_decode_rows_pick_the_layout_one_fp32_row_on_one_thread_unpacked_else_packed(tiny_dir):
    def kinds(model):
        return {type(f).__name__ for f in model.formats().values()}

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert kinds(load_model(tiny_dir, dtype="float32", device="cpu", decode_rows=1)) == {"Packed"}
        torch.set_num_threads(1)
        one, batch = (load_model(tiny_dir, dtype="float32", device="cpu", decode_rows=r) for r in (1, 8))
    finally:
        torch.set_num_threads(threads)
    assert kinds(one) == {"Transposed"} and kinds(batch) == {"Packed"}
    assert kinds(load_model(tiny_dir, dtype="float32", device="cpu")) == {"Packed"}  # no hint: prefill-heavy work
    bf16 = kinds(load_model(tiny_dir, dtype="bfloat16", device="cpu"))
    assert kinds(load_model(tiny_dir, dtype="bfloat16", device="cpu", decode_rows=1)) == bf16  # fp32 only
    ids = torch.tensor([PROMPT])
    with torch.no_grad():
        torch.testing.assert_close(one(ids), batch(ids), atol=1e-4, rtol=0)


@pytest.mark.parametrize("args, rows", [([], 1), (["--prompt-lookup", "2"], 1 + DEFAULT_DRAFT_TOKENS),
                                        (["--prompt-lookup", "2", "--draft-tokens", "2"], 3),
                                        (["--prompts-file", "P", "--batch-size", "3"], 3)])
def test_generate_loads_the_layout_for_the_rows_it_decodes(tiny_chat_dir, tmp_path, monkeypatch, args, rows):
    from typer.testing import CliRunner

    import llamacli.weights
    from llamacli.cli import app

    seen = []
    real = llamacli.weights.load_model

    def spy(*a, **kw):
        seen.append(kw.get("decode_rows"))
        return real(*a, **kw)

    monkeypatch.setattr(llamacli.weights, "load_model", spy)
    (tmp_path / "p.txt").write_text("the cat\nthe dog\n")
    args = [str(tmp_path / "p.txt") if a == "P" else a for a in args]
    result = CliRunner().invoke(app, ["generate", "-m", str(tiny_chat_dir), "--raw", "-n", "2", *args,
                                      *([] if "--prompts-file" in args else ["-p", "the cat"])])
    assert result.exit_code == 0, result.output
    assert seen == [rows]


def test_many_upcast_rows_are_packed_on_the_spot_with_the_same_result(monkeypatch):
    """Where the policy packs upcast half weights (AVX512), from HALF_PACK_ROWS_MIN rows they are upcast and
    oneDNN-packed per call, with the same product; fewer rows, or a CPU where packing does not pay (AVX2:
    `half_pack_rows_min()` None), upcast without packing."""
    import llamacli.model.linear as linear

    torch.manual_seed(0)
    weight, bias = torch.randn(40, 96).half(), torch.randn(40).half()  # (out, in) fp16, as stored on a CPU
    f = build_linear([weight], [bias])
    assert type(f).__name__ == "Dense" and f.dtype == torch.float16
    x = torch.randn(HALF_PACK_ROWS_MIN, 96)
    want = torch.addmm(bias.float(), x, weight.float().t())
    onednn = onednn_available(torch.float32)  # probed (it packs a test weight) before the count starts
    calls = []
    reorder = torch.ops.mkldnn._reorder_linear_weight
    monkeypatch.setattr(torch.ops.mkldnn, "_reorder_linear_weight", lambda *a: calls.append(a[1]) or reorder(*a),
                        raising=False)
    monkeypatch.setattr(linear, "half_pack_rows_min", lambda: None)  # an AVX2 CPU: never packed
    torch.testing.assert_close(f.mm(x), want, atol=1e-5, rtol=1e-5)
    assert calls == []
    monkeypatch.setattr(linear, "half_pack_rows_min", lambda: HALF_PACK_ROWS_MIN)  # an AVX512 CPU
    torch.testing.assert_close(f.mm(x), want, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(f.mm(x[:8]), want[:8], atol=1e-5, rtol=1e-5)  # few rows: a plain upcast product
    # Without oneDNN (some non-x86 builds) nothing is packed; the product above is then the plain one.
    assert calls == ([HALF_PACK_ROWS_MIN] if onednn else [])


def test_upcast_half_weights_are_packed_on_the_spot_on_avx512_cpus_only(monkeypatch):
    """The measured policy: AVX512 kernels gain from packing upcast weights for many rows, AVX2 ones lose."""
    from llamacli.model import cpu

    for capability, want in (("AVX512", HALF_PACK_ROWS_MIN), ("AVX2", None), ("DEFAULT", None)):
        cpu.half_pack_rows_min.cache_clear()
        monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda c=capability: c)
        assert cpu.half_pack_rows_min() == want, capability
    cpu.half_pack_rows_min.cache_clear()

"""int8 / int4 weights: each format's product equals the product by its dequantized matrix; a quantized model
equals the float model of its dequantized weights on every fixture shape; quantize -> save -> load is bit-exact;
bad input gives one-line errors; on SmolLM2, int8 perplexity stays within 0.5% of fp32."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamacli import quantization
from llamacli.errors import UsageError, WeightsError
from llamacli.quant import build_quantized, quantize_matrix
from llamacli.quant.checkpoint import write_quantized
from llamacli.quant.formats import (KERNEL_DTYPE, KERNEL_ROWS_MAX, Int4Groups, int4_kernel_ok, int8_kernel_ok,
                                    unpack_cpu_int4)
from llamacli.quant.quantize import dequantize
from llamacli.weights import load_model

FIXTURES = {
    "gqa": {},
    "mqa": dict(num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True),
    "untied-mha": dict(tie_word_embeddings=False, num_key_value_heads=4),
    "bias": dict(attention_bias=True, mlp_bias=True),
    "head-dim": dict(head_dim=32),
    "padded-vocab": dict(vocab_size=136),
    "bf16": dict(store_dtype="bfloat16"),
}
QUANTS = {"int8": dict(quantize="int8"), "int4-g32": dict(quantize="int4"),
          "int4-g64": dict(quantize="int4", group_size=64)}
PROMPT = [1, 17, 43, 99, 5, 64, 23, 77, 12, 8, 101, 33, 2, 90, 61, 7, 120, 44, 3, 58]


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32), (4, 64), (4, 128)])
@pytest.mark.parametrize("out", [48, 40, 160])  # int4's CPU kernel needs out % 16 == 0: 40 takes the fallback;
# 160 rows are packed as two blocks of 64 and a last one of 32
@pytest.mark.parametrize("rows", [1, 3, KERNEL_ROWS_MAX + 1])  # kernel, kernel, dequantize path
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_format_mm_equals_its_dequantized_matrix(bits, group, out, rows, dtype):
    torch.manual_seed(0)
    w, x = torch.randn(out, 256), torch.randn(rows, 256).to(dtype)
    t = quantize_matrix(w, bits, group)
    bias = torch.randn(out)
    f = build_quantized([t], [bias])
    ref = dequantize(t)
    assert torch.equal(f.dequantize(), ref)  # the packed int4 copy stands for the same matrix
    kernel = f.uses_kernel(x)
    assert kernel == (rows <= KERNEL_ROWS_MAX and (bits == 8 or out % 16 == 0) and cpu_kernels())
    # the kernel multiplies bf16-rounded rows and returns bf16; the fallback multiplies in the input's dtype
    expect = (x.to(KERNEL_DTYPE) if kernel else x).float() @ ref.t() + bias
    tol = 1e-4 if dtype == torch.float32 and not kernel else 2e-2
    torch.testing.assert_close(f.mm(x).float(), expect, rtol=tol, atol=tol * expect.abs().max().item())
    assert f.mm(x).dtype == dtype
    assert (ref - w).abs().max() <= (w.abs().max() / 127 if bits == 8 else (w.max() - w.min()) / 15)
    assert isinstance(f, Int4Groups) == (bits == 4)


def cpu_kernels() -> bool:
    return int8_kernel_ok() and int4_kernel_ok()


def test_the_cpu_int4_packing_is_read_back_exactly_so_the_raw_copy_goes():
    torch.manual_seed(0)
    t = quantize_matrix(torch.randn(64, 64), 4, 32)
    f = build_quantized([t])
    assert torch.equal(f.dequantize(), dequantize(t))
    if not int4_kernel_ok():  # no vectorized kernel: nothing is packed, the raw values stay and are what counts
        assert f.stored.q is not None and not f.uses_kernel(torch.zeros(1, 64))
        assert f.nbytes == 64 * 32 + 2 * 64 * 2 * 2
        return
    for N, K in ((16, 32), (64, 64), (96, 64), (208, 128), (3072, 576)):
        q = torch.randint(0, 16, (N, K), dtype=torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        assert torch.equal(unpack_cpu_int4(packed, N, K).int(), q)
    assert f.stored.q is None and f.nbytes == 64 * 32 + 2 * 64 * 2 * 2


def test_fused_parts_equal_the_quantized_fused_matrix():
    torch.manual_seed(0)
    a, b = torch.randn(32, 64), torch.randn(16, 64)
    for bits in (8, 4):
        fused = build_quantized([quantize_matrix(a, bits, 32), quantize_matrix(b, bits, 32)])
        whole = quantize_matrix(torch.cat([a, b]), bits, 32)
        assert torch.equal(fused.dequantize(), dequantize(whole))


def _dequantized_checkpoint(src: Path, dst: Path, quant: quantization.Quantization) -> Path:
    """A float32 copy of `src` whose matrices are replaced by their quantized-then-dequantized values."""
    from safetensors.torch import load_file, save_file

    dst.mkdir()
    for item in src.iterdir():
        if item.name != "model.safetensors":
            (dst / item.name).write_bytes(item.read_bytes())
    tensors = load_file(src / "model.safetensors")
    out = {}
    for name, t in tensors.items():
        if t.dim() == 2:
            out[name] = dequantize(quantize_matrix(t, quantization.matrix_bits(name, quant), quant.group_size, name))
        else:
            out[name] = t.float()
    save_file(out, str(dst / "model.safetensors"), metadata={"format": "pt"})
    return dst


@pytest.fixture(scope="module", params=sorted(FIXTURES))
def checkpoint(request, tmp_path_factory):
    from tests.conftest import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", **FIXTURES[request.param])


def _steps(model, n: int = 4) -> list[torch.Tensor]:
    """Prefill logits, then the logits of n one-token steps fed with fixed tokens."""
    from llamacli.kv_cache import KVCache

    cache = KVCache(model.config, 1, len(PROMPT) + n)
    out = [model(torch.tensor([PROMPT]), 0, cache)]
    for i in range(n):
        out.append(model(torch.tensor([[PROMPT[i]]]), len(PROMPT) + i, cache))
    return out


@pytest.mark.parametrize("quant", sorted(QUANTS))
def test_quantized_model_equals_the_float_model_of_its_dequantized_weights(checkpoint, quant, tmp_path):
    opts = QUANTS[quant]
    q = quantization.Quantization(8) if opts["quantize"] == "int8" else quantization.Quantization(4, opts.get("group_size", 32))
    reference = load_model(_dequantized_checkpoint(checkpoint, tmp_path / "deq", q), dtype="float32", device="cpu",
                           pack=False)
    model = load_model(checkpoint, dtype="float32", device="cpu", **opts)
    steps = zip(_steps(model), _steps(reference))
    got, want = next(steps)  # a prefill of more than KERNEL_ROWS_MAX rows: dequantize + fp32 BLAS, exact
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    for got, want in steps:  # one-row steps: the CPU kernels round the rows entering each product to bf16
        torch.testing.assert_close(got, want, rtol=3e-2, atol=3e-2 * want.abs().max().item())


@pytest.mark.parametrize("bits, group", [(8, None), (4, 32), (4, 128)])
def test_quantize_save_load_round_trips_bit_exactly(tiny_checkpoint, tmp_path, bits, group, monkeypatch):
    monkeypatch.setattr("llamacli.weights.BLOCK_ROWS", 50)  # quantizing at load reads 128-row tables in 3 blocks
    src = tiny_checkpoint(hidden_size=128, intermediate_size=256, tie_word_embeddings=bits == 4)
    quant = quantization.Quantization(bits, group)
    out = write_quantized(src, tmp_path / "q", quant)
    assert json.loads((out / "config.json").read_text())["quantization_config"]["bits"] == bits
    loaded = load_model(out, dtype="float32", device="cpu")  # no flag: the checkpoint says it
    at_load = load_model(src, dtype="float32", device="cpu", quantize=f"int{bits}", group_size=group)
    for got, want in zip(_steps(loaded), _steps(at_load)):
        assert torch.equal(got, want)
    f = loaded.formats()["model.layers.0.mlp.gate_up_proj"]
    assert (f.bits, f.group_size) == (bits, group)
    from llamacli.inspect import inspect_checkpoint

    info, float_info = inspect_checkpoint(out), inspect_checkpoint(src)
    assert info["parameters"] == float_info["parameters"]
    assert info["quantization"]["bits"] == bits
    assert info["quantization"]["matrix_bytes_per_weight"] < (1.1 if bits == 8 else 0.9)  # int4: the int8 table counts
    assert info["weights_bytes"] < float_info["weights_bytes"] / (3 if bits == 8 else 4)


def _rewrite_quantized(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("change, message", [
    (lambda t: t.pop("model.layers.1.self_attn.k_proj.scales"),
     "missing tensor 'model.layers.1.self_attn.k_proj.scales'"),
    (lambda t: t.__setitem__("model.layers.0.mlp.down_proj.scales", torch.ones(3, 2, dtype=torch.bfloat16)),
     "tensor 'model.layers.0.mlp.down_proj.scales' has shape [3, 2], expected [64, 4]"),
    (lambda t: t.__setitem__("model.layers.0.mlp.up_proj.weight", torch.zeros(128, 32, dtype=torch.int8)),
     "tensor 'model.layers.0.mlp.up_proj.weight' is stored as I8, the quantized layout has U8"),
])
def test_a_broken_quantized_checkpoint_names_the_tensor(tiny_checkpoint, tmp_path, change, message):
    from llamacli.inspect import inspect_checkpoint

    out = write_quantized(tiny_checkpoint(), tmp_path / "q", quantization.Quantization(4, 32))
    _rewrite_quantized(out, change)
    for load in (lambda: load_model(out, device="cpu"), lambda: inspect_checkpoint(out)):
        with pytest.raises(WeightsError, match=message.replace("[", r"\[").replace("]", r"\]")):
            load()


def test_bad_quantize_requests(tiny_checkpoint, tmp_path):
    src = tiny_checkpoint(hidden_size=48, num_attention_heads=4, num_key_value_heads=2)
    with pytest.raises(UsageError, match="tensor 'model.layers.0.self_attn.q_proj.weight' has 48 input columns, "
                                         "which group size 32 does not divide"):
        load_model(src, device="cpu", quantize="int4")
    with pytest.raises(UsageError, match="--group-size 48 is not supported"):
        load_model(src, device="cpu", quantize="int4", group_size=48)
    with pytest.raises(UsageError, match="--group-size applies to --quantize int4 only"):
        load_model(src, device="cpu", quantize="int8", group_size=32)
    q = write_quantized(tiny_checkpoint(), tmp_path / "q", quantization.Quantization(8))
    with pytest.raises(UsageError, match=r"already quantized \(int8 per row\); load it without --quantize"):
        load_model(q, device="cpu", quantize="int4")


def test_an_unknown_quantization_config_is_refused(tiny_checkpoint):
    src = tiny_checkpoint()
    conf = json.loads((src / "config.json").read_text())
    conf["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (src / "config.json").write_text(json.dumps(conf))
    with pytest.raises(WeightsError, match="quant_method 'gptq' is not supported"):
        load_model(src, device="cpu")


def test_cli_quantize_then_generate_and_errors(tiny_chat_dir, tmp_path):
    def run(*args):
        return subprocess.run([sys.executable, "-m", "llamacli", *args], capture_output=True, text=True)

    out = tmp_path / "q4"
    r = run("quantize", str(tiny_chat_dir), str(out), "--bits", "4", "--group-size", "64")
    assert r.returncode == 0, r.stderr
    plain = run("generate", "-m", str(out), "-p", "hello", "-n", "4", "--temperature", "0")
    at_load = run("generate", "-m", str(tiny_chat_dir), "-p", "hello", "-n", "4", "--temperature", "0",
                  "--quantize", "int4", "--group-size", "64")
    assert plain.returncode == at_load.returncode == 0 and plain.stdout == at_load.stdout
    again = run("generate", "-m", str(out), "-p", "hello", "-n", "2", "--quantize", "int8")
    assert again.returncode == 2 and again.stderr.count("\n") == 1 and "already quantized" in again.stderr
    bad = run("quantize", str(tiny_chat_dir), str(tmp_path / "x"), "--bits", "4", "--group-size", "128")
    assert bad.returncode in (1, 2) and bad.stderr.startswith("error: ") and "Traceback" not in bad.stderr
    assert "group size 128 does not divide" in bad.stderr and not (tmp_path / "x").exists()
    shown = run("inspect", "-m", str(out))
    assert shown.returncode == 0 and "int4 groups of 64" in shown.stdout


ENGLISH = Path(__file__).parent / "data" / "english.txt"  # prose written for these tests (public domain)
GREEDY_PROMPTS = ["The capital of France is", "Once upon a time, there was a", "The best way to learn to code is",
                  "Water boils at a temperature of", "The three primary colours are",
                  "In the morning, I like to", "A lighthouse keeper must", "The largest planet in the solar system"]


@pytest.mark.slow
def test_smollm2_int8_perplexity_within_half_a_percent_and_greedy_agrees(smollm2_dir):
    from llamacli.perplexity import compute_perplexity
    from llamacli.prompts import encode_raw
    from llamacli.tokenizer import load_tokenizer
    from tests.test_model import greedy

    tok = load_tokenizer(smollm2_dir)
    ids = encode_raw(tok, ENGLISH.read_text(encoding="utf-8"))
    assert len(ids) > 2000
    ppl, outs = {}, {}
    prompts = [encode_raw(tok, p) for p in GREEDY_PROMPTS]
    for name, opts in {"fp32": {}, "int8": dict(quantize="int8"), "int4-g32": dict(quantize="int4")}.items():
        model = load_model(smollm2_dir, dtype="float32", device="cpu", **opts)
        with torch.inference_mode():
            ppl[name] = compute_perplexity(model, ids, 1024, 512).perplexity
            outs[name] = [greedy(model, p, 16, set()) for p in prompts]
        del model
    same = {name: sum(a == b for a, b in zip(outs[name], outs["fp32"])) for name in outs}
    print(f"\nSmolLM2 perplexity over {len(ids)} tokens: {ppl}; greedy 16 tokens equal to fp32 on {same} "
          f"of {len(prompts)} prompts")
    assert abs(ppl["int8"] / ppl["fp32"] - 1) < 0.005
    assert same["int8"] > len(prompts) // 2
    assert same["int4-g32"] >= 1  # int4 costs more; reported
    assert ppl["int4-g32"] / ppl["fp32"] - 1 < 0.05


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("quant", sorted(QUANTS))
def test_quantized_model_on_cuda_equals_the_cpu_one(tiny_checkpoint, quant):
    """On CUDA the formats dequantize into the activations' dtype and multiply (no int kernel is wired there)."""
    path = tiny_checkpoint()
    cpu = load_model(path, dtype="float32", device="cpu", **QUANTS[quant])
    gpu = load_model(path, dtype="float32", device="cuda", **QUANTS[quant])
    ids = torch.tensor([PROMPT])
    want = cpu(ids)  # more than KERNEL_ROWS_MAX rows: dequantize + fp32 BLAS on the CPU too
    torch.testing.assert_close(gpu(ids.cuda()).cpu(), want, rtol=1e-3, atol=1e-3 * want.abs().max().item())

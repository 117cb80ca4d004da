"""Strict safetensors loading: every error names the tensor or file; dtypes; tied heads; sharding."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from llamacli.errors import UsageError, WeightsError
from llamacli.weights import load_model


def rewrite(folder, fn):
    path = folder / "model.safetensors"
    tensors = load_file(path)
    fn(tensors)
    save_file(tensors, path, metadata={"format": "pt"})


def test_missing_tensor_is_named(tiny_checkpoint):
    d = tiny_checkpoint()
    rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight"))
    with pytest.raises(WeightsError, match="missing tensor 'model.layers.1.mlp.up_proj.weight'"):
        load_model(d, device="cpu")


def test_unexpected_tensor_is_named(tiny_checkpoint):
    d = tiny_checkpoint()
    rewrite(d, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2)))
    with pytest.raises(WeightsError, match="unexpected tensor 'model.layers.0.extra.weight'"):
        load_model(d, device="cpu")


def test_wrong_shape_is_named(tiny_checkpoint):
    d = tiny_checkpoint()
    rewrite(d, lambda t: t.__setitem__("model.norm.weight", torch.ones(63)))
    with pytest.raises(WeightsError, match=r"tensor 'model.norm.weight' has shape \[63\], expected \[64\]"):
        load_model(d, device="cpu")


def test_rotary_inv_freq_is_ignored(tiny_checkpoint):
    d = tiny_checkpoint()
    rewrite(d, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq", torch.ones(8)))
    assert load_model(d, device="cpu").config.n_layers == 2


def test_truncated_file_is_reported(tiny_checkpoint):
    d = tiny_checkpoint()
    path = d / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(WeightsError, match="model.safetensors"):
        load_model(d, device="cpu")


def test_garbage_file_is_reported(tiny_checkpoint):
    d = tiny_checkpoint()
    (d / "model.safetensors").write_bytes(b"\x00" * 100)
    with pytest.raises(WeightsError, match="not a readable safetensors file"):
        load_model(d, device="cpu")


def test_pickle_only_checkpoint_is_refused_with_a_reason(tiny_checkpoint):
    d = tiny_checkpoint()
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(WeightsError, match=r"only pickle weights \(pytorch_model.bin\); pickle files can run code"):
        load_model(d, device="cpu")


def test_missing_shard_is_named(tiny_checkpoint):
    d = tiny_checkpoint(shard=True)
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = sorted(set(index["weight_map"].values()))[-1]
    (d / shard).unlink()
    with pytest.raises(WeightsError, match=f"shard '{shard}'"):
        load_model(d, device="cpu")


def test_absent_lm_head_uses_embeddings(tiny_checkpoint):
    d = tiny_checkpoint(tie_word_embeddings=False)
    rewrite(d, lambda t: t.pop("lm_head.weight"))
    model = load_model(d, device="cpu", runtime=False)
    assert model.lm_head.weight is model.model.embed_tokens.weight
    runtime = load_model(d, device="cpu")  # the runtime's head reads the same table, counted once
    assert runtime.weight_bytes_per_step() == model.weight_bytes_per_step()
    ids = torch.tensor([[1, 5, 9, 3]])
    with torch.no_grad():
        torch.testing.assert_close(runtime(ids), model(ids), atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype, expected", [("float32", torch.float32), ("bfloat16", torch.bfloat16),
                                             ("float16", torch.float16), ("auto", torch.float32)])
def test_requested_dtype(tiny_dir, dtype, expected):
    model = load_model(tiny_dir, dtype=dtype, device="cpu", runtime=False)
    assert {p.dtype for p in model.parameters()} == {expected} and model.dtype == expected
    runtime = load_model(tiny_dir, dtype=dtype, device="cpu")
    assert runtime.dtype == expected and {f.dtype for f in runtime.formats().values()} == {expected}
    assert runtime.device == model.device == torch.device("cpu")


def test_bad_dtype_and_device_are_usage_errors(tiny_dir):
    with pytest.raises(UsageError, match="unknown dtype 'float8'"):
        load_model(tiny_dir, dtype="float8", device="cpu")
    with pytest.raises(UsageError, match="unknown device 'tpu'"):
        load_model(tiny_dir, device="tpu")
    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="no CUDA GPU is available"):
            load_model(tiny_dir, device="cuda")

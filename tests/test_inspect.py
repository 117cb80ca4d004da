"""inspect: config + safetensors headers only; counts checked against transformers, errors against broken files."""

from __future__ import annotations

import json
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamacli.config import load_config
from llamacli.errors import ConfigError, InputError, WeightsError
from llamacli.inspect import inspect_checkpoint
from llamacli.layout import read_header


def transformers_parameter_count(folder: Path) -> int:
    """sum(p.numel()) of a transformers model built (on the meta device) from the folder's config."""
    import transformers

    cfg = transformers.AutoConfig.from_pretrained(folder)
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(cfg)
    return sum(p.numel() for p in model.parameters())


def test_json_shape_matches_the_config(tiny_dir):
    info = inspect_checkpoint(tiny_dir)
    hf = json.loads((tiny_dir / "config.json").read_text())
    assert info["architecture"] == hf["architectures"][0] == "LlamaForCausalLM"
    assert info["num_layers"] == hf["num_hidden_layers"] == len(info["layers"])
    assert info["hidden_size"] == hf["hidden_size"] and info["ffn_dim"] == hf["intermediate_size"]
    assert info["vocab_size"] == hf["vocab_size"] and info["context_length"] == hf["max_position_embeddings"]
    assert info["rope"] == {"theta": hf["rope_parameters"]["rope_theta"], "type": "default", "scaling": None}
    head_dim = hf["hidden_size"] // hf["num_attention_heads"]
    for i, layer in enumerate(info["layers"]):
        assert layer == {"index": i, "num_heads": hf["num_attention_heads"],
                         "num_kv_heads": hf["num_key_value_heads"], "head_dim": head_dim,
                         "gqa_group_size": hf["num_attention_heads"] // hf["num_key_value_heads"]}
    assert info["kv_cache_bytes_per_token"] == 2 * hf["num_hidden_layers"] * hf["num_key_value_heads"] * head_dim * 4
    assert info["kv_cache_bytes_full_context"] == info["kv_cache_bytes_per_token"] * info["context_length"]
    assert info["dtype"] == "float32"
    assert info["memory_estimate_bytes"] == info["parameters"] * 4 + info["kv_cache_bytes_full_context"]
    assert info["tokenizer"] is None and info["chat_template"] is False
    assert info["bos_token_id"] == 1 and info["eos_token_ids"] == [2]
    json.dumps(info)  # plain data


@pytest.mark.parametrize("overrides", [
    {},
    {"tie_word_embeddings": True},
    {"attention_bias": True, "mlp_bias": True},
    {"num_key_value_heads": 1, "head_dim": 8},
    {"num_key_value_heads": 4},
])
def test_parameter_count_equals_transformers(tiny_checkpoint, overrides):
    folder = tiny_checkpoint(**overrides)
    info = inspect_checkpoint(folder)
    assert info["parameters"] == transformers_parameter_count(folder)
    kinds = info["parameters_by_kind"]
    assert sum(kinds.values()) == info["parameters"]
    c = load_config(folder)
    assert kinds["embeddings"] == c.vocab_size * c.dim
    assert kinds["lm_head"] == (0 if c.tie_embeddings else c.vocab_size * c.dim)
    assert kinds["norms"] == (2 * c.n_layers + 1) * c.dim
    per_layer_mlp = 3 * c.dim * c.ffn_dim + (2 * c.ffn_dim + c.dim if c.mlp_bias else 0)
    assert kinds["mlp"] == c.n_layers * per_layer_mlp
    assert info["layers"][0]["head_dim"] == c.head_dim and info["layers"][0]["num_kv_heads"] == c.n_kv_heads


def test_sharded_checkpoint_counts_the_same(tiny_checkpoint):
    one = inspect_checkpoint(tiny_checkpoint(seed=1))
    sharded_dir = tiny_checkpoint(seed=1, shard=True)
    sharded = inspect_checkpoint(sharded_dir)
    assert len(sharded["disk"]["files"]) > 1
    assert sharded["parameters_by_kind"] == one["parameters_by_kind"]
    assert sharded["disk"]["bytes"] == sum((sharded_dir / f).stat().st_size for f in sharded["disk"]["files"])


def test_stored_dtype_and_chosen_dtype(tiny_checkpoint):
    folder = tiny_checkpoint(store_dtype="bfloat16")
    info = inspect_checkpoint(folder)
    assert info["disk"]["dtypes"] == {"bfloat16": info["parameters"]}
    assert info["dtype"] == "bfloat16"  # auto = the checkpoint's own dtype
    f32 = inspect_checkpoint(folder, dtype="float32")
    assert f32["kv_cache_bytes_per_token"] == 2 * info["kv_cache_bytes_per_token"]
    assert f32["weights_bytes"] == 4 * info["parameters"]
    assert abs(info["disk"]["bytes"] - 2 * info["parameters"]) < 10_000  # headers are small


def test_rope_scaling_and_context(tiny_checkpoint):
    llama3 = inspect_checkpoint(tiny_checkpoint(layout="legacy", rope_theta=500000.0, rope_scaling={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16}))
    assert llama3["rope"]["type"] == "llama3" and llama3["rope"]["theta"] == 500000.0
    assert llama3["rope"]["scaling"]["factor"] == 8.0
    dynamic = inspect_checkpoint(tiny_checkpoint(rope_scaling={"rope_type": "dynamic", "factor": 2.0}))
    assert dynamic["context_length"] == 2 * 64 and dynamic["max_position_embeddings"] == 64


def test_tokenizer_and_template(tiny_chat_dir):
    info = inspect_checkpoint(tiny_chat_dir)
    assert info["tokenizer"]["kind"] == "tokenizers" and info["chat_template"] is True
    tok = json.loads((tiny_chat_dir / "tokenizer.json").read_text())
    ids = {t["content"]: t["id"] for t in tok["added_tokens"]}
    assert info["bos_token_id"] == ids["<|begin_of_text|>"]
    assert info["eos_token_ids"] == [ids["<|eot_id|>"]]


def test_reads_headers_only_without_torch(tiny_chat_dir, tmp_path):
    """The tensor data can be anything (here: zeroed) and torch is never imported."""
    folder = shutil.copytree(tiny_chat_dir, tmp_path / "ckpt")
    f = folder / "model.safetensors"
    data = bytearray(f.read_bytes())
    (n,) = struct.unpack("<Q", data[:8])
    data[8 + n:] = bytes(len(data) - 8 - n)
    f.write_bytes(bytes(data))
    code = ("import sys, json; from llamacli.inspect import inspect_checkpoint; "
            f"info = inspect_checkpoint({str(folder)!r}); "
            "print(json.dumps([info['parameters'], 'torch' in sys.modules]))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    params, torch_imported = json.loads(proc.stdout)
    assert params == inspect_checkpoint(tiny_chat_dir)["parameters"] and torch_imported is False


def test_read_header_lists_every_tensor(tiny_dir):
    from safetensors import safe_open

    infos = read_header(tiny_dir / "model.safetensors")
    with safe_open(str(tiny_dir / "model.safetensors"), framework="pt") as f:
        expected = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    assert {k: v.shape for k, v in infos.items()} == expected
    assert {v.dtype for v in infos.values()} == {"F32"}


def _rewrite(folder: Path, change) -> None:
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"))


@pytest.mark.parametrize("kind, error, pattern", [
    ("truncated", WeightsError, r"truncated: tensor '.*' ends at byte"),
    ("empty", WeightsError, r"truncated safetensors file \(0 bytes"),
    ("header-too-long", WeightsError, r"corrupt or truncated safetensors header"),
    ("header-not-json", WeightsError, r"corrupt safetensors header"),
    ("missing", WeightsError, r"missing tensor 'model.layers.1.self_attn.o_proj.weight'"),
    ("misshaped", WeightsError, r"tensor 'model.norm.weight' has shape \[63\], expected \[64\]"),
    ("unexpected", WeightsError, r"unexpected tensor 'model.layers.9.extra.weight'"),
    ("pickle", WeightsError, r"only pickle weights \(pytorch_model.bin\)"),
    ("no-weights", WeightsError, r"no \*.safetensors weights found"),
    ("no-config", ConfigError, r"no config.json"),
    ("malformed", ConfigError, r"malformed JSON at line 1"),
    ("arch", ConfigError, r"unsupported architecture 'MixtralForCausalLM'"),
    ("absent", InputError, r"no such file or directory"),
])
def test_broken_checkpoints_are_named(kind, error, pattern, tiny_dir, tmp_path):
    folder = shutil.copytree(tiny_dir, tmp_path / "ckpt")
    st = folder / "model.safetensors"
    if kind == "truncated":
        st.write_bytes(st.read_bytes()[:-100])
    elif kind == "empty":
        st.write_bytes(b"")
    elif kind == "header-too-long":
        st.write_bytes(struct.pack("<Q", 10**9) + b"{}")
    elif kind == "header-not-json":
        st.write_bytes(struct.pack("<Q", 4) + b"{{{{")
    elif kind == "missing":
        _rewrite(folder, lambda t: t.pop("model.layers.1.self_attn.o_proj.weight"))
    elif kind == "misshaped":
        _rewrite(folder, lambda t: t.__setitem__("model.norm.weight", torch.ones(63)))
    elif kind == "unexpected":
        _rewrite(folder, lambda t: t.__setitem__("model.layers.9.extra.weight", torch.ones(2)))
    elif kind == "pickle":
        st.unlink()
        (folder / "pytorch_model.bin").write_bytes(b"x")
    elif kind == "no-weights":
        st.unlink()
    elif kind == "no-config":
        (folder / "config.json").unlink()
    elif kind == "malformed":
        (folder / "config.json").write_text("{nope")
    elif kind == "arch":
        conf = json.loads((folder / "config.json").read_text())
        conf["architectures"] = ["MixtralForCausalLM"]
        (folder / "config.json").write_text(json.dumps(conf))
    elif kind == "absent":
        shutil.rmtree(folder)
    with pytest.raises(error, match=pattern):
        inspect_checkpoint(folder)


def test_tied_checkpoint_storing_lm_head_too_counts_it_once(tiny_checkpoint):
    folder = tiny_checkpoint(tie_word_embeddings=True)
    _rewrite(folder, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"].clone()))
    info = inspect_checkpoint(folder)
    assert info["parameters_by_kind"]["lm_head"] == 0
    assert info["parameters"] == transformers_parameter_count(folder)


@pytest.mark.slow
@pytest.mark.parity
def test_smollm2_per_layer_table_and_counts(smollm2_dir):
    from typer.testing import CliRunner

    from llamacli.cli import app

    result = CliRunner().invoke(app, ["inspect", "--model", str(smollm2_dir), "--json"])
    assert result.exit_code == 0, result.stderr
    info = json.loads(result.stdout)
    assert info["num_layers"] == 30 and len(info["layers"]) == 30
    assert all(layer["num_heads"] == 9 and layer["num_kv_heads"] == 3 and layer["head_dim"] == 64
               and layer["gqa_group_size"] == 3 for layer in info["layers"])
    assert info["parameters"] == transformers_parameter_count(smollm2_dir)
    assert info["parameters_by_kind"]["lm_head"] == 0 and info["tie_embeddings"] is True
    assert info["kv_cache_bytes_per_token"] == 2 * 30 * 3 * 64 * 4
    assert info["context_length"] == 8192 and info["vocab_size"] == 49152
    assert info["chat_template"] is True and info["tokenizer"]["kind"] == "tokenizers"
    table = CliRunner().invoke(app, ["inspect", "--model", str(smollm2_dir)])
    assert table.stdout.count("│     9 │") == 30  # one per-layer row each with 9 heads

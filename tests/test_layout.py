"""layout: the expected-tensor table against transformers' own checkpoints; inspect and load_model accept and
refuse exactly the same checkpoints with the same error; the dtype table against torch and safetensors; KV bytes."""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from llamacli import layout
from llamacli.bench import kv_bytes_per_step
from llamacli.config import LlamaConfig, load_config
from llamacli.errors import WeightsError
from llamacli.inspect import inspect_checkpoint
from llamacli.kv_cache import cache_bytes
from llamacli.weights import load_model

SHAPES = [
    {},  # GQA, untied
    {"tie_word_embeddings": True},
    {"tie_word_embeddings": False},
    {"attention_bias": True, "mlp_bias": True},
    {"head_dim": 8},  # head_dim override: q rows 4*8 = 32 != hidden 64
    {"num_key_value_heads": 1},  # MQA
]


def stored_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor in a folder's safetensors files, as safetensors itself reads them."""
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), framework="pt") as f:
            out |= {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return out


@pytest.mark.parity
@pytest.mark.parametrize("overrides", SHAPES)
def test_expected_table_is_what_transformers_saves(tiny_checkpoint, overrides):
    folder = tiny_checkpoint(**overrides)
    table = layout.expected_tensors(load_config(folder))
    assert {n: e.shape for n, e in table.items()} == stored_shapes(folder)


@pytest.mark.parity
@pytest.mark.parametrize("overrides", SHAPES)
def test_kinds_match_transformers_modules(overrides):
    """Each kind's parameter count equals that of the transformers modules of that kind."""
    import transformers

    from tests.conftest import TINY

    hf = transformers.LlamaConfig(architectures=["LlamaForCausalLM"], **{**TINY, **overrides})
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(hf)
    count = lambda modules: sum(p.numel() for m in modules for p in m.parameters())  # noqa: E731
    layers = model.model.layers
    want = {"embeddings": count([model.model.embed_tokens]),
            "attention": count([b.self_attn for b in layers]),
            "mlp": count([b.mlp for b in layers]),
            "norms": count([model.model.norm] + [b.input_layernorm for b in layers]
                           + [b.post_attention_layernorm for b in layers]),
            "lm_head": 0 if hf.tie_word_embeddings else count([model.lm_head])}
    got = dict.fromkeys(layout.KINDS, 0)
    for e in layout.expected_tensors(LlamaConfig.from_hf(hf.to_dict())).values():
        got[e.kind] += torch.Size(e.shape).numel()
    assert got == want


def _rewrite(folder: Path, change) -> None:
    tensors = load_file(str(folder / "model.safetensors"))
    change(tensors)
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _edit_json(path: Path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def _split_in_two(folder: Path) -> None:
    """Move model.norm.weight into a second file, without an index."""
    tensors = load_file(str(folder / "model.safetensors"))
    norm = {"model.norm.weight": tensors.pop("model.norm.weight")}
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    save_file(norm, str(folder / "extra.safetensors"), metadata={"format": "pt"})


def _outside_shard(folder: Path) -> None:
    index = folder / layout.INDEX_NAME
    shard = sorted(set(json.loads(index.read_text())["weight_map"].values()))[0]
    outside = folder.parent / f"{folder.name}-elsewhere"
    outside.mkdir()
    shutil.move(str(folder / shard), outside / shard)

    def point_outside(data):
        data["weight_map"] = {n: f"../{outside.name}/{f}" if f == shard else f for n, f in data["weight_map"].items()}
    _edit_json(index, point_outside)


def _symlink_outside(folder: Path) -> None:
    """model.safetensors replaced by a symlink to a file outside the folder (same name, so only resolving shows it)."""
    outside = folder.parent / f"{folder.name}-elsewhere"
    outside.mkdir()
    shutil.move(str(folder / "model.safetensors"), outside / "model.safetensors")
    (folder / "model.safetensors").symlink_to(outside / "model.safetensors")


def _absent_from_shard(folder: Path) -> None:
    _edit_json(folder / layout.INDEX_NAME, lambda d: d["weight_map"].__setitem__(
        "model.layers.0.mlp.extra.weight", sorted(d["weight_map"].values())[0]))


def _unlisted(folder: Path) -> None:
    _edit_json(folder / layout.INDEX_NAME, lambda d: d["weight_map"].pop("model.norm.weight"))


def _drop_shard(folder: Path) -> None:
    shard = sorted(set(json.loads((folder / layout.INDEX_NAME).read_text())["weight_map"].values()))[-1]
    (folder / shard).unlink()


REFUSED = {
    "missing": ({}, lambda d: _rewrite(d, lambda t: t.pop("model.layers.1.mlp.up_proj.weight")),
                r"missing tensor 'model.layers.1.mlp.up_proj.weight'$"),
    "unexpected": ({}, lambda d: _rewrite(d, lambda t: t.__setitem__("model.layers.0.extra.weight", torch.zeros(2))),
                   r"model.safetensors: unexpected tensor 'model.layers.0.extra.weight' \(is this"),
    "misshaped": ({}, lambda d: _rewrite(d, lambda t: t.__setitem__("model.norm.weight", torch.ones(63))),
                  r"model.safetensors: tensor 'model.norm.weight' has shape \[63\], expected \[64\]"),
    "integer": ({}, lambda d: _rewrite(d, lambda t: t.__setitem__("model.norm.weight",
                                                                  torch.ones(64, dtype=torch.int32))),
                r"tensor 'model.norm.weight' is stored as int32, not a floating-point type"),
    "missing-shard": ({"shard": True}, _drop_shard, r"index.json: shard '.*' \(holding '.*'\) is missing"),
    "shard-outside": ({"shard": True}, _outside_shard, r"shard '\.\./.*' \(holding .*\) is outside the checkpoint"),
    "symlink-outside": ({}, _symlink_outside, r"model.safetensors resolves to .*-elsewhere/model.safetensors, "
                                              r"outside the checkpoint folder"),
    "absent-from-shard": ({"shard": True}, _absent_from_shard,
                          r"lists tensor 'model.layers.0.mlp.extra.weight' in '.*', which does not hold it"),
    "unlisted": ({"shard": True}, _unlisted, r"index.json: does not list tensor 'model.norm.weight' stored in"),
    "twice": ({}, lambda d: (_split_in_two(d), _rewrite(d, lambda t: t.__setitem__(
        "model.norm.weight", torch.ones(64)))), r"tensor 'model.norm.weight' is also stored in extra.safetensors"),
    "malformed-index": ({"shard": True}, lambda d: (d / layout.INDEX_NAME).write_text('{"weight_map": [1]}'),
                        r"index.json: malformed index"),
    "pickle-only": ({}, lambda d: (d / "model.safetensors").rename(d / "pytorch_model.bin"),
                    r"only pickle weights \(pytorch_model.bin\); pickle files can run code"),
    "garbage": ({}, lambda d: (d / "model.safetensors").write_bytes(b"\x00" * 100),
                r"not a readable safetensors file: corrupt safetensors header"),
    "trailing-bytes": ({}, lambda d: (d / "model.safetensors").write_bytes(
        (d / "model.safetensors").read_bytes() + b"\x00" * 8), r"its tensors cover \d+ of \d+ data bytes"),
    "truncated": ({}, lambda d: (d / "model.safetensors").write_bytes((d / "model.safetensors").read_bytes()[:-100]),
                  r"truncated: tensor '.*' ends at byte"),
    "fewer-layers-in-config": ({}, lambda d: _edit_json(d / "config.json", lambda c: c.update(num_hidden_layers=1)),
                               r"unexpected tensor 'model\.layers\.1\.[a-z_.]*' \(and 8 more\)"),
    "lm-head-misshaped": (
        {"tie_word_embeddings": False},
        lambda d: _rewrite(d, lambda t: t.__setitem__("lm_head.weight", torch.ones(128, 63))),
        r"tensor 'lm_head.weight' has shape \[128, 63\], expected \[128, 64\]"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_inspect_and_load_model_refuse_alike(case, tiny_checkpoint):
    overrides, change, pattern = REFUSED[case]
    folder = tiny_checkpoint(**overrides)
    change(folder)
    with pytest.raises(WeightsError, match=pattern) as inspected:
        inspect_checkpoint(folder)
    with pytest.raises(WeightsError) as loaded:
        load_model(folder, device="cpu")
    assert str(loaded.value) == str(inspected.value)


def _count(model) -> int:
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


@pytest.mark.parametrize("overrides, change, head_is_embedding", [
    ({"tie_word_embeddings": True},  # a tied checkpoint that stores lm_head too: the copy is ignored
     lambda d: _rewrite(d, lambda t: t.__setitem__("lm_head.weight", t["model.embed_tokens.weight"] + 1)), True),
    ({"tie_word_embeddings": False}, lambda d: _rewrite(d, lambda t: t.pop("lm_head.weight")), True),  # Llama-3.2
    ({"tie_word_embeddings": False}, lambda d: None, False),
    ({}, lambda d: _rewrite(d, lambda t: t.__setitem__("model.layers.0.self_attn.rotary_emb.inv_freq",
                                                       torch.ones(8))), False),
    ({"shard": True}, lambda d: None, False),
])
def test_inspect_and_load_model_accept_alike(tiny_checkpoint, overrides, change, head_is_embedding):
    folder = tiny_checkpoint(**overrides)
    change(folder)
    info = inspect_checkpoint(folder)
    model = load_model(folder, device="cpu", runtime=False)  # the reference modules show the tie
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is head_is_embedding
    assert info["parameters"] == _count(model)
    assert (info["parameters_by_kind"]["lm_head"] == 0) is head_is_embedding


@pytest.mark.parametrize("load", [inspect_checkpoint, lambda d: load_model(d, device="cpu")],
                         ids=["inspect", "load_model"])
def test_a_config_claiming_a_billion_layers_fails_before_building_anything(load, tiny_checkpoint):
    """10**9 layers would take hours and far more memory than there is to build: failing at all says none was."""
    folder = tiny_checkpoint()
    n = 10**9
    _edit_json(folder / "config.json", lambda c: c.update(num_hidden_layers=n))
    per_layer = 9  # q, k, v, o, gate, up, down, two norms
    with pytest.raises(WeightsError, match=rf"missing tensor 'model.layers.2.self_attn.q_proj.weight' "
                                           rf"\(and {per_layer * (n - 2) - 1} more\)$"):
        load(folder)


def test_missing_count_with_a_gap_of_whole_layers(tiny_checkpoint):
    """Listed layers and counted absent ones add up: layer 0 loses one tensor, layers 2..4 are absent."""
    folder = tiny_checkpoint()
    _rewrite(folder, lambda t: t.pop("model.layers.0.mlp.down_proj.weight"))
    config = dataclasses.replace(load_config(folder), n_layers=5)
    with pytest.raises(WeightsError, match=r"missing tensor 'model.layers.0.mlp.down_proj.weight' \(and 27 more\)$"):
        layout.checkpoint_tensors(config, folder)


def test_dtype_table_agrees_with_torch_and_safetensors(tmp_path):
    for d in layout.DTYPES.values():
        torch_dtype = getattr(torch, d.name)
        assert torch.empty((), dtype=torch_dtype).element_size() == d.nbytes
        assert torch_dtype.is_floating_point == d.floating
        save_file({"x": torch.zeros(3, dtype=torch_dtype)}, str(tmp_path / "t.safetensors"))
        (info,) = layout.read_header(tmp_path / "t.safetensors").values()
        assert layout.SAFETENSORS_DTYPES[info.dtype] is d
    assert layout.RUN_DTYPES == ("float32", "bfloat16", "float16")


def test_kv_bytes_per_token_by_hand():
    cfg = LlamaConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=24, ffn_dim=128, vocab_size=128)
    # keys + values, 3 layers, 2 kv heads of 24 values, 2 bytes each
    assert layout.kv_bytes_per_token(cfg, "bfloat16") == 2 * 3 * 2 * 24 * 2 == 576
    assert layout.kv_bytes_per_token(cfg, "float32") == 1152
    assert cache_bytes(cfg, 2, 10, torch.float16) == 576 * 2 * 10
    assert cache_bytes(cfg, 1, 7, torch.float32) == 1152 * 7


def test_kv_bytes_agree_across_inspect_bench_and_cache(tiny_dir):
    model = load_model(tiny_dir, device="cpu")
    info = inspect_checkpoint(tiny_dir, dtype="float16")
    per_token = info["kv_cache_bytes_per_token"]
    assert kv_bytes_per_step(model, 10, 3, torch.float16) == per_token * 30
    assert cache_bytes(model.config, 3, 10, torch.float16) == per_token * 30


def test_a_hub_snapshot_whose_files_link_into_its_blob_store_loads(tiny_checkpoint, tmp_path):
    """huggingface_hub lays out <repo>/snapshots/<rev>/file -> ../../blobs/<hash>: that is not 'outside'."""
    from llamacli.weights import load_model

    src = tiny_checkpoint(shard=True)
    repo = tmp_path / "models--org--tiny"
    snap, blobs = repo / "snapshots" / "abc123", repo / "blobs"
    snap.mkdir(parents=True)
    blobs.mkdir()
    for i, f in enumerate(sorted(src.iterdir())):
        shutil.copy(f, blobs / f"blob{i}")
        (snap / f.name).symlink_to(Path("..") / ".." / "blobs" / f"blob{i}")
    assert layout.weight_files(snap)
    load_model(snap, dtype="float32", device="cpu")

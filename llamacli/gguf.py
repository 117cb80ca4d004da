"""GGUF import: turn a llama.cpp GGUF file into a Hugging Face Llama checkpoint folder.

The folder holds what the rest of llamacli reads: `config.json`, `generation_config.json`,
`model.safetensors` (sharded past a size limit), the tokenizer (`tokenizer.json` for byte-level BPE
vocabularies, `tokenizer.model` for SentencePiece ones) and `tokenizer_config.json`.

Three things llama.cpp changes on the way in are undone here:
- tensor names (`blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`);
- quantization (every tensor is dequantized with `gguf.quants`, then cast to the chosen dtype);
- the q/k row order: llama.cpp interleaves each head's rotary halves for its own RoPE, and k is
  permuted with the KV-head count, so it is undone with that count too (llama.cpp #2376).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from llamacli import files, layout
from llamacli.config import LlamaConfig
from llamacli.errors import ConfigError, InputError, UsageError, WeightsError
from llamacli.gguf_vocab import special_id, write_tokenizer

# Bump when the output of a conversion changes, so cached conversions are redone.
CONVERTER_VERSION = 2

DTYPES = layout.RUN_DTYPES

# Shards of at most this many bytes keep memory bounded on large models.
SHARD_BYTES = 4 << 30

ProgressFn = Callable[[int, int, str], None]


_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# Pre-tokenizer splits, by `tokenizer.ggml.pre`, as llama.cpp's llama-vocab.cpp applies them.
# ---------------------------------------------------------------------------------------------
# Reading


def _open(src: Path):
    from gguf import GGUFReader

    if not src.is_file():
        raise InputError(f"GGUF file not found: {src}")
    try:
        return GGUFReader(src)
    except Exception as exc:  # the reader raises ValueError, struct errors, OSError, ...
        raise InputError(f"cannot read {src} as GGUF: {exc}") from exc


def _metadata(reader) -> dict[str, Any]:
    """Every key/value of the file as plain Python values."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def _f32(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _get(meta: dict, key: str, default: Any = None, *, required: bool = False) -> Any:
    if key in meta:
        return meta[key]
    if required:
        raise ConfigError(f"GGUF metadata lacks {key!r}, which a llama model needs")
    return default


# ---------------------------------------------------------------------------------------------
# Config


def _rope_scaling(meta: dict, tensor_names: set[str], reader, head_dim: int, theta: float) -> dict | None:
    kind = _get(meta, "llama.rope.scaling.type")
    factor = _get(meta, "llama.rope.scaling.factor")
    if kind is None and _get(meta, "llama.rope.scale_linear") is not None:  # older files
        kind, factor = "linear", _get(meta, "llama.rope.scale_linear")
    if "rope_freqs.weight" in tensor_names:
        if kind not in (None, "none"):
            raise ConfigError(f"GGUF has both rope_freqs and rope scaling type {kind!r}; not supported")
        return _llama3_scaling(reader, head_dim, theta, meta)
    if kind in (None, "none") or factor in (None, 1.0, 0.0):
        return None
    if kind == "linear":
        return {"rope_type": "linear", "factor": float(factor)}
    if kind == "yarn":
        scaling = {"rope_type": "yarn", "factor": float(factor)}
        orig = _get(meta, "llama.rope.scaling.original_context_length")
        if orig:
            scaling["original_max_position_embeddings"] = int(orig)
        for key, name in (("yarn_beta_fast", "beta_fast"), ("yarn_beta_slow", "beta_slow")):
            if (value := _get(meta, f"llama.rope.scaling.{key}")) is not None:
                scaling[name] = float(value)
        return scaling
    raise ConfigError(f"unsupported GGUF rope scaling type {kind!r} (supported: linear, yarn, llama3 via rope_freqs)")


def _llama3_factors(head_dim: int, theta: float, factor: float, low: float, high: float, orig: int) -> np.ndarray:
    """The per-frequency divisors that Llama 3.1's RoPE scaling applies (what llama.cpp stores as rope_freqs)."""
    inv_freq = 1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float64) / head_dim)
    wavelen = 2 * math.pi / inv_freq
    low_wavelen, high_wavelen = orig / low, orig / high
    smooth = (orig / wavelen - low) / (high - low)
    divisor = 1.0 / ((1 - smooth) / factor + smooth)
    divisor = np.where(wavelen < high_wavelen, 1.0, divisor)
    return np.where(wavelen > low_wavelen, factor, divisor)


def _llama3_scaling(reader, head_dim: int, theta: float, meta: dict) -> dict:
    """Map a rope_freqs tensor to HF's `llama3` rope scaling, only where known parameters rebuild it exactly."""
    from gguf.quants import dequantize

    tensor = next(t for t in reader.tensors if t.name == "rope_freqs.weight")
    freqs = dequantize(tensor.data, tensor.tensor_type).astype(np.float64).reshape(-1)
    factor = float(freqs.max())
    orig_candidates = [8192]
    if (orig := _get(meta, "llama.rope.scaling.original_context_length")) is not None:
        orig_candidates.insert(0, int(orig))
    for orig in orig_candidates:
        for low, high in ((1.0, 4.0), (1.0, 2.0), (2.0, 4.0)):
            expected = _llama3_factors(head_dim, theta, factor, low, high, orig)
            if expected.shape == freqs.shape and np.allclose(expected, freqs, rtol=1e-4, atol=1e-5):
                return {
                    "rope_type": "llama3",
                    "factor": factor,
                    "low_freq_factor": low,
                    "high_freq_factor": high,
                    "original_max_position_embeddings": orig,
                }
    raise ConfigError(
        "GGUF has a rope_freqs tensor that matches no Llama-3 rope scaling llamacli can rebuild exactly; "
        "convert the original Hugging Face checkpoint instead"
    )



def _build_config(meta: dict, reader, tensor_names: set[str], dtype: str) -> tuple[dict, dict]:
    """(config.json, generation_config.json) from the metadata of a llama GGUF."""
    dim = int(_get(meta, "llama.embedding_length", required=True))
    n_heads = int(_get(meta, "llama.attention.head_count", required=True))
    n_kv_heads = int(_get(meta, "llama.attention.head_count_kv", n_heads))
    head_dim = int(_get(meta, "llama.attention.key_length", 0) or _get(meta, "llama.rope.dimension_count", 0)
                   or dim // n_heads)
    rope_dim = int(_get(meta, "llama.rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise ConfigError(f"GGUF rotates {rope_dim} of {head_dim} head dimensions; partial RoPE is not supported")
    value_dim = _get(meta, "llama.attention.value_length")
    if value_dim is not None and int(value_dim) != head_dim:
        raise ConfigError(f"GGUF value head size {value_dim} differs from key head size {head_dim}; not supported")
    if _get(meta, "llama.expert_count", 0):
        raise ConfigError("mixture-of-experts llama GGUF files are not supported")
    theta = _f32(_get(meta, "llama.rope.freq_base", 10000.0))
    tokens = _get(meta, "tokenizer.ggml.tokens") or []
    vocab_size = int(_get(meta, "llama.vocab_size", 0) or len(tokens))
    if not vocab_size:
        raise ConfigError("GGUF metadata states no vocabulary size and has no tokens")
    bos, eos, pad = special_id(meta, "bos"), special_id(meta, "eos"), special_id(meta, "padding")

    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": dim,
        "intermediate_size": int(_get(meta, "llama.feed_forward_length", required=True)),
        "num_hidden_layers": int(_get(meta, "llama.block_count", required=True)),
        "num_attention_heads": n_heads,
        "num_key_value_heads": n_kv_heads,
        "head_dim": head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": int(_get(meta, "llama.context_length", 2048)),
        "rms_norm_eps": _f32(_get(meta, "llama.attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": theta,
        "rope_scaling": _rope_scaling(meta, tensor_names, reader, head_dim, theta),
        "attention_bias": False,
        "mlp_bias": False,
        "vocab_size": vocab_size,
        "tie_word_embeddings": "output.weight" not in tensor_names,
        "bos_token_id": bos,
        "eos_token_id": eos,
        "pad_token_id": pad,
        "torch_dtype": dtype,
    }
    # Chat models end turns with an end-of-turn/-message token that is not the eos id: stop on all.
    eos_ids = [i for i in (eos, special_id(meta, "eot"), special_id(meta, "eom")) if i is not None]
    eos_ids = list(dict.fromkeys(eos_ids))
    generation = {
        "bos_token_id": bos,
        "eos_token_id": eos_ids[0] if len(eos_ids) == 1 else (eos_ids or None),
    }
    if pad is not None:
        generation["pad_token_id"] = pad
    return config, {k: v for k, v in generation.items() if v is not None}


# ---------------------------------------------------------------------------------------------
# Weights


def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    raise WeightsError(f"unexpected tensor {name!r} in a llama GGUF file")


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of q/k rows (pass the KV-head count for k)."""
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise WeightsError(f"cannot split {rows} rows into {n_heads} heads of two rotary halves")
    half = rows // n_heads // 2
    # llama.cpp stored (n_heads, half, 2, ...) in the order of (n_heads, 2, half, ...): swap back.
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _dequantize(tensor) -> np.ndarray:
    """The tensor as float32 in numpy (row-major, HF) shape."""
    from gguf import GGMLQuantizationType as Q
    from gguf.quants import dequantize

    qtype = Q(tensor.tensor_type)
    if qtype in (Q.I8, Q.I16, Q.I32, Q.I64, Q.F64):
        raise WeightsError(f"tensor {tensor.name!r} has type {qtype.name}, which is not a supported weight type")
    try:
        values = dequantize(tensor.data, qtype)
    except NotImplementedError as exc:
        raise WeightsError(f"tensor {tensor.name!r} has type {qtype.name}, which gguf cannot dequantize") from exc
    shape = tuple(int(n) for n in reversed(tensor.shape.tolist()))  # GGUF lists dimensions innermost first
    values = np.asarray(values, dtype=np.float32).reshape(shape)
    # F32 tensors are read-only views of the mapped file: own a copy, as every other type already does.
    return values if values.flags.writeable else values.copy()


def _write_weights(reader, config: dict, out: Path, dtype: str, progress: ProgressFn | None,
                   max_shard_bytes: int = SHARD_BYTES) -> None:
    import torch
    from safetensors.torch import save_file

    torch_dtype = getattr(torch, dtype)
    n_heads, n_kv_heads = config["num_attention_heads"], config["num_key_value_heads"]
    # The shapes the loader will check, from the same table (the config is the one written beside them).
    expected = {name: spec.shape for name, spec in layout.expected_tensors(
        LlamaConfig.from_hf(config, source="the config built from the GGUF metadata")).items()}
    tensors = [t for t in reader.tensors if t.name != "rope_freqs.weight"]
    total = len(tensors)

    shards: list[dict[str, torch.Tensor]] = [{}]
    shard_bytes = 0
    seen: set[str] = set()
    for done, tensor in enumerate(tensors, 1):
        name = _hf_name(tensor.name)
        values = _dequantize(tensor)
        if name.endswith("q_proj.weight"):
            values = unpermute_rope_rows(values, n_heads)
        elif name.endswith("k_proj.weight"):
            values = unpermute_rope_rows(values, n_kv_heads)
        if name not in expected:
            raise WeightsError(f"tensor {tensor.name!r} ({name}) does not belong to a "
                               f"{config['num_hidden_layers']}-layer model")
        if tuple(values.shape) != expected[name]:
            raise WeightsError(f"tensor {tensor.name!r} has shape {tuple(values.shape)}, "
                               f"expected {expected[name]} from the metadata")
        weight = torch.from_numpy(np.ascontiguousarray(values)).to(torch_dtype).contiguous()
        size = weight.numel() * weight.element_size()
        if shard_bytes and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1][name] = weight
        shard_bytes += size
        seen.add(name)
        if progress is not None:
            progress(done, total, tensor.name)

    missing = sorted(set(expected) - seen)
    if missing:
        raise WeightsError(f"GGUF file lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]!r}")
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=metadata)
        files.make_readable(out / "model.safetensors")
        return
    weight_map, total_size = {}, 0
    for index, shard in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata=metadata)
        files.make_readable(out / file)  # safetensors writes 0600
        for name, weight in shard.items():
            weight_map[name] = file
            total_size += weight.numel() * weight.element_size()
    index_json = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Public API


def convert_gguf(src: str | Path, out_dir: str | Path, dtype: str = "bfloat16",
                 progress: ProgressFn | None = None, overwrite: bool = False,
                 max_shard_bytes: int = SHARD_BYTES) -> Path:
    """Convert a llama GGUF file into a Hugging Face checkpoint folder; returns the folder. Weights go into
    safetensors shards of at most `max_shard_bytes` (one tensor past it opens the next shard).

    The folder is built beside `out_dir` and renamed into place when complete (`files.new_folder`): a failure
    leaves no half-written checkpoint, and an existing non-empty `out_dir` is refused unless `overwrite` (then
    replaced whole, never mixed with its old files). `progress(done, total, tensor_name)` is called per tensor.
    """
    if dtype not in DTYPES:
        raise UsageError(f"unsupported dtype {dtype!r} (choose one of {', '.join(DTYPES)})")
    src, out = Path(src), Path(out_dir)
    files.check_new_folder(out, overwrite)  # before the slow part
    if overwrite and out.is_dir() and Path(os.path.realpath(src)).is_relative_to(os.path.realpath(out)):
        raise UsageError(f"{src} is inside {out}: --overwrite would delete the file being converted")
    reader = _open(src)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"unsupported GGUF architecture {arch!r}: llamacli converts only 'llama'")
    tensor_names = {t.name for t in reader.tensors}
    config, generation = _build_config(meta, reader, tensor_names, dtype)

    with files.new_folder(out, overwrite) as tmp:
        write_tokenizer(meta, tmp, config)
        _write_weights(reader, config, tmp, dtype, progress, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out


def default_cache_root() -> Path:
    """Where `--model FILE.gguf` conversions are kept: $LLAMACLI_CACHE/gguf, else ~/.cache/llamacli/gguf."""
    root = os.environ.get("LLAMACLI_CACHE")
    return Path(root) / "gguf" if root else Path.home() / ".cache" / "llamacli" / "gguf"


def cached_conversion(src: str | Path, dtype: str = "bfloat16", cache_root: Path | None = None,
                      progress: ProgressFn | None = None) -> Path:
    """Convert a GGUF file once into a cache folder (keyed by path, size, mtime and dtype) and reuse it after."""
    if dtype not in DTYPES:
        raise UsageError(f"unsupported dtype {dtype!r} (choose one of {', '.join(DTYPES)})")
    path = Path(src).expanduser()
    if not path.is_file():
        raise InputError(f"GGUF file not found: {path}")
    path = path.resolve()
    stat = path.stat()
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{dtype}|v{CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    target = root / f"{path.stem}-{dtype}-{digest}"
    if (target / "config.json").is_file():
        return target
    # Conversions appear whole (files.new_folder); a folder without config.json is debris from an older llamacli.
    stale = target.is_dir() and not files.is_empty_folder(target)
    try:
        convert_gguf(path, target, dtype=dtype, progress=progress, overwrite=stale)
    except files.NotEmptyError:
        if not (target / "config.json").is_file():  # not a concurrent conversion that finished first
            raise
    return target

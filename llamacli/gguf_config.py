"""GGUF metadata -> the Hugging Face `config.json` and `generation_config.json` of a llama model.

Sizes, heads, norms and RoPE come from the `llama.*` keys; RoPE scaling from `llama.rope.scaling.*`, or from
a `rope_freqs` tensor that is mapped to Llama 3's scaling only where known parameters rebuild it exactly.
Special tokens come from `tokenizer.ggml.*`; an end-of-turn token joins the eos ids. No torch here.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np

from llamacli.errors import ConfigError
from llamacli.gguf_vocab import special_id


def _f32(value: Any) -> float:
    """A float32 metadata value as the shortest decimal that round-trips (1e-05, not 9.999999747378752e-06)."""
    return float(str(np.float32(value)))


def _get(meta: dict, key: str, default: Any = None, *, required: bool = False) -> Any:
    if key in meta:
        return meta[key]
    if required:
        raise ConfigError(f"GGUF metadata lacks {key!r}, which a llama model needs")
    return default


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



def build_config(meta: dict, reader, tensor_names: set[str], dtype: str) -> tuple[dict, dict]:
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

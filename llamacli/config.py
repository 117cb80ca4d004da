"""Read a Hugging Face Llama `config.json` (+ `generation_config.json`) into a frozen `LlamaConfig`.

Every spelling real checkpoints use is accepted: legacy `rope_theta` + `rope_scaling` (with `type` or
`rope_type`), transformers-5 `rope_parameters`, `torch_dtype` or `dtype`, an explicit `head_dim`, and eos ids
as an int or a list. Whatever is rejected is explained with the field and its value. No torch here.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from llamacli.errors import ConfigError, InputError

SUPPORTED_ARCHITECTURES = {"LlamaForCausalLM", "MistralForCausalLM"}
SUPPORTED_MODEL_TYPES = {"llama", "mistral"}
ROPE_TYPES = {"default", "linear", "dynamic", "llama3", "yarn"}
# Keys each scaled rope type must carry (besides `rope_type`); checked so a typo fails at load, not mid-run.
ROPE_REQUIRED = {
    "default": (),
    "linear": ("factor",),
    "dynamic": ("factor",),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
    "yarn": ("factor", "original_max_position_embeddings"),
}


@dataclass(frozen=True)
class LlamaConfig:
    """The model's shape and numerics, named as in DESIGN.md."""

    dim: int
    n_layers: int
    n_heads: int
    n_kv_heads: int
    head_dim: int
    ffn_dim: int
    vocab_size: int
    norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: dict[str, Any] | None = None  # normalised: always has "rope_type" when present
    max_seq_len: int = 2048
    tie_embeddings: bool = False
    attention_bias: bool = False
    mlp_bias: bool = False
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    pad_token_id: int | None = None
    torch_dtype: str | None = None
    architecture: str = "LlamaForCausalLM"
    model_type: str = "llama"
    generation: dict[str, Any] = field(default_factory=dict)  # sampling defaults from generation_config.json

    @property
    def rope_type(self) -> str:
        """The RoPE variant: default, linear, dynamic, llama3 or yarn."""
        return (self.rope_scaling or {}).get("rope_type", "default")

    @property
    def context_length(self) -> int:
        """Positions the model can attend over: dynamic NTK scaling extends the trained context by `factor`."""
        if self.rope_type == "dynamic":
            return int(self.max_seq_len * float(self.rope_scaling["factor"]))
        return self.max_seq_len

    @property
    def n_rep(self) -> int:
        """Query heads per KV head (the GQA group size)."""
        return self.n_heads // self.n_kv_heads

    @classmethod
    def from_hf(cls, hf: dict[str, Any], generation: dict[str, Any] | None = None,
                source: str = "config.json") -> "LlamaConfig":
        """Build from a parsed HF config dict (and optional generation config dict)."""
        if not isinstance(hf, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(hf).__name__}")
        _check_architecture(hf, source)

        def need(key: str) -> Any:
            if key not in hf or hf[key] is None:
                raise ConfigError(f"{source}: missing required field '{key}'")
            return hf[key]

        def as_int(key: str, value: Any) -> int:
            if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
                raise ConfigError(f"{source}: field '{key}' must be a positive integer, got {value!r}")
            return value

        dim = as_int("hidden_size", need("hidden_size"))
        n_heads = as_int("num_attention_heads", need("num_attention_heads"))
        kv = hf.get("num_key_value_heads")
        n_kv_heads = n_heads if kv is None else as_int("num_key_value_heads", kv)
        if n_heads % n_kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads ({n_heads}) is not a multiple of num_key_value_heads ({n_kv_heads})"
            )
        head_dim = hf.get("head_dim")
        if head_dim is None:
            if dim % n_heads:
                raise ConfigError(f"{source}: hidden_size ({dim}) is not divisible by num_attention_heads ({n_heads})")
            head_dim = dim // n_heads
        head_dim = as_int("head_dim", head_dim)
        if head_dim % 2:
            raise ConfigError(f"{source}: head_dim must be even for RoPE, got {head_dim}")

        act = hf.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"{source}: unsupported hidden_act '{act}' (only silu is supported)")
        if hf.get("pretraining_tp", 1) not in (None, 1):
            # pretraining_tp > 1 only changes how transformers slices matmuls; the math is the same.
            pass

        max_seq_len = as_int("max_position_embeddings", hf.get("max_position_embeddings", 2048))
        if hf.get("model_type") == "mistral" or hf.get("architectures", [None])[0] == "MistralForCausalLM":
            window = hf.get("sliding_window")
            if window is not None and window < max_seq_len:
                raise ConfigError(
                    f"{source}: sliding_window {window} is shorter than max_position_embeddings {max_seq_len}; "
                    "sliding-window attention is not supported"
                )

        rope_theta, rope_scaling = _parse_rope(hf, source, max_seq_len)

        eos_ids = list(_as_id_list(hf.get("eos_token_id"), "eos_token_id", source))
        generation = dict(generation or {})
        for i in _as_id_list(generation.get("eos_token_id"), "eos_token_id", "generation_config.json"):
            if i not in eos_ids:
                eos_ids.append(i)
        bos = hf.get("bos_token_id", generation.get("bos_token_id"))
        if isinstance(bos, list):
            bos = bos[0] if bos else None
        pad = hf.get("pad_token_id", generation.get("pad_token_id"))
        if isinstance(pad, list):
            pad = pad[0] if pad else None

        dtype = hf.get("dtype", hf.get("torch_dtype"))
        if dtype is not None and not isinstance(dtype, str):
            raise ConfigError(f"{source}: field 'torch_dtype' must be a string, got {dtype!r}")

        norm_eps = hf.get("rms_norm_eps", 1e-6)
        if not isinstance(norm_eps, (int, float)) or isinstance(norm_eps, bool) or norm_eps <= 0:
            raise ConfigError(f"{source}: field 'rms_norm_eps' must be a positive number, got {norm_eps!r}")

        return cls(
            dim=dim,
            n_layers=as_int("num_hidden_layers", need("num_hidden_layers")),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            ffn_dim=as_int("intermediate_size", need("intermediate_size")),
            vocab_size=as_int("vocab_size", need("vocab_size")),
            norm_eps=float(norm_eps),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=max_seq_len,
            tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
            attention_bias=bool(hf.get("attention_bias", False)),
            mlp_bias=bool(hf.get("mlp_bias", False)),
            bos_token_id=bos,
            eos_token_ids=tuple(eos_ids),
            pad_token_id=pad,
            torch_dtype=dtype,
            architecture=(hf.get("architectures") or ["LlamaForCausalLM"])[0],
            model_type=hf.get("model_type", "llama"),
            generation={k: v for k, v in generation.items()
                        if k in ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "do_sample",
                                 "max_new_tokens")},
        )


def _check_architecture(hf: dict[str, Any], source: str) -> None:
    archs = hf.get("architectures")
    if archs is not None:
        if not isinstance(archs, list) or not archs:
            raise ConfigError(f"{source}: field 'architectures' must be a non-empty list, got {archs!r}")
        if archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{source}: unsupported architecture '{archs[0]}' (supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
            )
    model_type = hf.get("model_type")
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: unsupported model_type '{model_type}' (supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
        )
    if archs is None and model_type is None:
        raise ConfigError(f"{source}: neither 'architectures' nor 'model_type' is set; cannot tell the model kind")


def _parse_rope(hf: dict[str, Any], source: str, max_seq_len: int) -> tuple[float, dict[str, Any] | None]:
    """Return (rope_theta, normalised scaling dict or None) from either config layout."""
    params = hf.get("rope_parameters")
    legacy = hf.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{source}: field 'rope_parameters' must be an object, got {params!r}")
    if legacy is not None and not isinstance(legacy, dict):
        raise ConfigError(f"{source}: field 'rope_scaling' must be an object, got {legacy!r}")
    scaling = dict(params or legacy or {})
    theta = scaling.pop("rope_theta", None)
    if theta is None:
        theta = hf.get("rope_theta", 10000.0)
    if not isinstance(theta, (int, float)) or isinstance(theta, bool) or theta <= 0:
        raise ConfigError(f"{source}: field 'rope_theta' must be a positive number, got {theta!r}")
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"{source}: unsupported rope type '{rope_type}' (supported: {', '.join(sorted(ROPE_TYPES))})"
        )
    if rope_type == "default":
        return float(theta), None
    if rope_type in ("llama3", "yarn") and "original_max_position_embeddings" not in scaling:
        # transformers falls back to the model's context length here.
        scaling["original_max_position_embeddings"] = hf.get("original_max_position_embeddings", max_seq_len)
    if rope_type == "yarn" and scaling.get("factor") is None:
        scaling["factor"] = max_seq_len / scaling["original_max_position_embeddings"]
    for key in ROPE_REQUIRED[rope_type]:
        if scaling.get(key) is None:
            raise ConfigError(f"{source}: rope type '{rope_type}' needs field '{key}' in rope scaling")
    factor = scaling["factor"]
    if not isinstance(factor, (int, float)) or isinstance(factor, bool) or factor <= 0:
        raise ConfigError(f"{source}: rope scaling 'factor' must be a positive number, got {factor!r}")
    if rope_type in ("linear", "dynamic") and factor < 1:
        raise ConfigError(f"{source}: rope scaling 'factor' must be >= 1 for '{rope_type}', got {factor!r}")
    scaling["rope_type"] = rope_type
    return float(theta), scaling


def _as_id_list(value: Any, key: str, source: str) -> list[int]:
    if value is None:
        return []
    values = value if isinstance(value, list) else [value]
    for v in values:
        if isinstance(v, bool) or not isinstance(v, int) or v < 0:
            raise ConfigError(f"{source}: field '{key}' must be a token id or a list of ids, got {value!r}")
    return list(values)


def read_json(path: Path) -> Any:
    """Parse a JSON file, turning I/O and syntax problems into one-line errors that name the file."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise InputError(f"{path}: file not found") from None
    except OSError as exc:
        raise InputError(f"{path}: cannot read ({exc.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None


def load_config(folder: str | Path) -> LlamaConfig:
    """Read `config.json` (and `generation_config.json` if present) from a checkpoint folder."""
    folder = Path(folder)
    if not folder.exists():
        raise InputError(f"{folder}: no such file or directory")
    if not folder.is_dir():
        raise InputError(f"{folder}: not a checkpoint folder")
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise ConfigError(f"{folder}: no config.json (is this a Hugging Face checkpoint folder?)")
    hf = read_json(config_path)
    gen_path = folder / "generation_config.json"
    generation = read_json(gen_path) if gen_path.is_file() else None
    if generation is not None and not isinstance(generation, dict):
        raise ConfigError(f"{gen_path}: expected a JSON object")
    return LlamaConfig.from_hf(hf, generation, source=str(config_path))

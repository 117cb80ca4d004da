"""Read a Hugging Face Llama `config.json` (+ `generation_config.json`) into a frozen `LlamaConfig`.

Every spelling real checkpoints use is accepted: legacy `rope_theta` + `rope_scaling` (with `type` or
`rope_type`), transformers-5 `rope_parameters`, `torch_dtype` or `dtype`, an explicit `head_dim`, and eos ids
as an int or a list. Whatever is rejected is explained with the field and its value. No torch here.
"""

from __future__ import annotations

import json
import math
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
                source: str = "config.json", generation_source: str = "generation_config.json") -> "LlamaConfig":
        """Build from a parsed HF config dict (and optional generation config dict); every value is checked
        (type, range, finiteness) and a bad one is a ConfigError naming its file and field."""
        if not isinstance(hf, dict):
            raise ConfigError(f"{source}: expected a JSON object, got {type(hf).__name__}")
        f = _Fields(hf, source)
        _check_architecture(hf, source)
        dim = f.int("hidden_size", required=True)
        n_heads = f.int("num_attention_heads", required=True)
        n_kv_heads = f.int("num_key_value_heads", n_heads)
        if n_heads % n_kv_heads:
            raise ConfigError(
                f"{source}: num_attention_heads ({n_heads}) is not a multiple of num_key_value_heads ({n_kv_heads})"
            )
        if hf.get("head_dim") is None and dim % n_heads:
            raise ConfigError(f"{source}: hidden_size ({dim}) is not divisible by num_attention_heads ({n_heads})")
        head_dim = f.int("head_dim", dim // n_heads)
        if head_dim % 2:
            raise ConfigError(f"{source}: head_dim must be even for RoPE, got {head_dim}")
        vocab_size = f.int("vocab_size", required=True)

        act = f.str("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ConfigError(f"{source}: unsupported hidden_act '{act}' (only silu is supported)")

        max_seq_len = f.int("max_position_embeddings", 2048)
        architecture = (hf.get("architectures") or ["LlamaForCausalLM"])[0]
        model_type = f.str("model_type", "llama")
        if model_type == "mistral" or architecture == "MistralForCausalLM":
            window = f.int("sliding_window", None)
            if window is not None and window < max_seq_len:
                raise ConfigError(
                    f"{source}: sliding_window {window} is shorter than max_position_embeddings {max_seq_len}; "
                    "sliding-window attention is not supported"
                )

        rope_theta, rope_scaling = _parse_rope(hf, source, max_seq_len)
        generation = _check_generation(generation, generation_source)
        g = _Fields(generation, generation_source)

        eos_ids = f.ids("eos_token_id", vocab_size)
        for i in g.ids("eos_token_id", vocab_size):
            if i not in eos_ids:
                eos_ids.append(i)
        bos = (f.ids("bos_token_id", vocab_size) or g.ids("bos_token_id", vocab_size) or [None])[0]
        pad = (f.ids("pad_token_id", vocab_size, none_below_zero=True)
               or g.ids("pad_token_id", vocab_size, none_below_zero=True) or [None])[0]

        dtype = f.str("dtype", None) if hf.get("dtype") is not None else f.str("torch_dtype", None)

        return cls(
            dim=dim,
            n_layers=f.int("num_hidden_layers", required=True),
            n_heads=n_heads,
            n_kv_heads=n_kv_heads,
            head_dim=head_dim,
            ffn_dim=f.int("intermediate_size", required=True),
            vocab_size=vocab_size,
            norm_eps=f.number("rms_norm_eps", 1e-6, positive=True, maximum=1.0),
            rope_theta=rope_theta,
            rope_scaling=rope_scaling,
            max_seq_len=max_seq_len,
            tie_embeddings=f.bool("tie_word_embeddings", False),
            attention_bias=f.bool("attention_bias", False),
            mlp_bias=f.bool("mlp_bias", False),
            bos_token_id=bos,
            eos_token_ids=tuple(eos_ids),
            pad_token_id=pad,
            torch_dtype=dtype,
            architecture=architecture,
            model_type=model_type,
            generation={k: v for k, v in generation.items() if k in GENERATION_KEYS and v is not None},
        )


_ABSENT = object()
FLOAT32_MAX = 3.4028234663852886e38


class _Fields:
    """Typed reads of one JSON object's fields: each bad value is a ConfigError naming the file and field."""

    def __init__(self, obj: dict[str, Any], source: str):
        self.obj, self.source = obj, source

    def _get(self, key: str, required: bool = False) -> Any:
        # The value, or _ABSENT when the field is missing or null.
        value = self.obj.get(key)
        if value is None:
            if required:
                raise ConfigError(f"{self.source}: missing required field '{key}'")
            return _ABSENT
        return value

    def fail(self, key: str, wanted: str, value: Any) -> ConfigError:
        """The error for a field whose value is not what it must be."""
        return ConfigError(f"{self.source}: field '{key}' must be {wanted}, got {_short(value)}")

    def int(self, key: str, default: Any = None, required: bool = False, minimum: int = 1) -> Any:
        """A whole number >= minimum (1: a size or count)."""
        value = self._get(key, required)
        if value is _ABSENT:
            return default
        if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
            raise self.fail(key, "a positive integer" if minimum == 1 else f"an integer >= {minimum}", value)
        return value

    def number(self, key: str, default: Any = None, positive: bool = False, minimum: float | None = None,
               maximum: float | None = None) -> Any:
        """A finite number (positive, or within [minimum, maximum], when asked)."""
        value = self._get(key)
        if value is _ABSENT:
            return default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise self.fail(key, "a finite number", value)
        if abs(value) > FLOAT32_MAX:  # RoPE tables and norms are computed in float32: it would become inf
            raise self.fail(key, "a number within float32's range", value)
        if positive and value <= 0:
            raise self.fail(key, "a positive number", value)
        if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
            low = "(0" if positive else f"[{minimum}"
            raise self.fail(key, f"a number in {low}, {maximum}]", value)
        return float(value)

    def bool(self, key: str, default: bool) -> bool:
        """true or false."""
        value = self._get(key)
        if value is _ABSENT:
            return default
        if not isinstance(value, bool):
            raise self.fail(key, "true or false", value)
        return value

    def str(self, key: str, default: Any) -> Any:
        """A string."""
        value = self._get(key)
        if value is _ABSENT:
            return default
        if not isinstance(value, str):
            raise self.fail(key, "a string", value)
        return value

    def ids(self, key: str, vocab_size: int, none_below_zero: bool = False) -> list[int]:
        """A token id or a list of them, each in [0, vocab_size) ([] when absent; -1 means none for pad ids)."""
        value = self._get(key)
        values = [] if value is _ABSENT else value if isinstance(value, list) else [value]
        out = []
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int):
                raise self.fail(key, "a token id or a list of ids", value)
            if v < 0 and none_below_zero:
                continue
            if not 0 <= v < vocab_size:
                raise ConfigError(f"{self.source}: field '{key}' has token id {v}, outside the model's "
                                  f"vocabulary of {vocab_size} (vocab_size)")
            out.append(v)
        return out


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


GENERATION_KEYS = ("temperature", "top_p", "top_k", "min_p", "repetition_penalty", "do_sample", "max_new_tokens")


def _check_generation(generation: Any, source: str) -> dict[str, Any]:
    """generation_config.json's sampling defaults, each checked (ConfigError naming the file and field)."""
    if generation is None:
        return {}
    if not isinstance(generation, dict):
        raise ConfigError(f"{source}: expected a JSON object, got {type(generation).__name__}")
    g = _Fields(generation, source)
    g.number("temperature", minimum=0.0, maximum=math.inf)
    g.number("top_p", minimum=0.0, maximum=1.0)
    if generation.get("top_p") == 0:
        raise g.fail("top_p", "in (0, 1]", 0)
    g.int("top_k", minimum=0)
    g.number("min_p", minimum=0.0, maximum=1.0)
    g.number("repetition_penalty", positive=True)
    g.bool("do_sample", False)
    g.int("max_new_tokens")
    return dict(generation)


def _check_architecture(hf: dict[str, Any], source: str) -> None:
    archs = hf.get("architectures")
    if archs is not None:
        if not isinstance(archs, list) or not archs or not all(isinstance(a, str) for a in archs):
            raise ConfigError(f"{source}: field 'architectures' must be a non-empty list of names, got {archs!r}")
        if archs[0] not in SUPPORTED_ARCHITECTURES:
            raise ConfigError(
                f"{source}: unsupported architecture '{archs[0]}' (supported: {', '.join(sorted(SUPPORTED_ARCHITECTURES))})"
            )
    model_type = hf.get("model_type")
    if model_type is not None and not isinstance(model_type, str):
        raise ConfigError(f"{source}: field 'model_type' must be a string, got {model_type!r}")
    if model_type is not None and model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(
            f"{source}: unsupported model_type '{model_type}' (supported: {', '.join(sorted(SUPPORTED_MODEL_TYPES))})"
        )
    if archs is None and model_type is None:
        raise ConfigError(f"{source}: neither 'architectures' nor 'model_type' is set; cannot tell the model kind")


def _parse_rope(hf: dict[str, Any], source: str, max_seq_len: int) -> tuple[float, dict[str, Any] | None]:
    """Return (rope_theta, normalised scaling dict or None) from either config layout, every value checked."""
    params = hf.get("rope_parameters")
    legacy = hf.get("rope_scaling")
    if params is not None and not isinstance(params, dict):
        raise ConfigError(f"{source}: field 'rope_parameters' must be an object, got {_short(params)}")
    if legacy is not None and not isinstance(legacy, dict):
        raise ConfigError(f"{source}: field 'rope_scaling' must be an object, got {_short(legacy)}")
    scaling = dict(params or legacy or {})
    theta = scaling.pop("rope_theta", None)
    theta = _Fields({"rope_theta": hf.get("rope_theta", 10000.0) if theta is None else theta}, source).number(
        "rope_theta", positive=True)
    rope_type = scaling.pop("rope_type", None) or scaling.pop("type", None) or "default"
    scaling.pop("type", None)
    if not isinstance(rope_type, str) or rope_type not in ROPE_TYPES:
        raise ConfigError(
            f"{source}: unsupported rope type {_short(rope_type)} (supported: {', '.join(sorted(ROPE_TYPES))})"
        )
    if rope_type == "default":
        return theta, None
    f = _Fields(scaling, f"{source} (rope scaling)")
    if rope_type in ("llama3", "yarn") and "original_max_position_embeddings" not in scaling:
        # transformers falls back to the model's context length here.
        scaling["original_max_position_embeddings"] = hf.get("original_max_position_embeddings", max_seq_len)
    if "original_max_position_embeddings" in scaling:
        f.int("original_max_position_embeddings")
    if rope_type == "yarn" and scaling.get("factor") is None:
        scaling["factor"] = max_seq_len / scaling["original_max_position_embeddings"]
    for key in ROPE_REQUIRED[rope_type]:
        if scaling.get(key) is None:
            raise ConfigError(f"{source}: rope type '{rope_type}' needs field '{key}' in rope scaling")
    factor = f.number("factor", positive=True)
    if rope_type in ("linear", "dynamic") and factor < 1:
        raise ConfigError(f"{source}: rope scaling 'factor' must be >= 1 for '{rope_type}', got {factor!r}")
    for key in ("low_freq_factor", "high_freq_factor", "attention_factor", "mscale", "mscale_all_dim"):
        f.number(key, positive=key != "mscale_all_dim", minimum=0.0 if key == "mscale_all_dim" else None,
                 maximum=math.inf if key == "mscale_all_dim" else None)
    for key in ("beta_fast", "beta_slow"):
        f.number(key, positive=True)
    if "truncate" in scaling:
        f.bool("truncate", True)
    if rope_type == "llama3" and scaling["high_freq_factor"] <= scaling["low_freq_factor"]:
        raise ConfigError(f"{source}: rope scaling 'high_freq_factor' ({scaling['high_freq_factor']}) must be "
                          f"greater than 'low_freq_factor' ({scaling['low_freq_factor']})")
    scaling["rope_type"] = rope_type
    return theta, scaling


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
    return LlamaConfig.from_hf(hf, generation, source=str(config_path), generation_source=str(gen_path))

"""Describe a checkpoint from its config and safetensors headers, without reading a single tensor.

A safetensors file starts with an 8-byte little-endian header length and a JSON header naming every tensor's
dtype, shape and byte range; that is all `inspect_checkpoint` reads (a 70B checkpoint inspects in a second).
The tensor names and shapes are checked against what the config says the model needs, so inspect also tells
a broken or truncated checkpoint apart from a good one. No torch here.
"""

from __future__ import annotations

import json
import math
import struct
from dataclasses import dataclass
from pathlib import Path

from llamacli.config import LlamaConfig, load_config
from llamacli.errors import UsageError, WeightsError

# Bytes per element of safetensors dtypes, and of the dtypes a model can run in.
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
               "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}
DTYPE_NAMES = {"F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16", "I64": "int64",
               "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
               "F8_E4M3": "float8_e4m3fn", "F8_E5M2": "float8_e5m2"}
RUN_DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
PICKLE_PATTERNS = ("*.bin", "*.pth", "*.pt", "*.ckpt")
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its file header describes it."""

    name: str
    dtype: str  # safetensors spelling: F32, BF16, ...
    shape: tuple[int, ...]
    file: Path

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensors of one safetensors file from its header; checks the byte ranges against the file size."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise WeightsError(f"{path}: corrupt or truncated safetensors header "
                                   f"(header says {n} bytes, file has {size})")
            raw = f.read(n)
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise WeightsError(f"{path}: corrupt safetensors header ({exc})") from None
    data_bytes = size - 8 - n
    out = {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt safetensors header entry for '{name}'") from None
        if dtype not in DTYPE_BYTES:
            raise WeightsError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
        if end - start != math.prod(shape) * DTYPE_BYTES[dtype] or start < 0:
            raise WeightsError(f"{path}: tensor '{name}': byte range does not match its shape and dtype")
        if end > data_bytes:
            raise WeightsError(f"{path}: truncated: tensor '{name}' ends at byte {end} of the data, "
                               f"but the file holds {data_bytes}")
        out[name] = TensorInfo(name, dtype, shape, path)
    return out


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint (from the index when sharded); refuses pickle-only folders."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            files = sorted(set(weight_map.values()))
        except (json.JSONDecodeError, KeyError, TypeError, AttributeError) as exc:
            raise WeightsError(f"{index}: malformed index ({exc.__class__.__name__}: {exc})") from None
        missing = [f for f in files if not (folder / f).is_file()]
        if missing:
            raise WeightsError(f"{index}: shard '{missing[0]}' is missing")
        return [folder / f for f in files]
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        pickles = [p.name for pat in PICKLE_PATTERNS for p in sorted(folder.glob(pat))]
        if pickles:
            raise WeightsError(f"{folder}: only pickle weights ({', '.join(pickles[:3])}); pickle files can run "
                               "code when loaded, so llamacli reads safetensors only")
        raise WeightsError(f"{folder}: no *.safetensors weights found")
    return files


def expected_shapes(c: LlamaConfig) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensor names a Llama with this config needs, with their shapes (tied lm_head excluded)."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    shapes = {"model.embed_tokens.weight": (c.vocab_size, c.dim)}
    for i in range(c.n_layers):
        p = f"model.layers.{i}."
        shapes |= {p + "self_attn.q_proj.weight": (q, c.dim), p + "self_attn.k_proj.weight": (kv, c.dim),
                   p + "self_attn.v_proj.weight": (kv, c.dim), p + "self_attn.o_proj.weight": (c.dim, q)}
        if c.attention_bias:
            shapes |= {p + "self_attn.q_proj.bias": (q,), p + "self_attn.k_proj.bias": (kv,),
                       p + "self_attn.v_proj.bias": (kv,), p + "self_attn.o_proj.bias": (c.dim,)}
        shapes |= {p + "mlp.gate_proj.weight": (c.ffn_dim, c.dim), p + "mlp.up_proj.weight": (c.ffn_dim, c.dim),
                   p + "mlp.down_proj.weight": (c.dim, c.ffn_dim)}
        if c.mlp_bias:
            shapes |= {p + "mlp.gate_proj.bias": (c.ffn_dim,), p + "mlp.up_proj.bias": (c.ffn_dim,),
                       p + "mlp.down_proj.bias": (c.dim,)}
        shapes |= {p + "input_layernorm.weight": (c.dim,), p + "post_attention_layernorm.weight": (c.dim,)}
    shapes["model.norm.weight"] = (c.dim,)
    if not c.tie_embeddings:
        shapes["lm_head.weight"] = (c.vocab_size, c.dim)
    return shapes


def check_tensors(config: LlamaConfig, tensors: dict[str, TensorInfo], folder: Path) -> dict[str, TensorInfo]:
    """The tensors the model uses; raises WeightsError naming a missing, unexpected or mis-shaped one."""
    need = expected_shapes(config)
    have = {n: t for n, t in tensors.items() if not n.endswith(IGNORED_SUFFIXES)}
    if "lm_head.weight" not in need:
        have.pop("lm_head.weight", None)  # tied: a stored copy is ignored, as transformers does
    elif "lm_head.weight" not in have:
        need.pop("lm_head.weight")  # no lm_head stored: the embeddings are used (Llama-3.2 1B/3B)
    missing = [n for n in need if n not in have]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise WeightsError(f"{folder}: missing tensor '{missing[0]}'{more}")
    unexpected = [n for n in have if n not in need]
    if unexpected:
        more = f" (and {len(unexpected) - 1} more)" if len(unexpected) > 1 else ""
        raise WeightsError(f"{have[unexpected[0]].file}: unexpected tensor '{unexpected[0]}'{more} "
                           "(is this a Llama checkpoint?)")
    for name, shape in need.items():
        if have[name].shape != shape:
            raise WeightsError(f"{have[name].file}: tensor '{name}' has shape {list(have[name].shape)}, "
                               f"expected {list(shape)}")
    return have


def kind_of(name: str) -> str:
    """Which part of the model a tensor belongs to: embeddings, attention, mlp, norms or lm_head."""
    if name == "lm_head.weight":
        return "lm_head"
    if "embed_tokens" in name:
        return "embeddings"
    if ".self_attn." in name:
        return "attention"
    if ".mlp." in name:
        return "mlp"
    if "norm" in name:
        return "norms"
    return "other"


def kv_bytes_per_token(config: LlamaConfig, dtype: str) -> int:
    """Bytes of keys and values one position takes in the cache, all layers."""
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * RUN_DTYPE_BYTES[dtype]


def inspect_checkpoint(folder: str | Path, dtype: str = "auto") -> dict:
    """Everything `llamacli inspect` reports, as plain JSON-ready data.

    `dtype` is the dtype the numbers for memory are given in; 'auto' is the checkpoint's own dtype
    (its config's torch_dtype, else the dtype most of its parameters are stored in).
    """
    from llamacli.chat_template import load_chat_template
    from llamacli.errors import LlamaCliError
    from llamacli.tokenizer import load_tokenizer

    folder = Path(folder)
    config = load_config(folder)
    files = weight_files(folder)
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        tensors |= read_header(path)
    used = check_tensors(config, tensors, folder)

    by_kind = {"embeddings": 0, "attention": 0, "mlp": 0, "norms": 0, "lm_head": 0}
    stored: dict[str, int] = {}
    for t in used.values():
        by_kind[kind_of(t.name)] += t.numel
        stored[DTYPE_NAMES[t.dtype]] = stored.get(DTYPE_NAMES[t.dtype], 0) + t.numel
    total = sum(by_kind.values())

    if dtype == "auto":
        dtype = config.torch_dtype if config.torch_dtype in RUN_DTYPE_BYTES else max(stored, key=stored.get)
        if dtype not in RUN_DTYPE_BYTES:
            dtype = "float32"
    elif dtype not in RUN_DTYPE_BYTES:
        raise UsageError(f"unknown dtype '{dtype}' (choose auto, {', '.join(RUN_DTYPE_BYTES)})")
    per_token = kv_bytes_per_token(config, dtype)
    kv_full = per_token * config.context_length
    weights_bytes = total * RUN_DTYPE_BYTES[dtype]

    layers = []
    for i in range(config.n_layers):
        # From the tensors themselves (checked against the config above): rows / head_dim.
        q_rows = used[f"model.layers.{i}.self_attn.q_proj.weight"].shape[0]
        k_rows = used[f"model.layers.{i}.self_attn.k_proj.weight"].shape[0]
        heads, kv_heads = q_rows // config.head_dim, k_rows // config.head_dim
        layers.append({"index": i, "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": config.head_dim,
                       "gqa_group_size": heads // kv_heads})

    try:
        tok = load_tokenizer(folder, extra_eos_ids=config.eos_token_ids)
        tokenizer = {"kind": tok.kind, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                     "eos_ids": list(tok.eos_ids)}
    except LlamaCliError:  # inspect reports a missing tokenizer instead of failing on it
        tokenizer = None
    try:
        has_template = load_chat_template(folder) is not None
    except LlamaCliError:
        has_template = False

    return {
        "path": str(folder),
        "architecture": config.architecture,
        "model_type": config.model_type,
        "num_layers": config.n_layers,
        "hidden_size": config.dim,
        "ffn_dim": config.ffn_dim,
        "vocab_size": config.vocab_size,
        "context_length": config.context_length,
        "max_position_embeddings": config.max_seq_len,
        "num_heads": config.n_heads,
        "num_kv_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "tie_embeddings": config.tie_embeddings,
        "rope": {"theta": config.rope_theta, "type": config.rope_type, "scaling": config.rope_scaling},
        "parameters": total,
        "parameters_by_kind": by_kind,
        "disk": {"files": [p.name for p in files], "bytes": sum(p.stat().st_size for p in files),
                 "dtypes": stored},
        "dtype": dtype,
        "kv_cache_bytes_per_token": per_token,
        "kv_cache_bytes_full_context": kv_full,
        "weights_bytes": weights_bytes,
        "memory_estimate_bytes": weights_bytes + kv_full,
        "layers": layers,
        "tokenizer": tokenizer,
        "bos_token_id": tokenizer["bos_id"] if tokenizer else config.bos_token_id,
        "eos_token_ids": tokenizer["eos_ids"] if tokenizer else list(config.eos_token_ids),
        "chat_template": has_template,
    }

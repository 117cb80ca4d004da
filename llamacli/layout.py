"""The one table of what a Llama checkpoint holds: tensor names, shapes and kinds, dtypes, weight files.

Everything that reads a checkpoint (weights, inspect, gguf, bench, the KV-cache size) takes its facts from
here, so that `inspect` accepts exactly what `generate` loads. A safetensors file starts with an 8-byte
little-endian header length and a JSON header naming every tensor's dtype, shape and byte range; that is all
this module reads, so a checkpoint is checked against its config before a single tensor (or module) exists.
Pickle weights are refused: they can run code when loaded. No torch here.
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, NamedTuple

from llamacli.config import LlamaConfig
from llamacli.errors import WeightsError
from llamacli.quantization import Quantization, matrix_bits, read_quantization

INDEX_NAME = "model.safetensors.index.json"
PICKLE_PATTERNS = ("*.bin", "*.pth", "*.pt", "*.ckpt")
# Buffers older transformers versions saved; they are recomputed from the config, never loaded.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)
MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit
KINDS = ("embeddings", "attention", "mlp", "norms", "lm_head")


# ---------------------------------------------------------------------------------------------
# Dtypes


@dataclass(frozen=True)
class DType:
    """One element type: torch's name, the safetensors spelling, its size, and whether a model runs in it."""

    name: str  # torch's spelling: float32, bfloat16, ...
    safetensors: str  # F32, BF16, ...
    nbytes: int
    floating: bool
    runnable: bool  # a model can be loaded and run in it (--dtype)


_DTYPE_LIST = (
    DType("float32", "F32", 4, True, True),
    DType("bfloat16", "BF16", 2, True, True),
    DType("float16", "F16", 2, True, True),
    DType("float64", "F64", 8, True, False),
    DType("float8_e4m3fn", "F8_E4M3", 1, True, False),
    DType("float8_e5m2", "F8_E5M2", 1, True, False),
    DType("int64", "I64", 8, False, False),
    DType("int32", "I32", 4, False, False),
    DType("int16", "I16", 2, False, False),
    DType("int8", "I8", 1, False, False),
    DType("uint8", "U8", 1, False, False),
    DType("bool", "BOOL", 1, False, False),
)
DTYPES: dict[str, DType] = {d.name: d for d in _DTYPE_LIST}
SAFETENSORS_DTYPES: dict[str, DType] = {d.safetensors: d for d in _DTYPE_LIST}
RUN_DTYPES: tuple[str, ...] = tuple(d.name for d in _DTYPE_LIST if d.runnable)  # float32, bfloat16, float16


def dtype_bytes(name: str) -> int:
    """Bytes per element of a dtype named as torch names it ('float32', or 'torch.float32')."""
    return DTYPES[name.removeprefix("torch.")].nbytes


def kv_bytes_per_token(config: LlamaConfig, dtype: str) -> int:
    """Bytes of keys and values one position takes in the cache, all layers (dtype as torch names it)."""
    return 2 * config.n_layers * config.n_kv_heads * config.head_dim * dtype_bytes(dtype)


# ---------------------------------------------------------------------------------------------
# The expected tensors of a config


class Expected(NamedTuple):
    """One tensor a model with a given config needs: its shape and which part of the model it is."""

    shape: tuple[int, ...]
    kind: str  # one of KINDS
    dtype: tuple[str, ...] | None = None  # the safetensors dtypes it may have (quantized tensors); None: any float


def _layer_tensors(c: LlamaConfig, i: int) -> dict[str, Expected]:
    """The tensors of decoder layer i, in transformers' state-dict order."""
    q, kv = c.n_heads * c.head_dim, c.n_kv_heads * c.head_dim
    p = f"model.layers.{i}."
    out = {}
    for proj, rows, cols in (("q_proj", q, c.dim), ("k_proj", kv, c.dim), ("v_proj", kv, c.dim), ("o_proj", c.dim, q)):
        out[f"{p}self_attn.{proj}.weight"] = Expected((rows, cols), "attention")
        if c.attention_bias:
            out[f"{p}self_attn.{proj}.bias"] = Expected((rows,), "attention")
    for proj, rows, cols in (("gate_proj", c.ffn_dim, c.dim), ("up_proj", c.ffn_dim, c.dim),
                             ("down_proj", c.dim, c.ffn_dim)):
        out[f"{p}mlp.{proj}.weight"] = Expected((rows, cols), "mlp")
        if c.mlp_bias:
            out[f"{p}mlp.{proj}.bias"] = Expected((rows,), "mlp")
    out[f"{p}input_layernorm.weight"] = Expected((c.dim,), "norms")
    out[f"{p}post_attention_layernorm.weight"] = Expected((c.dim,), "norms")
    return out


def expected_tensors(config: LlamaConfig, layers: Iterable[int] | None = None,
                     lm_head: bool | None = None, quant: "Quantization | None" = None) -> dict[str, Expected]:
    """The checkpoint tensors a Llama with this config needs: name -> (shape, kind), in state-dict order.

    `layers` restricts the table to some layer indices (default: all). `lm_head` says whether
    `lm_head.weight` is part of it; by default it is unless the embeddings are tied. With `quant`, the
    matrices are in the quantized layout (`quantized_table`).
    """
    table = {"model.embed_tokens.weight": Expected((config.vocab_size, config.dim), "embeddings")}
    for i in range(config.n_layers) if layers is None else layers:
        table |= _layer_tensors(config, i)
    table["model.norm.weight"] = Expected((config.dim,), "norms")
    if (not config.tie_embeddings) if lm_head is None else lm_head:
        table["lm_head.weight"] = Expected((config.vocab_size, config.dim), "lm_head")
    return table if quant is None else quantized_table(table, quant)


# ---------------------------------------------------------------------------------------------
# Quantized checkpoints (the tensors llamacli.quant writes and reads)

# Per matrix X: int8 -> X.weight I8 (out, in), X.scales F32 (out,), w = q * scale (symmetric per row);
# int4 -> X.weight U8 (out, in / 2) two values in [0, 15] per byte, the even column in the low nibble,
# X.scales and X.biases (out, in / group) in BF16 (llamacli quantize), F16 or F32 (exact GGUF scales),
# w = q * scale + bias (mlx-lm's names and affine form). Which bits each matrix has: `quantization.matrix_bits`.
INT4_SCALE_DTYPES = ("BF16", "F16", "F32")


def is_quantized_matrix(name: str, expected: Expected) -> bool:
    """Whether a tensor of the float table is a matrix the quantized layout replaces (all 2-D weights)."""
    return name.endswith(".weight") and len(expected.shape) == 2


def quantized_table(table: dict[str, Expected], quant: Quantization) -> dict[str, Expected]:
    """The float table with each matrix replaced by its quantized tensors (weight, scales[, biases])."""
    out = {}
    for name, e in table.items():
        if not is_quantized_matrix(name, e):
            out[name] = e
            continue
        prefix, (rows, cols) = name.removesuffix(".weight"), e.shape
        if matrix_bits(name, quant) == 8:
            out[name] = Expected((rows, cols), e.kind, ("I8",))
            out[f"{prefix}.scales"] = Expected((rows,), e.kind, ("F32",))
            continue
        g = quant.group_size
        if cols % g:
            raise WeightsError(f"tensor '{name}' has {cols} input columns, which group size {g} does not divide")
        out[name] = Expected((rows, cols // 2), e.kind, ("U8",))
        out[f"{prefix}.scales"] = Expected((rows, cols // g), e.kind, INT4_SCALE_DTYPES)
        out[f"{prefix}.biases"] = Expected((rows, cols // g), e.kind, INT4_SCALE_DTYPES)
    return out


# ---------------------------------------------------------------------------------------------
# Weight files and their headers


@dataclass(frozen=True)
class TensorInfo:
    """One tensor as its file header describes it."""

    name: str
    dtype: str  # safetensors spelling: F32, BF16, ...
    shape: tuple[int, ...]
    file: Path
    offset: int = 0  # where its bytes start in the file

    @property
    def numel(self) -> int:
        """Number of elements."""
        return math.prod(self.shape)


def _read_index(index: Path) -> dict[str, str]:
    """The weight_map of a sharded checkpoint's index: tensor name -> shard file name."""
    try:
        weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(f, str) for f in weight_map.values()):
            raise TypeError("weight_map is not an object of file names")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as exc:
        raise WeightsError(f"{index}: malformed index ({exc.__class__.__name__}: {exc})") from None
    return weight_map


def _check_inside(folder: Path, path: Path, what: str) -> None:
    """Refuse a weight file that resolves (through symlinks) outside the checkpoint folder. The one exception is
    a hub snapshot (`<repo>/snapshots/<rev>/`), whose files are links into the repo's own `<repo>/blobs/`."""
    real, home = path.resolve(), folder.resolve()
    allowed = [home]
    if home.parent.name == "snapshots":
        allowed.append(home.parent.parent / "blobs")
    if not any(real.is_relative_to(a) for a in allowed):
        raise WeightsError(f"{what} resolves to {real}, outside the checkpoint folder {home}")


def weight_files(folder: Path) -> list[Path]:
    """The safetensors files of a checkpoint (from the index when sharded); refuses pickle-only folders."""
    folder = Path(folder)
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = _read_index(index)
        holder = {}
        for name, file in weight_map.items():
            holder.setdefault(file, name)
        for file, name in sorted(holder.items()):
            # Lexical, not resolved: hub snapshots hold symlinks into a blob store beside the folder.
            if Path(file).is_absolute() or os.path.normpath(file).split(os.sep)[0] == "..":
                raise WeightsError(f"{index}: shard '{file}' (holding '{name}') is outside the checkpoint folder")
            if not (folder / file).is_file():
                raise WeightsError(f"{index}: shard '{file}' (holding '{name}') is missing")
            _check_inside(folder, folder / file, f"{index}: shard '{file}' (holding '{name}')")
        return [folder / f for f in sorted(holder)]
    files = sorted(folder.glob("*.safetensors"))
    for path in files:
        _check_inside(folder, path, f"{path}")
    if not files:
        pickles = [p.name for pat in PICKLE_PATTERNS for p in sorted(folder.glob(pat))]
        if pickles:
            raise WeightsError(
                f"{folder}: only pickle weights ({', '.join(pickles[:3])}); pickle files can run code when loaded, "
                "so llamacli reads safetensors only. Convert once with transformers: "
                "AutoModelForCausalLM.from_pretrained(dir).save_pretrained(dir, safe_serialization=True)"
            )
        raise WeightsError(f"{folder}: no *.safetensors weights found")
    return files


def read_header(path: Path) -> dict[str, TensorInfo]:
    """Tensors of one safetensors file from its header, checked as safetensors itself checks them."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise WeightsError(f"{path}: truncated safetensors file ({size} bytes, no header)")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER_BYTES or 8 + n > size:
                raise WeightsError(f"{path}: not a readable safetensors file: corrupt or truncated safetensors "
                                   f"header (header says {n} bytes, file has {size})")
            raw = f.read(n)
    except OSError as exc:
        raise WeightsError(f"{path}: cannot read ({exc.strerror or exc})") from None
    try:
        if not raw.startswith(b"{"):
            raise ValueError("does not start with '{'")
        header = json.loads(raw.decode("utf-8"))
        if not isinstance(header, dict):
            raise ValueError("not an object")
    except (UnicodeDecodeError, ValueError) as exc:
        raise WeightsError(f"{path}: not a readable safetensors file: corrupt safetensors header ({exc})") from None
    data_bytes = size - 8 - n
    out, ranges = {}, []
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (start, end) = entry["dtype"], tuple(int(d) for d in entry["shape"]), entry["data_offsets"]
            start, end = int(start), int(end)
        except (KeyError, TypeError, ValueError):
            raise WeightsError(f"{path}: corrupt safetensors header entry for '{name}'") from None
        if dtype not in SAFETENSORS_DTYPES:
            raise WeightsError(f"{path}: tensor '{name}' has unsupported dtype {dtype}")
        if end - start != math.prod(shape) * SAFETENSORS_DTYPES[dtype].nbytes or start < 0 or min(shape, default=0) < 0:
            raise WeightsError(f"{path}: tensor '{name}': byte range does not match its shape and dtype")
        if end > data_bytes:
            raise WeightsError(f"{path}: truncated: tensor '{name}' ends at byte {end} of the data, "
                               f"but the file holds {data_bytes}")
        out[name] = TensorInfo(name, dtype, shape, path, 8 + n + start)
        ranges.append((start, end, name))
    # safetensors refuses gaps, overlaps and trailing bytes: tensors must tile the data exactly.
    at = 0
    for start, end, name in sorted(ranges):
        if start != at:
            raise WeightsError(f"{path}: not a readable safetensors file: tensor '{name}' starts at byte {start} "
                               f"of the data, expected {at}")
        at = end
    if at != data_bytes:
        raise WeightsError(f"{path}: not a readable safetensors file: its tensors cover {at} of {data_bytes} "
                           "data bytes")
    return out


def read_tensors(folder: Path, files: list[Path] | None = None) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint (name -> header entry, with its file), from its weight files' headers.

    A tensor stored in two files, or an index that disagrees with its shards' headers, is refused.
    """
    folder = Path(folder)
    files = weight_files(folder) if files is None else files
    tensors: dict[str, TensorInfo] = {}
    for path in files:
        for name, info in read_header(path).items():
            if name in tensors:
                raise WeightsError(f"{path}: tensor '{name}' is also stored in {tensors[name].file.name}")
            tensors[name] = info
    index = folder / INDEX_NAME
    if index.is_file():
        weight_map = _read_index(index)
        for name, file in weight_map.items():
            if name not in tensors or tensors[name].file != folder / file:
                raise WeightsError(f"{index}: lists tensor '{name}' in '{file}', which does not hold it")
        unlisted = [n for n in tensors if n not in weight_map and not n.endswith(IGNORED_SUFFIXES)]
        if unlisted:
            first = tensors[unlisted[0]]
            raise WeightsError(f"{index}: does not list tensor '{first.name}' stored in {first.file.name}")
    return tensors


# ---------------------------------------------------------------------------------------------
# Checking a checkpoint against its config

_LAYER_INDEX = re.compile(r"model\.layers\.(\d+)\.")


def _more(items: list, count: int | None = None) -> str:
    extra = (len(items) if count is None else count) - 1
    return f" (and {extra} more)" if extra > 0 else ""


def check_tensors(config: LlamaConfig, tensors: dict[str, TensorInfo], folder: Path,
                  quant: Quantization | None = None) -> dict[str, TensorInfo]:
    """The tensors the model uses; raises WeightsError naming a missing, unexpected or mis-shaped one.

    Tied embeddings make a stored `lm_head.weight` unused (as transformers does); an untied config without
    one uses the embeddings (Llama-3.2 1B/3B). The work is bounded by what is stored, not by what the config
    claims: a config of a million layers over a two-layer file fails on layer 2 without listing the rest.
    """
    folder = Path(folder)
    have = {n: t for n, t in tensors.items() if not n.endswith(IGNORED_SUFFIXES)}
    head = not config.tie_embeddings and "lm_head.weight" in have
    if not head:
        for suffix in ("weight", "scales", "biases"):
            have.pop(f"lm_head.{suffix}", None)

    stored = {int(m.group(1)) for n in have if (m := _LAYER_INDEX.match(n))}
    layers = sorted(i for i in stored if i < config.n_layers)
    absent = config.n_layers - len(layers)  # layers of which not one tensor is stored
    if absent:
        # Only the first fully absent layer is listed; the others are counted.
        first = next(i for i in range(config.n_layers) if i not in stored)
        layers = sorted(layers + [first])
    need = expected_tensors(config, layers=layers, lm_head=head, quant=quant)
    missing = [n for n in need if n not in have]
    if missing:
        count = len(missing) + max(absent - 1, 0) * len(_layer_tensors(config, 0))
        where = folder / INDEX_NAME if (folder / INDEX_NAME).is_file() else folder
        raise WeightsError(f"{where}: missing tensor '{missing[0]}'{_more(missing, count)}")
    unexpected = [n for n in have if n not in need]
    if unexpected:
        raise WeightsError(f"{have[unexpected[0]].file}: unexpected tensor '{unexpected[0]}'{_more(unexpected)} "
                           "(is this a Llama checkpoint?)")
    for name, (shape, _, dtype) in need.items():
        t = have[name]
        if t.shape != shape:
            raise WeightsError(f"{t.file}: tensor '{name}' has shape {list(t.shape)}, expected {list(shape)}")
        if dtype is not None and t.dtype not in dtype:
            raise WeightsError(f"{t.file}: tensor '{name}' is stored as {t.dtype}, the quantized layout has "
                               f"{' or '.join(dtype)}")
        if dtype is None and not SAFETENSORS_DTYPES[t.dtype].floating:
            raise WeightsError(f"{t.file}: tensor '{name}' is stored as {SAFETENSORS_DTYPES[t.dtype].name}, "
                               "not a floating-point type")
    return {n: t for n, t in have.items() if n in need}  # in file order, as stored


def checkpoint_tensors(config: LlamaConfig, folder: Path) -> dict[str, TensorInfo]:
    """The checked tensors a model with this config loads from a checkpoint folder (headers only)."""
    return check_tensors(config, read_tensors(folder), folder, read_quantization(folder))

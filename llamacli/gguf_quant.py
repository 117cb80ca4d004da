"""GGUF quantized matrices -> llamacli's stored int8 / int4 layout (`quantization.QUANT_LAYOUT`), in numpy.

Each GGUF row is a run of blocks along the input dimension, so a row maps to a row:

- exactly, onto int4 groups of 32 (w = q * scale + bias, q in [0, 15]):
  Q4_0 (block of 32: d fp16, 16 bytes of nibbles; w = d * (q - 8)) -> scale d, bias -8 d (fp16 values);
  Q4_1 (block of 32: d, m fp16, 16 bytes of nibbles; w = d * q + m) -> scale d, bias m (fp16 values);
  Q4_K (superblock of 256: d, dmin fp16, 12 bytes of 6-bit scales and mins for 8 sub-blocks of 32, 128 bytes
  of nibbles; w = d * sc * q - dmin * m) -> scale d * sc, bias -dmin * m (float32: the products are exact there).
  In Q4_0 / Q4_1 byte j holds elements j (low nibble) and j + 16 (high) of its block; in Q4_K byte j of each
  32-byte run holds element j of one sub-block (low nibble) and of the next (high).
- by requantizing, onto int8 per row: every other type gguf can dequantize (Q8_0, Q5_*, Q6_K, Q2_K, Q3_K,
  the IQ types) and float matrices beside quantized ones, dequantized to float32 and rounded to the row's
  scale (max |w| / 127), the rule of `quant.quantize.quantize_int8`. The error this adds is measured in README.

No torch here: the arrays go into safetensors as numpy.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from llamacli.errors import WeightsError

GROUP_SIZE = 32  # the int4 group the exact types map onto
FLOAT_TYPES = ("F32", "F16", "BF16")
EXACT_TYPES = ("Q4_0", "Q4_1", "Q4_K")
_NOT_WEIGHTS = ("I8", "I16", "I32", "I64", "F64")
_FP16_MAX = float(np.finfo(np.float16).max)
BLOCK_ELEMENTS = 1 << 20  # rows are mapped in blocks of about this many values


class Mapped(NamedTuple):
    """One matrix in the stored layout: int8 (rows, cols) + float32 scales (rows,), or packed uint8
    (rows, cols / 2) + scales and biases (rows, cols / 32) in float16 or float32."""

    bits: int
    weight: np.ndarray
    scales: np.ndarray
    biases: np.ndarray | None

    def arrays(self, prefix: str) -> dict[str, np.ndarray]:
        """The checkpoint tensors of this matrix under `prefix` (its HF name without `.weight`)."""
        out = {f"{prefix}.weight": self.weight, f"{prefix}.scales": self.scales}
        if self.biases is not None:
            out[f"{prefix}.biases"] = self.biases
        return out

    def map_rows(self, fn) -> "Mapped":
        """The same matrix with `fn` applied to the rows of every array (a row permutation keeps it exact)."""
        return Mapped(self.bits, *(None if a is None else np.ascontiguousarray(fn(a)) for a in self[1:]))


def type_name(qtype: int) -> str:
    """The GGML type's name (Q4_K, F16, ...)."""
    from gguf import GGMLQuantizationType

    return GGMLQuantizationType(qtype).name


def bits_for(qtype: int) -> int:
    """The bits a matrix of this GGML type is stored in: 4 for the exactly mapped types, else 8."""
    return 4 if type_name(qtype) in EXACT_TYPES else 8


def map_matrix(data: np.ndarray, qtype: int, shape: tuple[int, int], name: str) -> Mapped:
    """A GGUF matrix (its raw `data` as the reader gives it, (rows, bytes) for block types) in the stored layout;
    `shape` is (rows, cols) and `name` the GGUF tensor name for errors. Mapped a block of rows at a time, so
    that the temporaries (unpacked values, float copies) stay small next to the matrix."""
    rows, cols = shape
    step = max(1, BLOCK_ELEMENTS // max(1, cols))
    parts = [_map_rows(data[r:r + step], qtype, (min(step, rows - r), cols), name) for r in range(0, rows, step)]
    biases = None if parts[0].biases is None else np.concatenate([p.biases for p in parts])
    return Mapped(parts[0].bits, np.concatenate([p.weight for p in parts]), np.concatenate([p.scales for p in parts]),
                  biases)


def _map_rows(data: np.ndarray, qtype: int, shape: tuple[int, int], name: str) -> Mapped:
    """Some whole rows of a matrix: the exact int4 mapping of their blocks, or int8 of their dequantized values."""
    kind, (rows, cols) = type_name(qtype), shape
    if kind in EXACT_TYPES:
        blocks = np.asarray(data, dtype=np.uint8).reshape(rows, -1)
        return {"Q4_0": _q4_0, "Q4_1": _q4_1, "Q4_K": _q4_k}[kind](blocks, rows, cols)
    return requantize_int8(dequantize(data, qtype, shape, name))


def pack_int4(q: np.ndarray) -> np.ndarray:
    """(rows, cols) values in [0, 15] -> (rows, cols / 2) uint8, the even column in the low nibble."""
    return (q[:, 0::2] | (q[:, 1::2] << 4)).astype(np.uint8)


def _fp16(raw: np.ndarray) -> np.ndarray:
    """(..., 2) little-endian bytes -> (...) float16."""
    return np.ascontiguousarray(raw).view("<f2")[..., 0]


def _q4_0(blocks: np.ndarray, rows: int, cols: int) -> Mapped:
    b = blocks.reshape(rows, cols // 32, 18)
    d = _fp16(b[..., 0:2])
    qs = b[..., 2:]
    q = np.concatenate((qs & 0xF, qs >> 4), axis=-1).reshape(rows, cols)
    # -8 d is an fp16 value too, unless it overflows fp16 (|d| > 8188): then both go as float32.
    store = np.float16 if float(np.abs(d.astype(np.float32)).max(initial=0)) * 8 <= _FP16_MAX else np.float32
    return Mapped(4, pack_int4(q), d.astype(store), (d.astype(np.float32) * -8).astype(store))


def _q4_1(blocks: np.ndarray, rows: int, cols: int) -> Mapped:
    b = blocks.reshape(rows, cols // 32, 20)
    qs = b[..., 4:]
    q = np.concatenate((qs & 0xF, qs >> 4), axis=-1).reshape(rows, cols)
    return Mapped(4, pack_int4(q), _fp16(b[..., 0:2]).copy(), _fp16(b[..., 2:4]).copy())


def _k_scales_mins(s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Q4_K's 12 bytes (..., 12) -> the 8 sub-blocks' 6-bit scales and mins, each (..., 8): sub-blocks 0-3 in
    the low 6 bits of bytes 0-3 / 4-7; sub-blocks 4-7 in the nibbles of bytes 8-11 and the top 2 bits of 0-7."""
    low_sc, low_m = s[..., 0:4] & 63, s[..., 4:8] & 63
    high_sc = (s[..., 8:12] & 0xF) | ((s[..., 0:4] >> 6) << 4)
    high_m = (s[..., 8:12] >> 4) | ((s[..., 4:8] >> 6) << 4)
    return np.concatenate((low_sc, high_sc), -1), np.concatenate((low_m, high_m), -1)


def _q4_k(blocks: np.ndarray, rows: int, cols: int) -> Mapped:
    b = blocks.reshape(rows, cols // 256, 144)
    d, dmin = _fp16(b[..., 0:2]).astype(np.float32), _fp16(b[..., 2:4]).astype(np.float32)
    sc, m = _k_scales_mins(b[..., 4:16])
    qs = b[..., 16:].reshape(rows, cols // 256, 4, 1, 32)  # 4 runs of 32 bytes, each 2 sub-blocks
    q = np.concatenate((qs & 0xF, qs >> 4), axis=3).reshape(rows, cols)
    scales = (d[..., None] * sc).reshape(rows, cols // 32)
    biases = -(dmin[..., None] * m).reshape(rows, cols // 32)
    return Mapped(4, pack_int4(q), scales.astype(np.float32), biases.astype(np.float32))


def dequantize(data: np.ndarray, qtype: int, shape: tuple[int, ...], name: str) -> np.ndarray:
    """A GGUF tensor as float32 of `shape` (row-major, HF), by gguf's own dequantizer; WeightsError naming the
    tensor for a type that holds no weights or that gguf cannot dequantize."""
    from gguf.quants import dequantize as gguf_dequantize

    kind, dims = type_name(qtype), " x ".join(map(str, shape))
    if kind in _NOT_WEIGHTS:
        raise WeightsError(f"tensor {name!r} ({dims}) has type {kind}, which is not a supported weight type")
    try:
        values = np.asarray(gguf_dequantize(data, qtype), dtype=np.float32).reshape(shape)
    except NotImplementedError:
        raise WeightsError(f"tensor {name!r} ({dims}) has type {kind} (GGML type {int(qtype)}), which gguf "
                           "cannot dequantize and llamacli does not map") from None
    # F32 tensors are read-only views of the mapped file: own a copy, as every other type already does.
    return values if values.flags.writeable else values.copy()


def requantize_int8(w: np.ndarray) -> Mapped:
    """Symmetric per-row int8 of a float32 matrix: scale = max |w| / 127 per row, q = round(w / scale)."""
    scales = np.maximum(np.abs(w).max(axis=1) / np.float32(127), np.finfo(np.float32).tiny).astype(np.float32)
    return Mapped(8, np.clip(np.rint(w / scales[:, None]), -127, 127).astype(np.int8), scales, None)

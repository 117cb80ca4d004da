"""Quantize a float matrix into the stored layout of a quantized checkpoint, and dequantize it back.

The layout (`quantization.QUANT_LAYOUT`) is the one a quantized safetensors checkpoint holds, per matrix `X`:

- int8: `X.weight` int8 (out, in), symmetric per row; `X.scales` float32 (out,); w = q * scale.
- int4: `X.weight` uint8 (out, in / 2), two values in [0, 15] per byte, the even column in the low nibble;
  `X.scales` and `X.biases` (out, in / group), bfloat16 as quantized here (float16 or float32 as mapped from a
  GGUF); w = q * scale + bias (mlx-lm's and GGUF Q4_1's affine form, with mlx-lm's tensor names). Raw values,
  not torch's CPU-packed layout, which depends on the machine.

Matrices are quantized part by part (q, k, v separately, as stored); per-row and per-group schemes do not
mix rows, so concatenating quantized parts equals quantizing the fused matrix.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from llamacli.errors import UsageError

INT4_GROUP_SIZES = (32, 64, 128)
INT4_SCALE_DTYPE = torch.bfloat16


class QuantizedTensor(NamedTuple):
    """One matrix in the stored layout: bits, q (int8 (out, in) or packed uint8 (out, in / 2)), scales, biases."""

    bits: int
    q: torch.Tensor
    scales: torch.Tensor
    biases: torch.Tensor | None  # int4 only
    group_size: int | None  # int4 only

    def tensors(self, prefix: str) -> dict[str, torch.Tensor]:
        """The checkpoint tensors of this matrix under `prefix` (e.g. 'model.layers.0.self_attn.q_proj')."""
        out = {f"{prefix}.weight": self.q, f"{prefix}.scales": self.scales}
        if self.biases is not None:
            out[f"{prefix}.biases"] = self.biases
        return out


# Rows are quantized in blocks of about this many elements, so the float temporaries stay small next to the
# matrix (a 128k x 4096 embedding table would otherwise take several float copies of itself at once).
BLOCK_ELEMENTS = 1 << 20


def _row_blocks(w: torch.Tensor):
    rows = max(1, BLOCK_ELEMENTS // max(1, w.shape[1]))
    for start in range(0, w.shape[0], rows):
        yield start, w[start:start + rows]


def quantize_int8(w: torch.Tensor, row_max: torch.Tensor | None = None) -> QuantizedTensor:
    """Symmetric per-row int8: scale = max |w| / 127 per row, q = round(w / scale) in [-127, 127].

    `row_max` (rows,): the max |w| of each whole row when w holds only some of its columns (a tensor-parallel
    rank's shard of o / down), so that the shard is quantized exactly as its columns of the whole matrix are."""
    qs, ss = [], []
    for start, block in _row_blocks(w.detach()):
        block = block.float()
        amax = block.abs().amax(dim=1) if row_max is None else row_max[start:start + block.shape[0]].float()
        scales = (amax / 127).clamp(min=torch.finfo(torch.float32).tiny)  # (rows,)
        qs.append(torch.round(block / scales[:, None]).clamp(-127, 127).to(torch.int8))
        ss.append(scales)
    return QuantizedTensor(8, torch.cat(qs), torch.cat(ss), None, None)


def check_group_size(name: str, shape: tuple[int, ...], group_size: int) -> None:
    """UsageError unless `group_size` is one we offer and divides the tensor's input dimension (and is even)."""
    if group_size not in INT4_GROUP_SIZES:
        raise UsageError(f"--group-size {group_size} is not supported (choose {', '.join(map(str, INT4_GROUP_SIZES))})")
    if shape[1] % group_size:
        raise UsageError(f"tensor '{name}' has {shape[1]} input columns, which group size {group_size} does not "
                         f"divide ({shape[1]} % {group_size} = {shape[1] % group_size}); try another --group-size")


def quantize_int4(w: torch.Tensor, group_size: int = 32, name: str = "weight") -> QuantizedTensor:
    """Asymmetric int4 per group of `group_size` columns: w ~ q * scale + bias with q in [0, 15]."""
    check_group_size(name, tuple(w.shape), group_size)
    qs, ss, bs = [], [], []
    for _, block in _row_blocks(w.detach()):
        N, K = block.shape
        g = block.float().reshape(N, K // group_size, group_size)  # (rows, groups, group)
        lo, hi = g.amin(-1), g.amax(-1)
        scales = ((hi - lo) / 15).to(INT4_SCALE_DTYPE)
        scales = torch.where(scales == 0, torch.ones_like(scales), scales)  # a constant group: q = 0, w = bias
        biases = lo.to(INT4_SCALE_DTYPE)
        q = torch.round((g - biases.float()[..., None]) / scales.float()[..., None]).clamp(0, 15).to(torch.uint8)
        qs.append(pack_int4(q.view(N, K)))
        ss.append(scales)
        bs.append(biases)
    return QuantizedTensor(4, torch.cat(qs), torch.cat(ss), torch.cat(bs), group_size)


def quantize_matrix(w: torch.Tensor, bits: int, group_size: int | None, name: str = "weight",
                    row_max: torch.Tensor | None = None) -> QuantizedTensor:
    """`quantize_int8` (with its `row_max`) or `quantize_int4` by bits."""
    if bits == 8:
        return quantize_int8(w, row_max)
    if bits == 4:
        return quantize_int4(w, group_size or 32, name)
    raise UsageError(f"unsupported bits {bits} (choose 8 or 4)")


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """(out, in) values in [0, 15] -> (out, in / 2) uint8, the even column in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """(out, in / 2) uint8 -> (out, in) uint8 values in [0, 15]."""
    N, half = packed.shape
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).view(N, 2 * half)


def dequantize(t: QuantizedTensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The float (out, in) matrix a stored quantized tensor stands for, computed in float32."""
    if t.bits == 8:
        return (t.q.float() * t.scales.float()[:, None]).to(dtype)
    return dequantize_int4(unpack_int4(t.q), t.scales, t.biases, t.group_size, dtype)


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, group_size: int,
                    dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(out, in) values in [0, 15] with (out, in / group) scales and biases -> q * scale + bias in float32."""
    N, K = q.shape
    g = q.float().view(N, K // group_size, group_size)
    return (g * scales.float()[..., None] + biases.float()[..., None]).view(N, K).to(dtype)


def dequantize_rows(t: QuantizedTensor, ids: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Rows `ids` (n,) of a stored matrix, dequantized to (n, in) in `dtype` (a quantized embedding lookup)."""
    biases = None if t.biases is None else t.biases[ids]
    return dequantize(t._replace(q=t.q[ids], scales=t.scales[ids], biases=biases), dtype)


def concat(parts: list[QuantizedTensor]) -> QuantizedTensor:
    """Quantized matrices that share their input, fused along out (q/k/v, gate/up)."""
    if len(parts) == 1:
        return parts[0]
    p0 = parts[0]
    biases = None if p0.biases is None else torch.cat([p.biases for p in parts])
    return QuantizedTensor(p0.bits, torch.cat([p.q for p in parts]), torch.cat([p.scales for p in parts]), biases,
                           p0.group_size)

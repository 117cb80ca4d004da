"""The int8 and int4 weight formats: model/linear's `LinearFormat` over quantized weights.

- `Int8Rows`: symmetric per-row int8. On a CPU one product of a few rows runs torch's
  `_weight_int8pack_mm` (A (M, K) float32/bfloat16/float16 contiguous, B int8 (N, K), scales (N,) in A's dtype;
  any N; it has an AVX512 path and a generic one, both right). Elsewhere (CUDA, MPS, many rows, a torch without
  the op) it dequantizes the matrix in the input's dtype and multiplies: the same result up to float rounding.
- `Int4Groups`: affine int4 per group of 32/64/128 columns. On a CPU, when N is a multiple of 16 (the op refuses
  others), the weight is packed once by `_convert_weight_to_int4pack_for_cpu` and multiplied by
  `_weight_int4pack_mm_for_cpu` (float32/bfloat16/float16 A, scales and zeros (K / group, N, 2) in A's dtype,
  w = (q - 8) * scale + zero); elsewhere it dequantizes and multiplies.
"""

from __future__ import annotations

import functools

import torch

from llamacli.model.linear import Concatenated, LinearFormat
from llamacli.quant.quantize import QuantizedTensor, concat, dequantize, unpack_int4

# Above this many rows (prefill) the int8 kernel loses to dequantize + one BLAS product, which reads the
# int8 matrix once and multiplies at BLAS speed (SmolLM2 3072x576, 2 threads: 128 rows 440 ms kernel vs 16 ms).
INT8_KERNEL_ROWS_MAX = 8
INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"


@functools.cache
def int8_kernel_ok(dtype: torch.dtype) -> bool:
    """Whether this torch has a right CPU `_weight_int8pack_mm` for inputs of `dtype`."""
    try:
        w = torch.arange(-16, 16, dtype=torch.int8).view(2, 16)
        x = (torch.arange(32, dtype=torch.float32).view(2, 16) / 8).to(dtype)
        s = torch.tensor([0.5, 0.25], dtype=dtype)
        got = torch.ops.aten._weight_int8pack_mm(x, w, s)
        return bool(torch.allclose(got.float(), x.float() @ (w.float() * s.float()[:, None]).t(), rtol=2e-2))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@functools.cache
def int4_kernel_ok(dtype: torch.dtype) -> bool:
    """Whether this torch has a right CPU int4 pack + `_weight_int4pack_mm_for_cpu` for inputs of `dtype`."""
    try:
        q = (torch.arange(16 * 32) % 16).view(16, 32).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        sz = torch.stack((torch.full((1, 16), 0.5), torch.full((1, 16), 0.25)), -1).to(dtype)  # (groups, N, 2)
        x = (torch.arange(64, dtype=torch.float32).view(2, 32) / 16).to(dtype)
        got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
        return bool(torch.allclose(got.float(), x.float() @ ((q.float() - 8) * 0.5 + 0.25).t(), rtol=2e-2))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.to(y.dtype)


class _Quantized(LinearFormat):
    """What both formats share: the stored tensor, the bias, sizes, the dequantize fallback."""

    def __init__(self, t: QuantizedTensor, bias: torch.Tensor | None):
        self.stored = t
        self.bias = bias
        self.out_features = t.q.shape[0]
        self.in_features = t.q.shape[1] * (2 if t.bits == 4 else 1)
        self.dtype = torch.int8 if t.bits == 8 else torch.uint8
        self.bits, self.group_size = t.bits, t.group_size
        # (the CPU-packed int4 copy that replaces q has q's size)
        self.nbytes = sum(p.numel() * p.element_size() for p in (t.q, t.scales, t.biases, bias) if p is not None)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) float matrix this format multiplies by (the test oracle, and the fallback's weight)."""
        return dequantize(self.stored, dtype)

    def _fallback(self, x: torch.Tensor) -> torch.Tensor:
        return _add_bias(x @ self.dequantize(x.dtype).t(), self.bias)

    def __repr__(self) -> str:
        group = f", group={self.group_size}" if self.group_size else ""
        return f"{type(self).__name__}(in={self.in_features}, out={self.out_features}, bits={self.bits}{group})"


class Int8Rows(_Quantized):
    """Symmetric per-row int8 weights."""

    def __init__(self, t: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__(t, bias)
        self._scales: dict[torch.dtype, torch.Tensor] = {}

    def _scales_in(self, dtype: torch.dtype) -> torch.Tensor:
        if dtype not in self._scales:
            self._scales[dtype] = self.stored.scales.to(dtype)
        return self._scales[dtype]

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) @ W.T + bias: the int8 kernel for a few CPU rows, dequantize + product otherwise."""
        if x.device.type == "cpu" and x.shape[0] <= INT8_KERNEL_ROWS_MAX and int8_kernel_ok(x.dtype):
            y = torch.ops.aten._weight_int8pack_mm(x.contiguous(), self.stored.q, self._scales_in(x.dtype))
            return _add_bias(y, self.bias)
        return self._fallback(x)


class Int4Groups(_Quantized):
    """Affine int4 weights in groups of 32/64/128 columns, packed once for the CPU kernel where it applies."""

    def __init__(self, t: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__(t, bias)
        self._packed = None
        self._sz: dict[torch.dtype, torch.Tensor] = {}
        if t.q.device.type == "cpu" and self.out_features % INT4_N_MULTIPLE == 0 and int4_kernel_ok(torch.float32):
            q = unpack_int4(t.q).to(torch.int32)  # (out, in) in [0, 15]
            self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
            self.stored = t._replace(q=None)  # the packed copy replaces the raw one: int4 stays half a byte

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) float matrix this format multiplies by; from the packed weight, I @ W.T (exact in fp32)."""
        if self._packed is None:
            return super().dequantize(dtype)
        eye = torch.eye(self.in_features, dtype=torch.float32)
        w_t = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self._packed, self.group_size,
                                                         self._scales_zeros(torch.float32))
        return w_t.t().to(dtype)

    def _scales_zeros(self, dtype: torch.dtype) -> torch.Tensor:
        """(in / group, out, 2): scale and zero, w = (q - 8) * scale + zero = q * scale + bias."""
        if dtype not in self._sz:
            s, b = self.stored.scales.float(), self.stored.biases.float()
            self._sz[dtype] = torch.stack((s, b + 8 * s), -1).transpose(0, 1).contiguous().to(dtype)
        return self._sz[dtype]

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) @ W.T + bias: the int4 kernel on a CPU where N is a multiple of 16, else dequantize."""
        if self._packed is not None and x.device.type == "cpu" and int4_kernel_ok(x.dtype):
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(x.contiguous(), self._packed, self.group_size,
                                                           self._scales_zeros(x.dtype))
            return _add_bias(y, self.bias)
        return self._fallback(x)


def build_quantized(parts: list[QuantizedTensor], biases: list[torch.Tensor | None] | None = None) -> LinearFormat:
    """One quantized format for matrices that share their input, fused along out (like `build_linear`); parts
    in different bits or groups (a GGUF's int8 v beside int4 q and k) stay apart, side by side (`Concatenated`)."""
    biases = biases or [None] * len(parts)
    if len({(p.bits, p.group_size) for p in parts}) > 1:
        return Concatenated([build_quantized([p], [b]) for p, b in zip(parts, biases)])
    t = concat(parts)
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases], 0)
    return (Int8Rows if t.bits == 8 else Int4Groups)(t, bias)

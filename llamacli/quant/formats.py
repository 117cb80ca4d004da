"""The int8 and int4 weight formats: model/linear's `LinearFormat` over quantized weights.

On a CPU a product of at most `KERNEL_ROWS_MAX` rows (a decode step, a small batch) runs torch's kernels on
bfloat16 activations, accumulating in fp32 (`KERNEL_DTYPE`): their only vectorized path (AVX2 / AVX512). Given
float32 or float16 they take a generic loop 10-100x slower (SmolLM2's 3072x576 gate/up, one thread, one row:
int8 2.2 ms in fp32 vs 0.18 ms in bf16, int4 5.1 vs 0.14 ms; a dense fp32 product takes 0.34 ms), so fp32 and
fp16 rows are rounded to bf16 for the product and its result cast back; the rest of the model (residual
stream, norms, attention) keeps the run's dtype. More rows (prefill), other devices, a CPU without AVX2 or a
torch without the ops: the matrix is dequantized in the input's dtype and multiplied by BLAS, the same result
up to float rounding (and faster there: one read of the matrix, then BLAS speed).

- `Int8Rows`: symmetric per-row int8; `_weight_int8pack_mm` (A (M, K) contiguous, B int8 (N, K), scales (N,)
  in A's dtype; any N).
- `Int4Groups`: affine int4 per group of 32/64/128 columns. Where N is a multiple of 16 (the op refuses
  others) the weight is packed once by `_convert_weight_to_int4pack_for_cpu` and multiplied by
  `_weight_int4pack_mm_for_cpu` (scales and zeros (K / group, N, 2) in A's dtype, w = (q - 8) * scale + zero).
  The packed copy replaces the raw one when `unpack_cpu_int4` reads it back exactly (checked on each matrix;
  the layout is AVX512's), else both are kept and counted.
"""

from __future__ import annotations

import functools

import torch

from llamacli.model.linear import Concatenated, LinearFormat
from llamacli.quant.quantize import QuantizedTensor, concat, dequantize, dequantize_int4, unpack_int4

KERNEL_DTYPE = torch.bfloat16
# Up to this many rows the kernels beat dequantize + one BLAS product (SmolLM2 3072x576 gate/up, one thread:
# 16 rows int8 1.3 ms vs 1.0 ms BLAS + 1 ms to dequantize; 32 rows 6.5 ms vs 1.4 + 1 ms).
KERNEL_ROWS_MAX = 16
INT4_N_MULTIPLE = 16  # _convert_weight_to_int4pack_for_cpu: "expect N to be dividable by 16"
INT4_PACK_BLOCK = 64  # rows per block of the CPU int4 packing on AVX512 (AVX2 packs blocks of 32)


def int4_pack_block() -> int:
    """Rows per block of `_convert_weight_to_int4pack_for_cpu`'s layout on this CPU: 64 with AVX512, 32 with AVX2
    (read back exactly on an AVX2 EPYC; callers check every matrix against its raw values anyway)."""
    return INT4_PACK_BLOCK if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else INT4_PACK_BLOCK // 2


@functools.cache
def int8_kernel_ok() -> bool:
    """Whether this torch has a right and vectorized CPU `_weight_int8pack_mm` for bf16 activations."""
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return False  # the generic loop is slower than dequantize + BLAS
    try:
        w = torch.arange(-16, 16, dtype=torch.int8).view(2, 16)
        x = (torch.arange(32, dtype=torch.float32).view(2, 16) / 8).to(KERNEL_DTYPE)
        s = torch.tensor([0.5, 0.25], dtype=KERNEL_DTYPE)
        got = torch.ops.aten._weight_int8pack_mm(x, w, s)
        return bool(torch.allclose(got.float(), x.float() @ (w.float() * s.float()[:, None]).t(), rtol=2e-2))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


@functools.cache
def int4_kernel_ok() -> bool:
    """Whether this torch has a right and vectorized CPU int4 pack + `_weight_int4pack_mm_for_cpu` for bf16."""
    if torch.backends.cpu.get_cpu_capability() == "DEFAULT":
        return False
    try:
        q = (torch.arange(16 * 32) % 16).view(16, 32).to(torch.int32)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 2)
        sz = torch.stack((torch.full((1, 16), 0.5), torch.full((1, 16), 0.25)), -1).to(KERNEL_DTYPE)
        x = (torch.arange(64, dtype=torch.float32).view(2, 32) / 16).to(KERNEL_DTYPE)
        got = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz)
        return bool(torch.allclose(got.float(), x.float() @ ((q.float() - 8) * 0.5 + 0.25).t(), rtol=2e-2))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def unpack_cpu_int4(packed: torch.Tensor, N: int, K: int) -> torch.Tensor:
    """(N, K) uint8 values in [0, 15] from `_convert_weight_to_int4pack_for_cpu`'s layout: blocks of B rows (64 on
    AVX512, 32 on AVX2: `int4_pack_block`), each stored k by k as B / 2 bytes holding rows j (low nibble) and
    j + B / 2 (high); a last, shorter block of n rows stores rows 2j (low) and 2j + 1 (high). Callers check the
    result against the raw values once."""
    flat = packed.reshape(-1)
    B = int4_pack_block()
    full = N // B * B
    blocks = flat[:full * K // 2].view(N // B, K, B // 2)
    rows = [torch.cat((blocks & 0xF, blocks >> 4), -1).transpose(1, 2).reshape(full, K)]
    if N > full:
        tail = flat[full * K // 2:].view(K, (N - full) // 2)
        rows.append(torch.stack((tail & 0xF, tail >> 4), -1).view(K, N - full).t())
    return torch.cat(rows)


def _add_bias(y: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    return y if bias is None else y + bias.to(y.dtype)


class _Quantized(LinearFormat):
    """What both formats share: the stored tensor, the bias, sizes, the kernel call and the fallback."""

    def __init__(self, t: QuantizedTensor, bias: torch.Tensor | None):
        self.stored = t
        self.bias = bias
        self.out_features = t.q.shape[0]
        self.in_features = t.q.shape[1] * (2 if t.bits == 4 else 1)
        self.dtype = torch.int8 if t.bits == 8 else torch.uint8
        self.bits, self.group_size = t.bits, t.group_size
        self.nbytes = sum(p.numel() * p.element_size() for p in (t.q, t.scales, t.biases, bias) if p is not None)
        self._kernel_args: tuple | None = None  # set by a subclass where its CPU kernel applies

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) float matrix this format multiplies by (the test oracle, and the fallback's weight)."""
        return dequantize(self.stored, dtype)

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def uses_kernel(self, x: torch.Tensor) -> bool:
        """Whether `mm(x)` runs the CPU kernel (on bf16-rounded rows) rather than dequantize + BLAS."""
        return self._kernel_args is not None and x.device.type == "cpu" and x.shape[0] <= KERNEL_ROWS_MAX

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) @ W.T + bias: the CPU kernel on bf16 rows for a few rows, dequantize + BLAS otherwise."""
        if self.uses_kernel(x):
            y = self._kernel(x.to(KERNEL_DTYPE).contiguous())
            return _add_bias(y if x.dtype == KERNEL_DTYPE else y.to(x.dtype), self.bias)
        return _add_bias(x @ self.dequantize(x.dtype).t(), self.bias)

    def __repr__(self) -> str:
        group = f", group={self.group_size}" if self.group_size else ""
        return f"{type(self).__name__}(in={self.in_features}, out={self.out_features}, bits={self.bits}{group})"


class Int8Rows(_Quantized):
    """Symmetric per-row int8 weights."""

    def __init__(self, t: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__(t, bias)
        if t.q.device.type == "cpu" and int8_kernel_ok():
            self._kernel_args = (t.q, t.scales.to(KERNEL_DTYPE))

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int8pack_mm(x, *self._kernel_args)


class Int4Groups(_Quantized):
    """Affine int4 weights in groups of 32/64/128 columns, packed once for the CPU kernel where it applies."""

    def __init__(self, t: QuantizedTensor, bias: torch.Tensor | None = None):
        super().__init__(t, bias)
        self._packed = None
        if t.q.device.type == "cpu" and self.out_features % INT4_N_MULTIPLE == 0 and int4_kernel_ok():
            q = unpack_int4(t.q)  # (out, in) in [0, 15]
            self._packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
            s, b = t.scales.float(), t.biases.float()  # w = (q - 8) * scale + zero = q * scale + bias
            sz = torch.stack((s, b + 8 * s), -1).transpose(0, 1).contiguous().to(KERNEL_DTYPE)  # (in / g, out, 2)
            self._kernel_args = (self._packed, self.group_size, sz)
            if torch.equal(unpack_cpu_int4(self._packed, self.out_features, self.in_features), q):
                self.stored = t._replace(q=None)  # the packed copy replaces the raw one: int4 stays half a byte
            else:  # a packing layout we cannot read back: keep the raw values for dequantize, and count them
                self.nbytes += self._packed.numel() * self._packed.element_size()

    def _kernel(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.aten._weight_int4pack_mm_for_cpu(x, *self._kernel_args)

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """The (out, in) float matrix this format multiplies by, from the raw or the CPU-packed values."""
        t = self.stored
        if t.q is not None:
            return super().dequantize(dtype)
        q = unpack_cpu_int4(self._packed, self.out_features, self.in_features)
        return dequantize_int4(q, t.scales, t.biases, self.group_size, dtype)


def build_quantized(parts: list[QuantizedTensor], biases: list[torch.Tensor | None] | None = None) -> LinearFormat:
    """One quantized format for matrices that share their input, fused along out (like `build_linear`); parts
    in different bits or groups (a GGUF's int8 v beside int4 q and k) stay apart, side by side (`Concatenated`)."""
    biases = biases or [None] * len(parts)
    if len({(p.bits, p.group_size) for p in parts}) > 1:
        return Concatenated([build_quantized([p], [b]) for p, b in zip(parts, biases)])
    t = concat(parts)
    bias = None if biases[0] is None else torch.cat([b.detach() for b in biases], 0)
    return (Int8Rows if t.bits == 8 else Int4Groups)(t, bias)

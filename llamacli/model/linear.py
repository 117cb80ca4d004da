"""Weight formats: how the runtime stores a weight matrix and multiplies by it, behind one interface.

A format holds one (out, in) matrix (several fused along `out`: q/k/v, gate/up) and its bias, and offers
`mm(x)`: x (N, in) -> (N, out), bias included. The runtime's forward only ever calls `mm`, so a new way to
store weights (int8, int4, a tensor-parallel shard) is a new class here, never a branch in the forward.
`build_linear` picks today's format for a dtype and device:

- `Dense`: the plain (out, in) tensor (GPU, and half weights on a CPU).
- `Transposed`: fp32 on a CPU, stored (in, out): MKL reads it about 1.4x faster for a single row that way
  (x @ W rather than x @ W.T) and as fast for many rows.
- `Packed`: reordered once into oneDNN's blocked layout (fp32, and bf16 where the CPU has native bf16).

`Concatenated` holds parts that share their input but no format (a GGUF's int8 v beside its int4 q and k).
Tensor parallelism wraps a rank's shard (any format: those above, or `quant`'s int8 / int4) in `AllReduced` (o
and down: the ranks' partial sums added) or `Gathered` (the lm_head: the ranks' vocabulary columns concatenated).
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch

from llamacli import parallel
from llamacli.model.cpu import PACK_ROWS_HINT, half_pack_rows_min, onednn_available, will_pack


class LinearFormat(ABC):
    """The interface: `mm(x)` (x (N, in) -> (N, out), bias included), `nbytes` (bytes of weight and bias one
    product reads), `in_features`, `out_features`, `dtype` (the stored weights' dtype)."""

    in_features: int
    out_features: int
    dtype: torch.dtype
    nbytes: int

    @abstractmethod
    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) @ W.T + bias -> (N, out)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}(in={self.in_features}, out={self.out_features}, dtype={self.dtype})"


def _bias_bytes(bias: torch.Tensor | None) -> int:
    return 0 if bias is None else bias.numel() * bias.element_size()


class Dense(LinearFormat):
    """The plain (out, in) matrix, multiplied as x @ W.T; half weights times fp32 inputs are upcast per call."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.w_t = weight.t()  # (in, out) view: torch.mm(x, w_t) is x @ W.T
        self.bias = bias
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.nbytes = weight.numel() * weight.element_size() + _bias_bytes(bias)

    @property
    def weight(self) -> torch.Tensor:
        """The (out, in) matrix (a view of the stored one: a tied lm_head's table doubles as the embedding)."""
        return self.w_t.t()

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) @ W.T + bias; fp32 x with half weights upcasts them (oneDNN-packed on the spot for many rows on
        AVX512 CPUs: `model.cpu.half_pack_rows_min`)."""
        w_t, bias = self.w_t, self.bias
        if w_t.dtype != x.dtype:
            bias = bias.to(x.dtype) if bias is not None else None
            pack_from = half_pack_rows_min() if x.device.type == "cpu" else None
            if pack_from is not None and x.shape[0] >= pack_from and x.dtype == torch.float32 \
                    and onednn_available(torch.float32):
                packed = torch.ops.mkldnn._reorder_linear_weight(w_t.t().to(x.dtype).contiguous(), x.shape[0])
                return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
            w_t = w_t.to(x.dtype)
        if bias is None:
            return torch.mm(x, w_t)
        return torch.addmm(bias, x, w_t)


class Transposed(Dense):
    """The matrix stored (in, out) contiguous (fp32 on a CPU): MKL streams it faster for one row than (out, in)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__(weight.t().contiguous().t(), bias)  # same values, (in, out) storage


class Packed(LinearFormat):
    """An fp32 (or native bf16) matrix reordered once into oneDNN's blocked layout for x @ W.T.

    MKL's sgemm repacks the weight on every call, which for a few rows costs about as much as the product;
    oneDNN's prepacked kernel streams it once. Measured on SmolLM2 (EPYC, 2 threads): decode step 31 -> 19 ms
    at one row, 64 -> 38 ms at eight rows, prefill 128 tokens 540 -> 1050 tok/s. The kernels sum in another
    order than MKL: logits within ~3e-6 relative of the plain formats.
    """

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None):
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS_HINT)
        self.bias = bias
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.nbytes = weight.numel() * weight.element_size() + _bias_bytes(bias)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) @ W.T + bias with oneDNN's prepacked kernel (x must have the weight's dtype)."""
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def format_for(dtype: torch.dtype, device: torch.device, pack: bool = True) -> type[LinearFormat]:
    """The format class weights of `dtype` on `device` are stored in (`pack`: oneDNN where it can)."""
    if device.type == "cpu" and pack and will_pack(dtype):
        return Packed
    if device.type == "cpu" and dtype == torch.float32:
        return Transposed
    return Dense


@torch.no_grad()
def build_linear(weights: list[torch.Tensor], biases: list[torch.Tensor | None] | None = None,
                 pack: bool = True) -> LinearFormat:
    """One format for matrices (out_i, in) that share their input, fused along out: (sum of out_i, in).

    The format follows the weights' dtype and device (`format_for`). Biases are all present or all None.
    """
    weights = [w.detach() for w in weights]
    w = weights[0] if len(weights) == 1 else torch.cat(weights, 0)  # (sum of out, in)
    bias = None
    if biases is not None and biases[0] is not None:
        bias = torch.cat([b.detach() for b in biases], 0)  # (sum of out,)
    return format_for(w.dtype, w.device, pack)(w, bias)


class Concatenated(LinearFormat):
    """Formats that share their input and cannot fuse into one (int8 beside int4 parts): their products side by
    side, concatenated along out in order."""

    def __init__(self, parts: list[LinearFormat]):
        self.parts = parts
        self.in_features, self.out_features = parts[0].in_features, sum(p.out_features for p in parts)
        self.dtype, self.nbytes = parts[0].dtype, sum(p.nbytes for p in parts)

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) -> (N, sum of the parts' out)."""
        return torch.cat([p.mm(x) for p in self.parts], -1)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({', '.join(map(repr, self.parts))})"


class AllReduced(LinearFormat):
    """A row-parallel shard (this rank's input columns): its product summed over the ranks (one all-reduce)."""

    def __init__(self, shard: LinearFormat):
        self.shard = shard
        self.in_features, self.out_features = shard.in_features, shard.out_features  # this rank's inputs
        self.dtype, self.nbytes = shard.dtype, shard.nbytes

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in / world) -> the whole product (N, out), the same on every rank."""
        return parallel.all_reduce(self.shard.mm(x))


class Gathered(LinearFormat):
    """A column-parallel shard (this rank's `chunk` output rows, the last rank's maybe fewer): the ranks' outputs
    concatenated and cut to `out_features` (one all-gather)."""

    def __init__(self, shard: LinearFormat, chunk: int, out_features: int):
        self.shard, self.chunk = shard, chunk
        self.in_features, self.out_features = shard.in_features, out_features
        self.dtype, self.nbytes = shard.dtype, shard.nbytes

    def mm(self, x: torch.Tensor) -> torch.Tensor:
        """x (N, in) -> (N, out): every rank's columns, in rank order."""
        y = self.shard.mm(x)  # (N, rows of this rank)
        if y.shape[-1] < self.chunk:  # the last rank's share is short: pad so that every rank sends as much
            y = torch.nn.functional.pad(y, (0, self.chunk - y.shape[-1]))
        return parallel.all_gather_last(y)[..., :self.out_features]

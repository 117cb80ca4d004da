"""Quantized weights: int8 per-row and int4 group-wise formats behind model/linear's interface, and the
functions that quantize a float matrix into the stored layout a quantized checkpoint holds."""

from __future__ import annotations

from llamacli.quant.formats import Int4Groups, Int8Rows, build_quantized
from llamacli.quant.quantize import QuantizedTensor, quantize_int4, quantize_int8, quantize_matrix

__all__ = ["Int4Groups", "Int8Rows", "QuantizedTensor", "build_quantized", "quantize_int4", "quantize_int8",
           "quantize_matrix"]

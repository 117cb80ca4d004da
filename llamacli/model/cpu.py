"""CPU feature probes and the compute-dtype policy: which dtype a forward computes in, which weights get
oneDNN-packed, and the row counts where those choices change. Every threshold carries the measurement behind it.
"""

from __future__ import annotations

import functools

import torch

# Half-precision weights on a CPU: one row reads half the bytes, so decode multiplies in half precision.
# Many rows (prefill, big batches) are slow in half precision on CPUs without native support for it, so
# above HALF_ROWS_MAX rows the forward computes in fp32, upcasting each weight as it is used. Measured on
# an AVX512-BF16 EPYC, 2 threads, all SmolLM2 layer weights: fp16 one row 5.6 ms vs 12 ms upcast, 8 rows
# 38 ms vs 27 ms, 128 rows 586 ms vs 185 ms; bf16 there is native (128 rows 41 ms vs 166 ms upcast), so
# it stays bf16 whatever the rows. The residual stream keeps the model dtype in decode, as transformers.
HALF_ROWS_MAX = 4  # on CPU, half-precision weights without native support compute in half up to this many rows

# oneDNN picks the packed layout for an expected number of rows. 8 streams best at every size measured
# (SmolLM2 fp32, 2 threads, all weights): hint 1 -> 15.5 ms at 1 row, 25 ms at 8; hint 8 -> 10.7 / 14.0 ms.
PACK_ROWS_HINT = 8

# fp32 weights: oneDNN's packed layout is the faster product for several rows, and on one thread MKL's on (in, out)
# storage (`Transposed`) for one row; MKL's one-row product does not use a second thread, oneDNN's does. Whole
# SmolLM2 fp32 forwards, AMD EPYC (AVX2), layouts alternating (`benchmarks/bench_layout.py`): one thread, a one-row
# decode step 50.0 ms unpacked vs 68.3 packed, 8 rows 171 vs 123, a 128-token prefill 811 vs 740; two threads,
# one row 52.9 vs 53.1 (51 vs 56 in another run), 8 rows 206 vs 90, prefill 561 vs 484. So only a runtime that
# decodes one stream (generate, chat, a draft model) on one thread is laid out unpacked.
FP32_PACK_ROWS_MIN = 2

# Half weights upcast for many rows (prefill) are also worth packing for oneDNN on the spot where oneDNN runs its
# AVX512 kernels: the pack costs about one more pass over the weight, the packed product saves more from here on.
# All SmolLM2 weights, fp16 on an AVX512 EPYC without native fp16, 2 threads: 64 rows 170 ms upcast vs 184 ms
# upcast+pack, 96 rows 204 vs 184, 128 rows 249-347 vs 218-230, 512 rows 941 vs 520. On an AVX2-only EPYC the
# pack never pays (`python benchmarks/bench_layout.py --upcast --threads 2`: SmolLM2 prefills, upcast vs
# upcast+pack): bf16 128 tokens 377 vs 516 ms, 512 tokens 1036 vs 1240; fp16 252 vs 340, 930 vs 1085; 16-64
# tokens 1.5-3x slower packed.
HALF_PACK_ROWS_MIN = 96


@functools.cache
def half_pack_rows_min() -> int | None:
    """From how many rows half weights upcast for fp32 inputs are also oneDNN-packed on the spot (None: never):
    HALF_PACK_ROWS_MIN where torch's CPU kernels are AVX512 ones, never on AVX2 and others."""
    return HALF_PACK_ROWS_MIN if torch.backends.cpu.get_cpu_capability().startswith("AVX512") else None


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (x86 AVX512-BF16 / AMX, or Arm's BF16 extension)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    return False


@functools.cache
def onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build can prepack linear weights of `dtype` with oneDNN (and gets the right answer)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        w = (torch.arange(12, dtype=torch.float32).view(3, 4) / 7).to(dtype)
        x = (torch.arange(8, dtype=torch.float32).view(2, 4) / 5).to(dtype)
        packed = torch.ops.mkldnn._reorder_linear_weight(w.contiguous(), PACK_ROWS_HINT)
        got = torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")
        return bool(torch.allclose(got.float(), x.float() @ w.float().t(), atol=1e-2))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


def will_pack(dtype: torch.dtype) -> bool:
    """Whether CPU weights of `dtype` get oneDNN-packed when a runtime is built with packing.

    oneDNN packs fp32, and bf16 where the CPU multiplies it natively (there bf16 computes in bf16 for any
    number of rows, so inputs always match the packed dtype).
    """
    return onednn_available(dtype) and (
        dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_native_bf16()))


def pack_for_rows(dtype: torch.dtype, rows: int, threads: int | None = None) -> bool:
    """Whether CPU weights of `dtype` that `will_pack` should be packed for decode steps of `rows` rows on `threads`
    threads (default: torch's now): fp32 from FP32_PACK_ROWS_MIN rows or on more than one thread; bf16 always."""
    threads = torch.get_num_threads() if threads is None else threads
    return dtype != torch.float32 or rows >= FP32_PACK_ROWS_MIN or threads > 1


def compute_dtype(dtype: torch.dtype, device: torch.device, rows: int) -> torch.dtype:
    """The dtype a forward over `rows` token rows computes in, for weights stored in `dtype` on `device`."""
    if dtype not in (torch.float16, torch.bfloat16) or device.type != "cpu" or rows <= HALF_ROWS_MAX:
        return dtype
    if dtype == torch.bfloat16 and cpu_has_native_bf16():
        return dtype
    return torch.float32


def attention_dtype(compute: torch.dtype, T: int, device: torch.device) -> torch.dtype:
    """The dtype attention over T queries runs in, for a forward computing in `compute`.

    CPU attention in half precision is far slower than upcasting q, k, v to fp32 (SmolLM2 shapes, 2 threads:
    fp16 decode 182 vs 25 us per layer at 128 keys, 815 vs 80 at 600; fp16 prefill of 128, 990 vs 372 us;
    bf16 decode 114 vs 30 us), except bf16 prefill where the CPU has native bf16 (465 vs 511 us). The result
    goes back to the compute dtype.
    """
    if device.type != "cpu" or compute not in (torch.float16, torch.bfloat16):
        return compute
    if compute == torch.bfloat16 and T > 1 and cpu_has_native_bf16():
        return compute
    return torch.float32

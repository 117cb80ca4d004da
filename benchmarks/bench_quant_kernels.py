"""The CPU int8/int4 kernels against a dense product and dequantize + product, by activation dtype and rows.

    .venv/bin/python benchmarks/bench_quant_kernels.py [--shape 3072,576] [--rows 1,8,16,32,128] [--threads 1]
    ATEN_CPU_CAPABILITY=default .venv/bin/python benchmarks/bench_quant_kernels.py   # a CPU without AVX2

Times (median ms) `x @ W.T` dense, `_weight_int8pack_mm`, `_weight_int4pack_mm_for_cpu` (group 32), and the
int8 fallback (dequantize, then one product), for float32 / bfloat16 / float16 activations. This is what sets
`llamacli.quant.formats.KERNEL_DTYPE` (bf16: the kernels' only vectorized path) and `KERNEL_ROWS_MAX`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamacli.bench import median_ms  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shape", default="3072,576", help="out,in of the matrix (default: SmolLM2's gate/up)")
    ap.add_argument("--rows", default="1,8,16,32,128")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repeats", type=int, default=10)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    N, K = (int(v) for v in args.shape.split(","))
    torch.manual_seed(0)
    w = torch.randn(N, K)
    q8 = torch.randint(-127, 128, (N, K), dtype=torch.int8)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(torch.randint(0, 16, (N, K), dtype=torch.int32), 2)
    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"{args.threads} thread(s), W {N}x{K}, median ms of {args.repeats}")
    print(f"{'rows':>5} {'dtype':<9} {'dense':>8} {'int8':>8} {'int4':>8} {'int8 deq':>9}")
    for rows in (int(v) for v in args.rows.split(",")):
        for dtype in (torch.float32, torch.bfloat16, torch.float16):
            x = torch.randn(rows, K, dtype=dtype)
            wd, s = w.to(dtype), torch.rand(N, dtype=dtype)
            sz = torch.rand(K // 32, N, 2, dtype=dtype)
            dense = median_ms(lambda: x @ wd.t(), args.repeats)
            int8 = median_ms(lambda: torch.ops.aten._weight_int8pack_mm(x, q8, s), args.repeats)
            int4 = median_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, 32, sz), args.repeats)
            deq = median_ms(lambda: x @ (q8.to(dtype) * s[:, None]).t(), args.repeats)
            print(f"{rows:>5} {str(dtype).removeprefix('torch.'):<9} {dense:>8.3f} {int8:>8.3f} {int4:>8.3f} {deq:>9.3f}",
                  flush=True)


if __name__ == "__main__":
    main()

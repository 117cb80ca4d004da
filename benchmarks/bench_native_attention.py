"""What-if: batched generation with a native decode-attention op instead of PyTorch's (SmolLM2, fp32, CPU).

    pip install ninja   # and a C++ compiler (g++)
    python benchmarks/bench_native_attention.py [--repetitions 2]

Not part of llamacli: a measurement for deciding whether native code is worth adding. It compiles a small
C++ op with torch.utils.cpp_extension (about 25 s the first time, cached after): attention of one new token
per row over the cache, grouped-query, each row reading only its own positions, fp32, head_dim 64, for a
cache in SDPA's layout (rows, kv heads, positions, head_dim). It checks the op against
`llamacli.kv_cache.decode_attention` on random inputs, then runs bench_batch.py's 32 prompts at batch 1 and 8,
alternating the PyTorch path and the native one (batch caches then keep SDPA's layout, and every
one-token-per-row SDPA call of fp32 head_dim 64 goes to the op). It prints medians, ratios, and how many rows
differ from the first run's tokens.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

HEAD_DIM = 64
SOURCE = r"""
#include <torch/extension.h>
#include <ATen/Parallel.h>
#include <algorithm>
#include <cmath>
#include <vector>

constexpr int64_t HD = 64;

// q (B, KV, G, HD) contiguous and pre-scaled; keys, values (B, KV, >= max(lens), HD) with the last two axes
// contiguous; lens (B,) int64, the positions row b attends to. Returns (B, KV, G, HD).
torch::Tensor decode_attention(torch::Tensor q, torch::Tensor keys, torch::Tensor values, torch::Tensor lens) {
  TORCH_CHECK(q.dtype() == torch::kFloat32 && q.is_contiguous() && q.size(3) == HD, "q: fp32 (B, KV, G, 64)");
  TORCH_CHECK(keys.stride(3) == 1 && keys.stride(2) == HD && values.stride(3) == 1 && values.stride(2) == HD,
              "keys and values: (B, KV, positions, 64) with positions x head_dim contiguous");
  const int64_t B = q.size(0), KV = q.size(1), G = q.size(2);
  TORCH_CHECK(G <= 16, "at most 16 query heads per kv head");
  auto out = torch::empty_like(q);
  const float* Q = q.data_ptr<float>();
  const float* K = keys.data_ptr<float>();
  const float* V = values.data_ptr<float>();
  const int64_t* L = lens.data_ptr<int64_t>();
  float* O = out.data_ptr<float>();
  const int64_t ksb = keys.stride(0), ksh = keys.stride(1), vsb = values.stride(0), vsh = values.stride(1);
  at::parallel_for(0, B * KV, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> s;
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / KV, h = i % KV, n = L[b];
      s.resize(G * n);
      const float* kb = K + b * ksb + h * ksh;
      const float* vb = V + b * vsb + h * vsh;
      const float* qb = Q + i * G * HD;
      for (int64_t t = 0; t < n; ++t) {  // every key once, in memory order
        const float* kr = kb + t * HD;
        for (int64_t g = 0; g < G; ++g) {
          float acc = 0.0f;
          #pragma omp simd reduction(+:acc)
          for (int64_t d = 0; d < HD; ++d) acc += qb[g * HD + d] * kr[d];
          s[g * n + t] = acc;
        }
      }
      float inv[16];
      for (int64_t g = 0; g < G; ++g) {
        float* sg = s.data() + g * n;
        float m = -INFINITY;
        #pragma omp simd reduction(max:m)
        for (int64_t t = 0; t < n; ++t) m = std::max(m, sg[t]);
        float sum = 0.0f;
        #pragma omp simd reduction(+:sum)
        for (int64_t t = 0; t < n; ++t) { sg[t] = expf(sg[t] - m); sum += sg[t]; }
        inv[g] = 1.0f / sum;
      }
      float acc[16][HD] = {};
      for (int64_t t = 0; t < n; ++t) {  // every value once, in memory order
        const float* vr = vb + t * HD;
        for (int64_t g = 0; g < G; ++g) {
          const float p = s[g * n + t];
          #pragma omp simd
          for (int64_t d = 0; d < HD; ++d) acc[g][d] += p * vr[d];
        }
      }
      float* ob = O + i * G * HD;
      for (int64_t g = 0; g < G; ++g)
        for (int64_t d = 0; d < HD; ++d) ob[g * HD + d] = acc[g][d] * inv[g];
    }
  });
  return out;
}
"""


def compile_op():
    """The compiled op module (SystemExit with the reason when it cannot be built here)."""
    from torch.utils.cpp_extension import load_inline

    try:
        return load_inline("llamacli_bench_decode_attention", cpp_sources=SOURCE, functions=["decode_attention"],
                           extra_cflags=["-O3", "-march=native", "-fopenmp", "-ffast-math"],
                           extra_ldflags=["-fopenmp"])
    except (RuntimeError, OSError, ImportError) as exc:
        raise SystemExit(f"error: cannot build the native op here (needs g++ and `pip install ninja`): {exc}")


@contextlib.contextmanager
def native_attention(op):
    """Batch caches keep SDPA's layout, and one-token-per-row fp32 SDPA calls with head_dim 64 go to `op`."""
    import llamacli.kv_cache as kv_cache

    sdpa, init = F.scaled_dot_product_attention, kv_cache.KVCache.__init__

    def attention(q, k, v, attn_mask=None, is_causal=False, enable_gqa=False, **kw):
        if (q.shape[2] == 1 and q.dtype == torch.float32 and q.shape[3] == HEAD_DIM and k.stride(-1) == 1
                and k.stride(-2) == HEAD_DIM and v.stride(-1) == 1 and v.stride(-2) == HEAD_DIM):
            B, H = q.shape[:2]
            KV, end = k.shape[1], k.shape[2]
            # SDPA's boolean mask (B, 1, 1, end) hides a row's positions past its own: count the visible ones.
            lens = (torch.full((B,), end, dtype=torch.int64) if attn_mask is None
                    else attn_mask.reshape(B, end).sum(-1))
            q = (q * HEAD_DIM ** -0.5).reshape(B, KV, H // KV, HEAD_DIM).contiguous()
            return op.decode_attention(q, k, v, lens).reshape(B, H, 1, HEAD_DIM)
        return sdpa(q, k, v, attn_mask=attn_mask, is_causal=is_causal, enable_gqa=enable_gqa, **kw)

    def sdpa_layout(self, *args, positions_last=None, **kwargs):
        init(self, *args, positions_last=False, **kwargs)

    F.scaled_dot_product_attention, kv_cache.KVCache.__init__ = attention, sdpa_layout
    try:
        yield
    finally:
        F.scaled_dot_product_attention, kv_cache.KVCache.__init__ = sdpa, init


def check_op(op) -> float:
    """Largest difference between the op and decode_attention on random rows at different positions."""
    from llamacli.kv_cache import decode_attention, decode_mask

    torch.manual_seed(0)
    B, KV, G, S = 5, 3, 3, 300
    positions = torch.tensor([0, 17, 299, 150, 64])
    keys, values = torch.randn(B, KV, S, HEAD_DIM), torch.randn(B, KV, S, HEAD_DIM)
    q = torch.randn(B, KV * G, 1, HEAD_DIM)
    mask = decode_mask(positions, S, KV, G, torch.float32)
    want = decode_attention(q, keys.transpose(-1, -2), values.transpose(-1, -2), mask)
    scaled = (q * HEAD_DIM ** -0.5).reshape(B, KV, G, HEAD_DIM).contiguous()
    got = op.decode_attention(scaled, keys, values, positions + 1).reshape(B, -1)
    return float((want - got).abs().max())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint folder (default: the SmolLM2 test checkpoint)")
    ap.add_argument("--repetitions", type=int, default=2)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from bench_batch import load_workload
    from llamacli.generation import generate_batch, scheduler_for

    op = compile_op()
    diff = check_op(op)
    print(f"native op vs decode_attention on random rows: max difference {diff:.1e}")
    if diff > 1e-4:
        raise SystemExit("error: the native op disagrees with decode_attention")
    folder, engine, items = load_workload(args.model, 32, args.max_new_tokens)
    for native in (False, True):  # warm up both paths
        with native_attention(op) if native else contextlib.nullcontext():
            list(generate_batch(engine, items[:4], 4))

    configs = [(1, False), (8, False), (1, True), (8, True)]
    walls: dict[tuple[int, bool], list[float]] = {c: [] for c in configs}
    first, differ = None, 0
    for rep in range(args.repetitions):
        for bs, native in configs:
            with native_attention(op) if native else contextlib.nullcontext():
                decoder = scheduler_for(engine, items, bs)
                t0 = time.perf_counter()
                results = {k: r.token_ids for k, r in generate_batch(engine, items, scheduler=decoder)}
                walls[(bs, native)].append(time.perf_counter() - t0)
            first = first or results
            differ = max(differ, sum(results[k] != first[k] for k in results))
            print(f"  run {rep + 1}, batch {bs}, {'native' if native else 'pytorch'}: "
                  f"{walls[(bs, native)][-1]:.1f} s", file=sys.stderr, flush=True)
    med = {c: statistics.median(w) for c, w in walls.items()}
    generated = sum(len(t) for t in first.values())
    print(f"{folder.name}: 32 prompts, {generated} tokens generated, fp32, {args.threads} threads, "
          f"median of {args.repetitions}; rows differing from the first run: {differ}")
    for native in (False, True):
        name = "native decode attention" if native else "pytorch"
        b1, b8 = med[(1, native)], med[(8, native)]
        print(f"{name:<24} batch 1 {b1:6.2f} s  batch 8 {b8:6.2f} s  ratio {b1 / b8:.2f}")
    print(f"native batch 8 against the faster batch 1: {min(med[(1, False)], med[(1, True)]) / med[(8, True)]:.2f}")


if __name__ == "__main__":
    main()

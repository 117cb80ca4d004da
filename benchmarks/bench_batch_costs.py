"""Where batched generation's time goes, and the batch-8 : batch-1 ratio those costs allow (SmolLM2, fp32, CPU).

    python benchmarks/bench_batch_costs.py [--batch-size 8] [--repetitions 9] [--measure-batch1]

bench_batch.py measures the ratio; this explains it, and bounds it:
1. bench_batch's 32 prompts run once at `--batch-size` (greedy), for every row's prompt and output length
   and the wall time to check the model against.
2. In one process, all alternating, medians of `--repetitions`: the forward that decodes k rows (k = 1..batch
   size) of a batch cache, at positions where the benchmark's rows sit mid-answer; the same forward of a
   one-row cache (batch 1); a prefill's cost (fixed + per token, from two prompt lengths); each of these
   also with attention replaced by zeros (a what-if); and the packed matrix products alone for k rows.
3. the scheduler's schedule (its admission rule, shared prefix, forward by forward; tests check the replay
   against the scheduler) is replayed with those costs at batch 1 and at the batch size. The replay at the
   batch size is printed beside the measured wall time: on a busy machine the two can differ by 15%, so
   read the ratios, which come from one cost table, rather than the seconds.

Scenarios, each replayed at batch 1 and at the batch size:
- as measured;
- attention free: every attention returns zeros (batch 1's, and the prefills', too);
- decode attention at the memory floor: the attention-free step plus the time to read each row's keys and
  values once at the memory bandwidth measured on the spot (what a perfect decode kernel could do);
- only the products grow with rows: a k-row step = the one-row step + the extra product time of k rows.
  The ceiling for any work on attention, cache writes or masks.
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


@contextlib.contextmanager
def attention_free():
    """Every attention call of the fast path returns zeros of its output's shape (the what-if)."""
    import llamacli.model.runtime as model_module

    decode, sdpa = model_module.decode_attention, F.scaled_dot_product_attention
    model_module.decode_attention = lambda q, keys, values, mask: q.new_zeros(q.shape[0], q.shape[1] * q.shape[3])
    F.scaled_dot_product_attention = lambda q, k, v, **kw: torch.zeros_like(q)
    try:
        yield
    finally:
        model_module.decode_attention, F.scaled_dot_product_attention = decode, sdpa


def median_ms(fns: dict, repetitions: int) -> dict:
    """Median wall time in ms of each zero-argument function, the functions alternating."""
    for f in fns.values():
        f()
    times = {k: [] for k in fns}
    for _ in range(repetitions):
        for k, f in fns.items():
            t0 = time.perf_counter()
            f()
            times[k].append((time.perf_counter() - t0) * 1e3)
    return {k: statistics.median(v) for k, v in times.items()}


def measure_costs(engine, batch: int, positions: list[int], single_position: int, prefill_lengths: tuple[int, int],
                  prefix: int, repetitions: int) -> dict:
    """Costs in ms, keyed (kind, rows or tokens, attention on?): decode steps of k batch rows, the one-row
    cache's step, prefills, and (attention on = None) the products alone; all alternating."""
    model = engine.model
    n = max(positions + [single_position]) + max(prefill_lengths) + prefix + 2
    batch_cache = engine.new_cache(n, max_batch=batch)
    single = engine.new_cache(n)
    for c in (batch_cache, single):
        for t in list(c.keys) + list(c.values):
            t.normal_()
    tokens = torch.randint(0, engine.config.vocab_size, (batch, 1))
    forwards = {}
    for k in range(1, batch + 1):
        start = positions[0] if k == 1 else torch.tensor(positions[:k])  # as the scheduler passes them
        forwards[("batch", k)] = (lambda k=k, start=start:
                                  model.forward_last([(tokens[:k], start, batch_cache.rows(0, k))]))
    forwards[("single", 1)] = lambda: model.forward_last([(tokens[:1], single_position, single)])
    for T in prefill_lengths:
        ids = torch.randint(0, engine.config.vocab_size, (1, T))
        forwards[("prefill", T)] = lambda ids=ids: model.forward_last([(ids, prefix, single)])

    def without_attention(f):
        def run():
            with attention_free():
                f()
        return run

    fns = {}
    for key, f in forwards.items():
        fns[key + (True,)] = f
        fns[key + (False,)] = without_attention(f)

    formats = list(model.formats().values())  # every matrix of the runtime, lm_head included

    def products(k: int) -> None:
        inputs = {n: torch.randn(k, n) for n in {f.in_features for f in formats}}  # contiguous, as in the forward
        for f in formats:
            f.mm(inputs[f.in_features])

    for k in range(1, batch + 1):
        fns[("products", k, None)] = lambda k=k: products(k)
    with torch.inference_mode():
        return median_ms(fns, repetitions)


def prefill_fit(ms: dict, lengths: tuple[int, int], attention: bool) -> tuple[float, float]:
    """(fixed ms, ms per token) of a prefill, from its cost at two lengths."""
    a, b = lengths
    per_token = (ms[("prefill", b, attention)] - ms[("prefill", a, attention)]) / (b - a)
    return ms[("prefill", a, attention)] - per_token * a, per_token


def replay(prompt_lens: list[int], out_lens: list[int], batch: int, prefix: int, cost,
           prefill_budget: int | None = None) -> tuple[float, int]:
    """(seconds, forwards) of the scheduler's schedule, where a forward that decodes k rows and prefills T prompt
    tokens costs cost(k, T) ms. A new row's prefill gives its first token; each later forward one more.
    Admissions follow the scheduler's own policy function."""
    from llamacli.generation import PREFILL_TOKENS_PER_STEP, plan_admissions

    budget = PREFILL_TOKENS_PER_STEP if prefill_budget is None else prefill_budget
    waiting = list(range(len(prompt_lens)))
    slots: list[list[int] | None] = [None] * min(batch, len(waiting))  # [row, tokens generated]
    total, forwards = 0.0, 0
    while waiting or any(slots):
        decoding = sum(s is not None for s in slots)
        free = [i for i, s in enumerate(slots) if s is None]
        admitted = plan_admissions(free, [prompt_lens[w] - prefix for w in waiting], budget)
        new_tokens = 0
        for i in admitted:
            row = waiting.pop(0)
            slots[i] = [row, 0]
            new_tokens += prompt_lens[row] - prefix
        total += cost(decoding, new_tokens)
        forwards += 1
        for i, s in enumerate(slots):
            if s is not None:
                s[1] += 1
                if s[1] >= out_lens[s[0]]:
                    slots[i] = None
    return total / 1e3, forwards


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint folder (default: the SmolLM2 test checkpoint)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--repetitions", type=int, default=9)
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--measure-batch1", action="store_true", help="also run batch 1 for real (about a minute)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from bench_batch import load_workload
    from llamacli.bench import measure_bandwidth
    from llamacli.generation import generate_batch, scheduler_for

    folder, engine, items = load_workload(args.model, 32, args.max_new_tokens)
    prompt_lens = [len(ids) for _, ids, _ in items]
    list(generate_batch(engine, items[:4], 4))  # warm-up

    walls = {}
    for bs in ([1] if args.measure_batch1 else []) + [args.batch_size]:
        decoder = scheduler_for(engine, items, bs, prefix_cache=False)  # the replay models the shared prefix only
        t0 = time.perf_counter()
        results = dict(generate_batch(engine, items, scheduler=decoder))
        walls[bs] = (time.perf_counter() - t0, decoder.steps)
    prefix = decoder.shared_prefix_tokens
    out_lens = [len(results[i].token_ids) for i in range(len(items))]
    mid = [p + o // 2 for p, o in zip(prompt_lens, out_lens)]  # where each row sits mid-answer
    positions = mid[:args.batch_size]
    lengths = (64, 192)

    single_position = round(statistics.mean(mid))
    ms = measure_costs(engine, args.batch_size, positions, single_position, lengths, prefix, args.repetitions)
    bandwidth, _ = measure_bandwidth("cpu")
    cfg = engine.config
    kv_bytes = lambda pos: (pos + 1) * cfg.n_layers * 2 * cfg.n_kv_heads * cfg.head_dim * 4  # noqa: E731
    floor = lambda pos: kv_bytes(pos) / (bandwidth * 1e9) * 1e3  # noqa: E731  ms to read a row's keys and values

    print(f"{folder.name}, fp32, {args.threads} threads: 32 prompts of {min(prompt_lens)}..{max(prompt_lens)} "
          f"tokens (shared prefix {prefix}), {sum(out_lens)} generated, batch {args.batch_size}")
    print(f"ms per forward, median of {args.repetitions}, all alternating; batch rows at positions {positions} "
          f"(where the first rows sit mid-answer); memory bandwidth {bandwidth:.1f} GB/s")
    print(f"{'rows':>4} {'step':>7} {'no attention':>12} {'products':>9} {'attention floor':>15}")
    for k in range(1, args.batch_size + 1):
        print(f"{k:>4} {ms[('batch', k, True)]:>7.2f} {ms[('batch', k, False)]:>12.2f} "
              f"{ms[('products', k, None)]:>9.2f} {sum(floor(p) for p in positions[:k]):>15.2f}")
    print(f"{'1*':>4} {ms[('single', 1, True)]:>7.2f} {ms[('single', 1, False)]:>12.2f} {'':>9} "
          f"{floor(single_position):>15.2f}   (* batch 1: a one-row cache, position {single_position})")
    for attention in (True, False):
        c0, c1 = prefill_fit(ms, lengths, attention)
        print(f"prefill{'' if attention else ' (no attention)'}: {c0:.1f} ms + {c1:.3f} ms per token")

    def scenario(single: float, step, prefill_attention: bool = True):
        """Replayed (seconds, forwards) at batch 1 and at the batch size."""
        c0, c1 = prefill_fit(ms, lengths, prefill_attention)
        # A forward that prefills beside decoding rows costs their step plus its prompt tokens.
        t1, f1 = replay(prompt_lens, out_lens, 1, prefix, lambda k, T: single if k else c0 + c1 * T)
        tb, fb = replay(prompt_lens, out_lens, args.batch_size, prefix, lambda k, T: (step(k) if k else c0) + c1 * T)
        return t1, f1, tb, fb

    single = ms[("single", 1, True)]
    scenarios = {
        "as measured": scenario(single, lambda k: ms[("batch", k, True)]),
        "attention free (prefill too)": scenario(ms[("single", 1, False)], lambda k: ms[("batch", k, False)],
                                                 prefill_attention=False),
        "decode attention at the memory floor": scenario(
            ms[("single", 1, False)] + floor(single_position),
            lambda k: ms[("batch", k, False)] + sum(floor(p) for p in positions[:k])),
        "only the products grow with rows": scenario(
            single, lambda k: single + ms[("products", k, None)] - ms[("products", 1, None)]),
    }
    wall, steps = walls[args.batch_size]
    print(f"\nreplayed schedule, seconds (forwards); measured batch {args.batch_size}: {wall:.2f} s ({steps})"
          + (f", measured batch 1: {walls[1][0]:.2f} s ({walls[1][1]})" if 1 in walls else ""))
    print(f"{'scenario':<38} {'batch 1':>14} {'batch ' + str(args.batch_size):>14} {'ratio':>6}")
    for name, (t1, f1, tb, fb) in scenarios.items():
        print(f"{name:<38} {t1:>8.2f} ({f1:>4}) {tb:>8.2f} ({fb:>4}) {t1 / tb:>6.2f}")


if __name__ == "__main__":
    main()

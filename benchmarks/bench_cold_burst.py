"""A cold server's first burst: N chat prompts added at once to a fresh scheduler (no row holds anything yet).

    python benchmarks/bench_cold_burst.py [--model DIR] [--prompts 8] [--threads 1] [--repetitions 2]

The batch benchmark's prompts (SmolLM2's chat template puts the same system prompt first) go into a new
`Scheduler` (batch size = the number of prompts) together, with the prefix cache on and off, alternating. Per
run: the prompt tokens taken from the cache (on: those that waited one step for the first prompt's row and
copied the shared prefix from it), and the seconds from `add` to each request's first token (first, median,
last). Greedy, 4 new tokens each: the first tokens are what is measured.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_batch import load_workload  # noqa: E402


def burst(engine, prompts: list[list[int]], request, prefix_cache: bool) -> tuple[int, list[float]]:
    """(cached prompt tokens, sorted seconds from add to each first token) of one burst on a fresh scheduler."""
    from llamacli.generation import Scheduler, TokenEvent

    s = Scheduler(engine, len(prompts), max(map(len, prompts)) + request.max_new_tokens + 8,
                  prefix_cache=prefix_cache)
    t0 = time.perf_counter()
    for ids in prompts:
        s.add(ids, request)
    first: dict[int, float] = {}
    while not s.idle:
        for sid, event in s.step():
            if isinstance(event, TokenEvent) and sid not in first:
                first[sid] = time.perf_counter() - t0
    return s.cached_tokens, sorted(first.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint folder (default: the SmolLM2 test checkpoint)")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--repetitions", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    folder, engine, items = load_workload(args.model, args.prompts, 4)
    prompts, request = [ids for _, ids, _ in items], items[0][2]
    total = sum(map(len, prompts))
    print(f"{folder.name}: {len(prompts)} prompts added at once ({total} prompt tokens), fp32, {args.threads} threads")
    burst(engine, prompts[:2], request, True)  # warm-up
    for _ in range(args.repetitions):
        for on in (False, True):
            cached, ttft = burst(engine, prompts, request, on)
            print(f"prefix cache {'on ' if on else 'off'}: cached {cached:4d} of {total}, first token after "
                  f"{ttft[0]:.2f} s (first) {statistics.median(ttft):.2f} s (median) {ttft[-1]:.2f} s (last)")


if __name__ == "__main__":
    main()

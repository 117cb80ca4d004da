"""Aggregate generated tokens/s of batched decoding on SmolLM2-135M-Instruct (fp32, CPU) at batch sizes 1..16.

    python benchmarks/bench_batch.py [--max-new-tokens 64] [--batch-sizes 1,4,8,16] [--prompts 32] [--repetitions 3]

32 chat prompts of mixed length (about 30 to 180 prompt tokens) go through the batch scheduler at each batch size,
in the same process; a row ends at eos or max_new_tokens, as in real use. Aggregate = generated tokens / wall
time (prefills included). "forwards" counts passes over the weights: each decodes every active row and
prefills any prompt that just took a free slot; "rows/forward" is generated tokens per forward. Batch 8
should reach 4x batch 1. Greedy, so every batch size produces the same work (up to near-tie flips between batched
and single-row float sums, counted in the table as rows != first). `--threads` defaults to the cores (at most 2);
on a machine shared with other jobs use `--threads 1`, or oversubscribed OpenMP threads distort every number.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

TOPICS = ["the moon", "bread", "rivers", "a lighthouse", "chess", "volcanoes", "bees", "the printing press",
          "glaciers", "trains", "coffee", "octopuses", "the violin", "deserts", "paper", "owls"]


def make_prompts(n: int) -> list[list[dict]]:
    """n chat conversations whose prompts range from a short question to a long pasted context."""
    prompts = []
    for i in range(n):
        topic = TOPICS[i % len(TOPICS)]
        context = " ".join(f"Note {j}: {topic} appear in many stories, and people keep writing about them."
                           for j in range((i * 7) % 11))
        text = (f"{context}\n\n" if context else "") + f"Write a short paragraph about {topic}."
        prompts.append([{"role": "user", "content": text}])
    return prompts


def checkpoint_folder(model: str | None) -> Path:
    """The checkpoint folder a benchmark's --model names; None = the SmolLM2 test checkpoint (converted once)."""
    if model:
        return Path(model)
    from tests.smollm2 import smollm2_checkpoint

    return smollm2_checkpoint()


def load_workload(model: str | None, n_prompts: int, max_new_tokens: int):
    """(checkpoint folder, fp32 CPU engine, [(key, prompt ids, request)]) for `n_prompts` of make_prompts;
    model None = the SmolLM2 test checkpoint."""
    from llamacli.generation import Engine, Request

    folder = checkpoint_folder(model)
    engine = Engine.load(folder, dtype="float32", device="cpu")
    request = Request(max_new_tokens=max_new_tokens)
    return folder, engine, [(i, engine.chat_ids(m), request) for i, m in enumerate(make_prompts(n_prompts))]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint folder (default: the SmolLM2 test checkpoint)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=128)
    ap.add_argument("--batch-sizes", default="1,4,8,16")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--repetitions", type=int, default=1, help="runs of every batch size, alternating")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from llamacli.generation import generate_batch, scheduler_for

    folder, engine, items = load_workload(args.model, args.prompts, args.max_new_tokens)
    lengths = sorted(len(ids) for _, ids, _ in items)
    print(f"{folder.name}: {len(items)} prompts, prompt tokens {lengths[0]}..{lengths[-1]} "
          f"(total {sum(lengths)}), max_new_tokens {args.max_new_tokens}, fp32, {args.threads} threads")

    # Warm up kernels and allocator once, outside the measurements.
    list(generate_batch(engine, items[:4], 4))

    sizes = [int(b) for b in args.batch_sizes.split(",")]
    reference = None
    walls: dict[int, list[float]] = {bs: [] for bs in sizes}
    info: dict[int, tuple[int, int, int]] = {}  # batch size -> (generated, forwards, rows != first)
    for rep in range(args.repetitions):  # the sizes alternate, so a busy spell on the machine hits them alike
        for bs in sizes:
            decoder = scheduler_for(engine, items, bs)
            t0 = time.perf_counter()
            results = dict(generate_batch(engine, items, scheduler=decoder))
            wall = time.perf_counter() - t0
            generated = sum(len(r.token_ids) for r in results.values())
            if reference is None:
                reference = results
            differ = sum(results[k].token_ids != reference[k].token_ids for k in results)
            walls[bs].append(wall)
            info[bs] = (generated, decoder.steps, max(differ, info.get(bs, (0, 0, 0))[2]))
            print(f"  run {rep + 1}, batch {bs}: {generated} tokens in {wall:.1f} s", file=sys.stderr, flush=True)

    tps = {bs: info[bs][0] / statistics.median(walls[bs]) for bs in sizes}
    base = tps[sizes[0]]
    print(f"median of {args.repetitions} run(s); x batch{sizes[0]} compares medians; range = slowest..fastest run")
    print(f"{'batch':>5} {'generated':>9} {'wall s':>8} {'tok/s':>8} {'range':>13} {'x batch' + str(sizes[0]):>8} "
          f"{'forwards':>8} {'rows/forward':>12} {'rows != first':>13}")
    for bs in sizes:
        generated, steps, differ = info[bs]
        spread = f"{generated / max(walls[bs]):.1f}..{generated / min(walls[bs]):.1f}"
        print(f"{bs:>5} {generated:>9} {statistics.median(walls[bs]):>8.2f} {tps[bs]:>8.1f} {spread:>13} "
              f"{tps[bs] / base:>8.2f} {steps:>8} {generated / steps:>12.2f} {differ:>13}")
    if args.repetitions > 1:  # each run against the batch-1 run just before it: a busy spell shows as spread
        for bs in sizes[1:]:
            pairs = [w0 / w for w0, w in zip(walls[sizes[0]], walls[bs])]
            print(f"x batch{sizes[0]}, run by run, batch {bs}: {' '.join(f'{r:.2f}' for r in pairs)}")

if __name__ == "__main__":
    main()

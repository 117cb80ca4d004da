"""Tensor parallelism on SmolLM2-135M-Instruct (fp32, CPU, gloo): per-rank peak memory, bytes all-reduced per
token, and decode tok/s, 2 ranks against one process.

    python benchmarks/bench_parallel.py [--world 2] [--tokens 32] [--threads 1]

Each configuration runs in fresh processes (torch.multiprocessing, gloo on 127.0.0.1). Peak memory is the
process's peak RSS (ru_maxrss) and, to show what the model itself costs, the peak minus the RSS measured just
before loading (torch, llamacli and the process group already imported). The communication volume is counted
from the collectives one decode step actually runs. On one CPU host the ranks share the cores and the memory
bus, so the gloo tok/s says what the communication costs here, not what several machines or GPUs would give.
"""

from __future__ import annotations

import argparse
import os
import resource
import socket
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def _worker(rank: int, world: int, port: int, folder: str, tokens: int, threads: int, out: str) -> None:
    import torch.distributed as dist

    from llamacli import parallel
    from llamacli.config import load_config
    from llamacli.generation import Engine
    from llamacli.request import Request
    from llamacli.weights import load_model

    torch.set_num_threads(threads)
    if world > 1:
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world))
        parallel.init(torch.device("cpu"))
    before = _rss_mib()
    plan = parallel.ShardPlan.for_config(load_config(folder), rank, world) if world > 1 else None
    t0 = time.perf_counter()
    model = load_model(folder, shard=plan)
    load_s = time.perf_counter() - t0
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    weight_mib = sum(f.nbytes for f in model.formats().values()) / 2**20

    sent = {"bytes": 0, "calls": 0}
    for name in ("all_reduce", "all_gather"):
        real = getattr(dist, name)

        def counting(*args, _real=real, _name=name, **kwargs):
            t = args[0] if _name == "all_reduce" else args[1]
            sent["bytes"] += t.numel() * t.element_size()
            sent["calls"] += 1
            return _real(*args, **kwargs)

        setattr(dist, name, counting)
    engine = Engine(model)
    prompt = list(range(1, 33))
    with torch.inference_mode():
        cache = engine.new_cache(64)
        model(torch.tensor([prompt]), 0, cache, last_only=True)
        sent.update(bytes=0, calls=0)
        model(torch.tensor([[5]]), len(prompt), cache)  # one decode step: count its collectives
        step = dict(sent)
        engine.generate(prompt, Request(max_new_tokens=4, ignore_eos=True))  # warm-up
        fin = engine.generate(prompt, Request(max_new_tokens=tokens, ignore_eos=True))
    result = dict(rank=rank, world=world, before=before, peak=peak, load_s=load_s, weight_mib=weight_mib,
                  step_bytes=step["bytes"], step_calls=step["calls"], decode_tps=fin.stats.decode_tps)
    torch.save(result, Path(out) / f"{world}-{rank}.pt")
    if world > 1:
        parallel.shutdown()


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(folder: Path, world: int, tokens: int, threads: int) -> list[dict]:
    """Results of every rank of one configuration (world 1: one plain process)."""
    with tempfile.TemporaryDirectory() as out:
        torch.multiprocessing.spawn(_worker, args=(world, _port(), str(folder), tokens, threads, out), nprocs=world)
        return [torch.load(Path(out) / f"{world}-{r}.pt") for r in range(world)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--world", type=int, default=2)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="CPU threads per process")
    args = ap.parse_args()
    from llamacli.config import load_config
    from llamacli.parallel import comm_bytes_per_token
    from tests.smollm2 import smollm2_checkpoint

    folder = smollm2_checkpoint()
    config = load_config(folder)
    one = run(folder, 1, args.tokens, args.threads)[0]
    many = run(folder, args.world, args.tokens, args.threads)
    print(f"SmolLM2-135M fp32, CPU, {args.threads} thread(s) per process, {os.cpu_count()} cores on this host")
    print(f"{'':16}{'peak RSS MiB':>14}{'model part MiB':>16}{'weights MiB':>13}{'load s':>8}{'decode tok/s':>14}")
    for r in [one] + many:
        label = "one process" if r["world"] == 1 else f"rank {r['rank']} of {r['world']}"
        print(f"{label:16}{r['peak']:14.0f}{r['peak'] - r['before']:16.0f}{r['weight_mib']:13.0f}{r['load_s']:8.2f}"
              f"{r['decode_tps']:14.1f}")
    worst = max(many, key=lambda r: r["peak"])
    print(f"per-rank peak / one process: {100 * worst['peak'] / one['peak']:.0f}% of the whole RSS, "
          f"{100 * (worst['peak'] - worst['before']) / (one['peak'] - one['before']):.0f}% of the model part "
          "(target <= 60%)")
    want = comm_bytes_per_token(config, args.world)
    step = many[0]
    print(f"communication per decoded token and rank: {step['step_bytes']} bytes in {step['step_calls']} "
          f"collectives (expected {want['total']}: {want['per_layer']} per layer x {config.n_layers} layers for "
          f"the two all-reduces of dim {config.dim} fp32, {want['embedding']} for the embedding lookup, "
          f"{want['lm_head']} for this rank's share of the logits, gathered)")
    print(f"gloo on one CPU host: {step['decode_tps']:.1f} tok/s with {args.world} ranks vs {one['decode_tps']:.1f} "
          "in one process (the ranks share this host's cores and memory bus)")


if __name__ == "__main__":
    main()

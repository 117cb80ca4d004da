"""`llamacli serve` under load: N concurrent streaming clients (1, 4, 8, 16) over the batch benchmark's 32 prompts.

    python benchmarks/bench_serve.py [--model DIR] [--max-new-tokens 64] [--clients 1,4,8,16] [--threads 2]
                                     [--serve-args "--no-prefix-cache"]

The server runs as a real `python -m llamacli serve` subprocess (fp32, CPU, --batch-size 8); the clients are
asyncio httpx streams in this process, each sending the exact token ids of one prompt to /v1/completions (greedy,
usage included) and taking the next prompt when it is done. Per level: aggregate generated tokens/s (wall time
from the first request to the last [DONE]), time to first token p50/p95 (request sent -> first chunk with
text), inter-token latency p50/p95 (between a stream's text chunks) and the prompt tokens the server took from
its prefix cache (usage.prompt_tokens_details.cached_tokens) of all prompt tokens sent. The reference is the
same prompts through the batch scheduler at batch size 8 in this process (what `generate --prompts-file
--batch-size 8` runs), measured in the same run; the table gives the ratio. Targets: 8 clients >= 90% of it,
TTFT p95 at 8 clients < 3x the single client's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.bench_batch import load_workload  # noqa: E402


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100) by linear interpolation; 0 for no values."""
    if not values:
        return 0.0
    values = sorted(values)
    k = (len(values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(values) - 1)
    return values[lo] + (values[hi] - values[lo]) * (k - lo)


async def one_stream(client, ids: list[int], max_new: int) -> tuple[int, float, list[float], int]:
    """Stream one completion: (completion tokens, time to first text, gaps between text chunks, prompt tokens
    the server took from its cache)."""
    body = {"model": "bench", "prompt": ids, "max_tokens": max_new, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    t0 = time.perf_counter()
    first, last, gaps, tokens, cached = None, None, [], 0, 0
    async with client.stream("POST", "/v1/completions", json=body) as resp:
        resp.raise_for_status()
        async for line in resp.aiter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
                cached = chunk["usage"]["prompt_tokens_details"]["cached_tokens"]
            if chunk["choices"] and chunk["choices"][0]["text"]:
                now = time.perf_counter()
                if first is None:
                    first = now - t0
                else:
                    gaps.append(now - last)
                last = now
    return tokens, first or 0.0, gaps, cached


async def load_level(url: str, prompts: list[list[int]], clients: int, max_new: int) -> dict:
    """All prompts through `clients` concurrent streams; the level's numbers."""
    import httpx

    todo = list(prompts)
    ttfts, gaps, tokens, cached = [], [], 0, 0
    limits = httpx.Limits(max_connections=clients + 1)
    async with httpx.AsyncClient(base_url=url, timeout=600, limits=limits) as client:
        async def client_loop():
            nonlocal tokens, cached
            while todo:
                n, ttft, g, c = await one_stream(client, todo.pop(0), max_new)
                tokens += n
                cached += c
                ttfts.append(ttft)
                gaps.extend(g)

        t0 = time.perf_counter()
        await asyncio.gather(*(client_loop() for _ in range(clients)))
        wall = time.perf_counter() - t0
    return {"clients": clients, "tokens": tokens, "wall": wall, "tps": tokens / wall, "cached": cached,
            "prompt": sum(map(len, prompts)),
            "ttft50": pct(ttfts, 50), "ttft95": pct(ttfts, 95), "itl50": pct(gaps, 50), "itl95": pct(gaps, 95)}


def start_server(folder: Path, threads: int, extra: list[str] = ()) -> tuple[subprocess.Popen, str]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "PYTHONPATH": str(ROOT)}
    proc = subprocess.Popen([sys.executable, "-m", "llamacli", "serve", "--model", str(folder), "--port", "0",
                             "--batch-size", "8", "--max-queue", "64", "--context", "1024", "--dtype", "float32",
                             "--device", "cpu", "--model-name", "bench", *extra], cwd=ROOT, env=env,
                            stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()
    m = re.search(r"at (http://[\d.]+:\d+)/v1", line)
    if not m:
        proc.kill()
        raise SystemExit(f"the server did not start: {line}{proc.stderr.read()}")
    return proc, m.group(1)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint folder (default: the SmolLM2 test checkpoint)")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--max-new-tokens", type=int, default=64)
    ap.add_argument("--clients", default="1,4,8,16")
    ap.add_argument("--threads", type=int, default=min(2, os.cpu_count() or 1))
    ap.add_argument("--serve-args", default="", help="more options for llamacli serve, e.g. --no-prefix-cache")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from llamacli.generation import generate_batch

    folder, engine, items = load_workload(args.model, args.prompts, args.max_new_tokens)
    prompts = [ids for _, ids, _ in items]
    print(f"{folder.name}: {len(items)} prompts, max_new_tokens {args.max_new_tokens}, fp32 CPU, "
          f"{args.threads} threads; server --batch-size 8")
    list(generate_batch(engine, items[:4], 4))  # warm up

    def reference() -> float:
        t0 = time.perf_counter()
        tokens = sum(len(f.token_ids) for _, f in generate_batch(engine, items, 8))
        tps = tokens / (time.perf_counter() - t0)
        print(f"reference (the generate --prompts-file --batch-size 8 path): {tokens} tokens, {tps:.1f} tok/s",
              file=sys.stderr, flush=True)
        return tps

    before = reference()
    import shlex

    proc, url = start_server(folder, args.threads, shlex.split(args.serve_args))
    try:
        asyncio.run(load_level(url, prompts[:4], 4, 8))  # warm up the server
        rows = []
        for n in (int(c) for c in args.clients.split(",")):
            rows.append(asyncio.run(load_level(url, prompts, n, args.max_new_tokens)))
            print(f"  {n} clients: {rows[-1]['tokens']} tokens in {rows[-1]['wall']:.1f} s", file=sys.stderr,
                  flush=True)
    finally:
        proc.terminate()
        proc.wait(60)
    after = reference()  # before and after the server runs: a busy spell on a shared machine shows as a spread
    batch_tps = (before + after) / 2
    print(f"reference batch 8: {before:.1f} tok/s before, {after:.1f} after; x batch8 is against their mean")
    print(f"{'clients':>7} {'tokens':>6} {'tok/s':>7} {'x batch8':>8} {'TTFT p50':>9} {'TTFT p95':>9} "
          f"{'ITL p50':>8} {'ITL p95':>8} {'cached/prompt':>13}")
    for r in rows:
        print(f"{r['clients']:>7} {r['tokens']:>6} {r['tps']:>7.1f} {r['tps'] / batch_tps:>8.2f} "
              f"{r['ttft50'] * 1000:>7.0f}ms {r['ttft95'] * 1000:>7.0f}ms {r['itl50'] * 1000:>6.0f}ms "
              f"{r['itl95'] * 1000:>6.0f}ms {r['cached']:>6}/{r['prompt']:<6}")


if __name__ == "__main__":
    main()

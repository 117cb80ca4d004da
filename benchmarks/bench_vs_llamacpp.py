"""llamacli against llama.cpp (through llama-cpp-python) on the same weights, each in its own process, alternating.

    # llama.cpp is a benchmark-only dependency; build it once, in its own venv if you like (~10 min on 2 cores):
    CMAKE_ARGS="-DGGML_NATIVE=ON" python -m venv /tmp/lcpp && /tmp/lcpp/bin/pip install llama-cpp-python
    /tmp/lcpp/bin/python ../shared/tools/gguf_variants.py SmolLM2-135M-Instruct.Q4_1.gguf VARIANTS f32 f16 q8_0 q4_0 q4_k_m
    .venv/bin/python benchmarks/bench_vs_llamacpp.py --checkpoint F32_FOLDER --gguf SmolLM2-135M-Instruct.Q4_1.gguf \
        --variants VARIANTS --llamacpp-python /tmp/lcpp/bin/python [--threads 2,1] [--repetitions 3]
    ... --perplexity tests/data/english.txt      # perplexity of each side's weights on the same token ids

Pairs (llamacli weights vs llama.cpp file), all from the same underlying values (the Q4_1 file and the f32
checkpoint `llamacli convert` makes of it): fp32 vs f32, bf16 vs f16, int8 (`--quantize int8`) vs Q8_0, int4 g32
(`--quantize int4`) vs Q4_0 / Q4_1 / Q4_K_M, and the Q4_1 GGUF loaded directly by llamacli vs the same file.
Each measurement is a fresh process: load, prefill random prompt ids (timed), then greedy one-token steps (timed
inside the process, argmax included on both sides). Engines alternate within each repetition, so a busy spell
slows both; medians per cell, and each llamacli/llama.cpp ratio is taken within one repetition.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

# name -> (llamacli load options, llama.cpp variant file suffix). The quantized formats multiply bf16 rows either
# way (llamacli.quant.formats); "-bf16" runs the rest of the model (residual stream, norms, attention) in bf16 too.
PAIRS = {
    "fp32": (dict(dtype="float32"), "f32"),
    "bf16": (dict(dtype="bfloat16"), "f16"),
    "int8": (dict(dtype="float32", quantize="int8"), "q8_0"),
    "int8-bf16": (dict(dtype="bfloat16", quantize="int8"), "q8_0"),
    "int4-q4_0": (dict(dtype="bfloat16", quantize="int4"), "q4_0"),
    "int4-q4_1": (dict(dtype="bfloat16", quantize="int4"), "q4_1"),
    "int4-q4_k_m": (dict(dtype="bfloat16", quantize="int4"), "q4_k_m"),
    "gguf-q4_1": (dict(dtype="bfloat16", gguf=True), "q4_1"),
    # What `generate --quantize int4` / `--model x.Q4_1.gguf` run by default on a CPU (dtype auto = float32):
    # fp32 activations; on a CPU without native bf16 (AVX2) the bf16 rest above is slower.
    "int4-f32-q4_1": (dict(dtype="float32", quantize="int4"), "q4_1"),
    "gguf-f32-q4_1": (dict(dtype="float32", gguf=True), "q4_1"),
}


def rss_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def english_ids(path: str, checkpoint: str) -> list[int]:
    sys.path.insert(0, str(ROOT))
    from llamacli.prompts import encode_raw
    from llamacli.tokenizer import load_tokenizer

    return encode_raw(load_tokenizer(checkpoint), Path(path).read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------------------------
# Workers: one measurement each, in a fresh process; they print one JSON line


def llamacli_worker(args) -> dict:
    sys.path.insert(0, str(ROOT))
    import torch

    from llamacli.bench import time_generation
    from llamacli.perplexity import compute_perplexity
    from llamacli.sources import resolve_model
    from llamacli.weights import load_model

    torch.set_num_threads(args.threads)
    opts = json.loads(args.options)
    folder = resolve_model(args.gguf) if opts.pop("gguf", False) else args.checkpoint
    with torch.inference_mode():
        model = load_model(folder, decode_rows=1, **opts)  # batch 1: what generate loads
        out = {"rss_mib": rss_mib(), "weight_mib": model.weight_bytes_per_step() / 2**20}
        if args.ppl_ids:
            ids = json.loads(Path(args.ppl_ids).read_text())
            return out | {"perplexity": compute_perplexity(model, ids, args.ppl_context, args.ppl_context // 2).perplexity}
        torch.manual_seed(0)
        for P in args.prompt_tokens:
            prompt = torch.randint(0, model.config.vocab_size, (1, P))
            time_generation(model, prompt[:, :16], 4)  # warm-up
            prefill, decode = time_generation(model, prompt, args.gen_tokens if P == args.prompt_tokens[0] else 0)
            out[f"prefill{P}_tok_s"] = P / prefill
            if P == args.prompt_tokens[0]:
                out["decode_tok_s"] = args.gen_tokens / decode
    return out


def llamacpp_worker(args) -> dict:
    import numpy as np
    from llama_cpp import Llama

    need = max(args.prompt_tokens) + args.gen_tokens + 8 if not args.ppl_ids else args.ppl_context
    llm = Llama(model_path=args.gguf, n_threads=args.threads, n_threads_batch=args.threads, n_ctx=need,
                n_batch=512, n_ubatch=512, logits_all=bool(args.ppl_ids), verbose=False)
    out = {"rss_mib": rss_mib()}
    if args.ppl_ids:
        ids = json.loads(Path(args.ppl_ids).read_text())
        out["perplexity"] = llamacpp_perplexity(llm, ids, args.ppl_context, args.ppl_context // 2)
        return out
    rng = np.random.default_rng(0)
    vocab = llm.n_vocab()
    for P in args.prompt_tokens:
        prompt = rng.integers(0, vocab, P).tolist()
        llm.reset()
        llm.eval(prompt[:16])  # warm-up
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
        t1 = time.perf_counter()
        out[f"prefill{P}_tok_s"] = P / (t1 - t0)
        if P == args.prompt_tokens[0]:
            for _ in range(args.gen_tokens):
                llm.eval([token])
                token = int(np.argmax(llm.scores[llm.n_tokens - 1]))
            out["decode_tok_s"] = args.gen_tokens / (time.perf_counter() - t1)
    return out


def llamacpp_perplexity(llm, ids: list[int], context: int, stride: int) -> float:
    """llamacli.perplexity's windows, scored from llama.cpp's logits of each window."""
    import math

    import numpy as np

    total, count, prev_end = 0.0, 0, 0
    for begin in range(0, len(ids), stride):
        end = min(begin + context, len(ids))
        first = max(prev_end, begin + 1)
        llm.reset()
        llm.eval(ids[begin:end])
        logits = np.asarray(llm.scores[first - 1 - begin:end - 1 - begin], dtype=np.float64)
        logits -= logits.max(-1, keepdims=True)
        lp = logits[np.arange(end - first), ids[first:end]] - np.log(np.exp(logits).sum(-1))
        total, count = total - lp.sum(), count + (end - first)
        prev_end = end
        if end == len(ids):
            break
    return math.exp(total / count)


# ---------------------------------------------------------------------------------------------
# Driver


def run_worker(python: str, engine: str, args, threads: int, options: dict | None, gguf: str,
               ppl_ids: str | None) -> dict:
    cmd = [python, __file__, "--worker", engine, "--threads", str(threads), "--gguf", gguf,
           "--prompt-tokens", ",".join(map(str, args.prompt_tokens)), "--gen-tokens", str(args.gen_tokens),
           "--ppl-context", str(args.ppl_context)]
    if args.checkpoint:
        cmd += ["--checkpoint", args.checkpoint]
    if options is not None:
        cmd += ["--options", json.dumps(options)]
    if ppl_ids:
        cmd += ["--ppl-ids", ppl_ids]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"{engine} worker failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="the f32 checkpoint folder made from the GGUF (llamacli convert)")
    ap.add_argument("--gguf", required=True, help="the Q4_1 GGUF (the source of every variant)")
    ap.add_argument("--variants", help="folder of gguf_variants.py's outputs (NAME-f32.gguf, ...)")
    ap.add_argument("--llamacpp-python", default=sys.executable, help="a Python that has llama_cpp")
    ap.add_argument("--pairs", default=",".join(PAIRS))
    ap.add_argument("--threads", default="2,1")
    ap.add_argument("--prompt-tokens", default="128,512", help="decode follows the first")
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repetitions", type=int, default=3)
    ap.add_argument("--perplexity", metavar="TEXT", help="instead of speed: perplexity of each side on this text")
    ap.add_argument("--ppl-context", type=int, default=1024)
    ap.add_argument("--worker", choices=["llamacli", "llamacpp"], help=argparse.SUPPRESS)
    ap.add_argument("--options", help=argparse.SUPPRESS)
    ap.add_argument("--ppl-ids", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.prompt_tokens = [int(v) for v in str(args.prompt_tokens).split(",")]
    if args.worker:
        args.threads = int(args.threads)
        result = llamacli_worker(args) if args.worker == "llamacli" else llamacpp_worker(args)
        print(json.dumps(result))
        return

    stem = Path(args.gguf).name.split(".")[0]
    variant = {suffix: (args.gguf if suffix == "q4_1" else str(Path(args.variants) / f"{stem}-{suffix}.gguf"))
               for _, suffix in PAIRS.values()}
    pairs = args.pairs.split(",")
    ppl_ids = None
    if args.perplexity:
        ids = english_ids(args.perplexity, args.checkpoint)
        ppl_ids = str(Path(os.environ.get("TMPDIR", "/tmp")) / "bench_vs_llamacpp_ids.json")
        Path(ppl_ids).write_text(json.dumps(ids))
        print(f"perplexity over {len(ids)} tokens, windows of {args.ppl_context}, stride {args.ppl_context // 2}")
        for name in pairs:
            opts, suffix = PAIRS[name]
            ours = run_worker(sys.executable, "llamacli", args, 2, opts, args.gguf, ppl_ids)["perplexity"]
            theirs = run_worker(args.llamacpp_python, "llamacpp", args, 2, None, variant[suffix], ppl_ids)["perplexity"]
            print(f"{name:<12} llamacli {ours:8.4f}   llama.cpp {suffix:<7} {theirs:8.4f}   ratio {ours / theirs:.4f}",
                  flush=True)
        return

    print(f"{args.repetitions} repetitions, prompts {args.prompt_tokens}, {args.gen_tokens} new tokens; "
          f"tok/s medians, ratio = llamacli / llama.cpp within each repetition")
    for threads in (int(t) for t in args.threads.split(",")):
        results: dict[str, list[tuple[dict, dict]]] = {name: [] for name in pairs}
        for rep in range(args.repetitions):
            for name in pairs:
                opts, suffix = PAIRS[name]
                sides = [("llamacli", sys.executable, opts, args.gguf), ("llamacpp", args.llamacpp_python, None,
                                                                         variant[suffix])]
                if rep % 2:
                    sides.reverse()
                got = {engine: run_worker(py, engine, args, threads, o, g, None) for engine, py, o, g in sides}
                results[name].append((got["llamacli"], got["llamacpp"]))
        print(f"\n{threads} thread(s)")
        keys = ["decode_tok_s"] + [f"prefill{P}_tok_s" for P in args.prompt_tokens]
        print(f"{'pair':<12} " + " ".join(f"{k.removesuffix('_tok_s'):>26}" for k in keys) + f" {'RSS MiB ours/theirs':>20}")
        for name, runs in results.items():
            cells = []
            for k in keys:
                ours = statistics.median(r[0][k] for r in runs)
                theirs = statistics.median(r[1][k] for r in runs)
                ratio = statistics.median(r[0][k] / r[1][k] for r in runs)
                cells.append(f"{ours:7.1f} / {theirs:7.1f} = {ratio:5.2f}x")
            rss = f"{statistics.median(r[0]['rss_mib'] for r in runs):.0f} / {statistics.median(r[1]['rss_mib'] for r in runs):.0f}"
            print(f"{name:<12} " + " ".join(f"{c:>26}" for c in cells) + f" {rss:>20}", flush=True)


if __name__ == "__main__":
    main()

"""llamacli against transformers on the same checkpoint, in the same process, for fp32 / bf16 / fp16.

    .venv/bin/python benchmarks/bench_vs_transformers.py --model ~/.cache/llamacli-tests/smollm2-135m-instruct-f32

Both run the same loop: prefill random prompt tokens into a KV cache (logits for the last position only),
then greedy one-token steps. The two implementations alternate within each repetition, so a busy machine
slows both alike; medians are reported. transformers is a benchmark-only dependency.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamacli.bench import kv_bytes_per_step, measure_bandwidth, time_generation, weight_bytes_per_step  # noqa: E402
from llamacli.weights import load_model  # noqa: E402


@torch.inference_mode()
def hf_time_generation(model, prompt: torch.Tensor, gen_tokens: int) -> tuple[float, float]:
    """The same loop with a transformers model and its default (dynamic) cache: (prefill_s, decode_s)."""
    from transformers import DynamicCache

    cache = DynamicCache(config=model.config)
    t0 = time.perf_counter()
    out = model(input_ids=prompt, past_key_values=cache, use_cache=True, logits_to_keep=1)
    token = out.logits[:, -1].argmax(-1, keepdim=True)
    t1 = time.perf_counter()
    for _ in range(gen_tokens):
        out = model(input_ids=token, past_key_values=cache, use_cache=True)
        token = out.logits[:, -1].argmax(-1, keepdim=True)
    return t1 - t0, time.perf_counter() - t1


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True, help="HF checkpoint folder (safetensors)")
    ap.add_argument("--dtypes", default="float32,bfloat16,float16")
    ap.add_argument("--prompt-tokens", default="128,512", help="prefill lengths; decode follows the first")
    ap.add_argument("--gen-tokens", type=int, default=128)
    ap.add_argument("--repetitions", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import transformers

    transformers.logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    lengths = [int(v) for v in args.prompt_tokens.split(",")]
    bandwidth, method = measure_bandwidth("cpu")
    print(f"torch {torch.__version__}, transformers {transformers.__version__}, {torch.get_num_threads()} threads, "
          f"CPU capability {torch.backends.cpu.get_cpu_capability()}")
    print(f"measured memory bandwidth: {bandwidth:.1f} GB/s ({method})")
    print(f"decode: {args.gen_tokens} new tokens after a {lengths[0]}-token prompt, batch 1; "
          f"median of {args.repetitions} after a warm-up\n")

    gen = torch.Generator().manual_seed(0)
    rows = []
    for dtype in args.dtypes.split(","):
        ours = load_model(args.model, dtype=dtype, device="cpu", decode_rows=1)  # what generate loads
        vocab = ours.config.vocab_size
        hf = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, dtype)).eval()
        impls = {"llamacli": lambda p, n: time_generation(ours, p, n),
                 "transformers": lambda p, n: hf_time_generation(hf, p, n)}
        prompts = {n: torch.randint(0, vocab, (1, n), generator=gen) for n in lengths}
        prefill = {(i, n): [] for i in impls for n in lengths}
        decode = {i: [] for i in impls}
        for run in impls.values():  # warm-up
            for n in lengths:
                run(prompts[n], 4)
        for _ in range(args.repetitions):
            for name, run in impls.items():
                for n in lengths:
                    pre_s, dec_s = run(prompts[n], args.gen_tokens if n == lengths[0] else 1)
                    prefill[name, n].append(n / pre_s)
                    if n == lengths[0]:
                        decode[name].append(args.gen_tokens / dec_s)
        step_bytes = weight_bytes_per_step(ours) + kv_bytes_per_step(
            ours, lengths[0] + args.gen_tokens / 2, 1, ours.dtype)
        med = {k: statistics.median(v) for k, v in {**prefill, **decode}.items()}
        for name in impls:
            gbps = step_bytes * med[name] / 1e9
            rows.append((dtype, name, *[med[name, n] for n in lengths], med[name], med[name] / med["transformers"],
                         gbps, 100 * gbps / bandwidth))
        del ours, hf, impls
        gc.collect()

    head = ["dtype", "impl", *[f"prefill {n} tok/s" for n in lengths], "decode tok/s", "decode vs HF",
            "decode GB/s", "% of bw"]
    fmt = ["{}", "{}", *["{:.0f}"] * len(lengths), "{:.1f}", "{:.2f}x", "{:.1f}", "{:.0f}%"]
    table = [head] + [[f.format(v) for f, v in zip(fmt, r)] for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(head))]
    for j, r in enumerate(table):
        print("| " + " | ".join(c.rjust(w) if i > 1 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))) + " |")
        if j == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")


if __name__ == "__main__":
    main()

"""Where one decode step's time goes: the matrix products alone against everything else, per weight format.

    .venv/bin/python benchmarks/profile_decode.py --model ~/.cache/llamacli-tests/smollm2-135m-instruct-f32 \
        --formats fp32,bf16,int8,int4 --threads 1,2 [--floor]

For each format and thread count it times, with the same runtime and the same weights:
- `step`: one whole decode step (one token, KV cache at `--context` positions), as generation runs it;
- `products`: the step's matrix products alone, in the same order on inputs of the same shapes (each layer's
  q/k/v, o, gate/up and down, then the lm_head): the part that has to stream every weight once;
- `rest` = step - products: norms, RoPE, cache writes, attention, activations, Python and dispatch.
It prints the bytes one step reads, the bandwidth measured on the spot (`llamacli.bench.measure_bandwidth`)
and the fraction of it that the products and the whole step reach. Medians of `--steps` steps, after warm-up.

With `--floor`, also `floor`: the same step of a random model as deep as this one but 64 wide (its weights cost
nothing), in the same format and layout: what a step costs in dispatch, Python and per-call overhead alone.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamacli.bench import measure_bandwidth, median_ms  # noqa: E402
from llamacli.kv_cache import KVCache  # noqa: E402
from llamacli.weights import load_model  # noqa: E402

FORMATS = {"fp32": ("float32", None), "bf16": ("bfloat16", None), "fp16": ("float16", None),
           "int8": ("float32", "int8"), "int4": ("float32", "int4"),
           "int8-bf16": ("bfloat16", "int8"), "int4-bf16": ("bfloat16", "int4")}


def profile(model, context: int, steps: int) -> dict[str, float]:
    """{'step', 'products'} in ms for one decode step of `model` at `context` cached positions."""
    cache = KVCache(model.config, 1, context + 8, dtype=model.dtype)
    prompt = torch.randint(0, model.config.vocab_size, (1, context))
    model(prompt, 0, cache, last_only=True)
    token = torch.zeros(1, 1, dtype=torch.long)

    def step():
        model(token, context, cache, last_only=True)  # the same position each time: same work every step

    compute = model.dtype if model.dtype != torch.float16 else torch.float32
    products = []
    for L in model.layers:
        for w in (L.qkv, L.o, L.gate_up, L.down):
            products.append((w, torch.randn(1, w.in_features, dtype=compute)))
    products.append((model.lm_head, torch.randn(1, model.lm_head.in_features, dtype=compute)))

    def matmuls():
        for w, x in products:
            w.mm(x)

    with torch.inference_mode():
        return {"step": median_ms(step, steps, warmup=3), "products": median_ms(matmuls, steps, warmup=3)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", required=True)
    ap.add_argument("--formats", default="fp32,bf16,int8,int4", help=f"any of {','.join(FORMATS)}")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--context", type=int, default=128, help="cached positions when the step runs")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--unpacked", action="store_true", help="fp32 weights unpacked (what one thread decodes with)")
    ap.add_argument("--floor", action="store_true", help="also time a 64-wide model of the same depth")
    args = ap.parse_args()
    floor_folder = None
    if args.floor:  # random weights written by the tests' helper (transformers: a test dependency)
        import tempfile

        from llamacli.config import load_config
        from tests.conftest import write_tiny_checkpoint

        depth = load_config(args.model).n_layers
        floor_folder = write_tiny_checkpoint(Path(tempfile.mkdtemp()) / "floor", num_hidden_layers=depth,
                                             max_position_embeddings=args.context + 64)

    print(f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}, "
          f"context {args.context}, median of {args.steps} steps")
    print(f"{'format':<10} {'thr':>3} {'MB/step':>8} {'GB/s':>6} {'step ms':>8} {'prod ms':>8} {'rest ms':>8} "
          f"{'prod %bw':>8} {'step %bw':>8}" + (f" {'floor ms':>8}" if floor_folder else ""))
    for name in args.formats.split(","):
        dtype, quantize = FORMATS[name]
        with torch.inference_mode():
            model = load_model(args.model, dtype=dtype, quantize=quantize, pack=not args.unpacked)
            floor = floor_folder and load_model(floor_folder, dtype=dtype, quantize=quantize, pack=not args.unpacked)
        nbytes = model.weight_bytes_per_step()
        for threads in (int(t) for t in args.threads.split(",")):
            torch.set_num_threads(threads)
            bandwidth, _ = measure_bandwidth("cpu")
            r = profile(model, args.context, args.steps)
            ideal_ms = nbytes / bandwidth / 1e6
            print(f"{name:<10} {threads:>3} {nbytes / 1e6:>8.1f} {bandwidth:>6.1f} {r['step']:>8.2f} "
                  f"{r['products']:>8.2f} {r['step'] - r['products']:>8.2f} {ideal_ms / r['products']:>8.0%} "
                  f"{ideal_ms / r['step']:>8.0%}" + (f" {profile(floor, args.context, args.steps)['step']:>8.2f}"
                                                      if floor else ""), flush=True)
        del model


if __name__ == "__main__":
    main()

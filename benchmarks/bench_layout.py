"""fp32 weight layouts on a CPU: oneDNN-packed against MKL on (in, out) storage, per rows a forward multiplies.

    python benchmarks/bench_layout.py [--model DIR] [--threads 1,2] [--rows 1,8] [--prefill 128] [--steps 30]
    python benchmarks/bench_layout.py --upcast [--dtypes bfloat16,float16] [--prefills 16,32,64,128,512]

Loads the checkpoint twice in fp32, packed (`Packed`) and unpacked (`Transposed`), and times, layouts alternating
three times, each median of --steps: a decode step of R rows (KV cache at 128 positions) for each --rows, and a
prefill of --prefill tokens. The fastest layout per row count is what `model/cpu.pack_for_rows` encodes
(`load_model(decode_rows=...)`).

With `--upcast`: half weights on a CPU without native support for them, which a forward of many rows upcasts to
fp32 per matrix; times prefills of each --prefills length with the upcast weight multiplied as it is against
oneDNN-packed on the spot (alternating, best of 5 single forwards), which is what `model/cpu.half_pack_rows_min`
encodes per CPU.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_batch import checkpoint_folder  # noqa: E402
from llamacli.bench import median_ms  # noqa: E402
from llamacli.kv_cache import KVCache  # noqa: E402
from llamacli.weights import load_model  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="checkpoint folder (default: the SmolLM2 test checkpoint)")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--rows", default="1,8")
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--steps", type=int, default=30)
    ap.add_argument("--upcast", action="store_true", help="half weights: upcast against upcast + pack on the spot")
    ap.add_argument("--dtypes", default="bfloat16,float16", help="with --upcast: the half dtypes")
    ap.add_argument("--prefills", default="16,32,64,128,512", help="with --upcast: prompt lengths")
    args = ap.parse_args()
    folder = checkpoint_folder(args.model)
    if args.upcast:
        return upcast(folder, args)
    models = {name: load_model(folder, dtype="float32", device="cpu", pack=pack)
              for name, pack in (("packed", True), ("unpacked", False))}
    print(f"{folder.name} fp32, CPU {torch.backends.cpu.get_cpu_capability()}; ms, best of 3 alternating medians")
    print(f"{'threads':>7} {'work':>16} {'packed ms':>10} {'unpacked ms':>12} {'unpacked/packed':>16}")
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        work = {}
        with torch.inference_mode():
            for rows in (int(r) for r in args.rows.split(",")):
                caches = {}
                for name, model in models.items():
                    caches[name] = KVCache(model.config, rows, 128 + 8, dtype=torch.float32)
                    model(torch.randint(0, 1000, (rows, 128)), 0, caches[name], last_only=True)
                token = torch.zeros(rows, 1, dtype=torch.long)
                work[f"decode {rows} row{'s' if rows > 1 else ''}"] = {
                    name: (lambda m=model, c=caches[name], t=token: m(t, 128, c, last_only=True))
                    for name, model in models.items()}
            ids = torch.randint(0, 1000, (1, args.prefill))
            work[f"prefill {args.prefill}"] = {name: (lambda m=model: m(ids, last_only=True))
                                               for name, model in models.items()}
            for label, fns in work.items():
                times: dict[str, list[float]] = {name: [] for name in fns}
                for _ in range(3):  # layouts alternating
                    for name, fn in fns.items():
                        times[name].append(median_ms(fn, args.steps if "decode" in label else 3, warmup=2))
                ms = {name: min(t) for name, t in times.items()}
                print(f"{threads:>7} {label:>16} {ms['packed']:>10.1f} {ms['unpacked']:>12.1f} "
                      f"{ms['unpacked'] / ms['packed']:>16.2f}", flush=True)


def upcast(folder: Path, args) -> None:
    """Prefills of half weights upcast per matrix: multiplied as upcast against oneDNN-packed on the spot."""
    import llamacli.model.linear as linear

    threads = int(args.threads.split(",")[-1])
    torch.set_num_threads(threads)
    print(f"{folder.name}, CPU {torch.backends.cpu.get_cpu_capability()}, {threads} threads; prefill ms, best of 5 "
          f"alternating; half_pack_rows_min() here: {linear.half_pack_rows_min()}")
    print(f"{'dtype':>9} {'tokens':>6} {'upcast ms':>10} {'upcast+pack ms':>15} {'pack/upcast':>12}")
    original = linear.half_pack_rows_min
    try:
        for dtype in args.dtypes.split(","):
            with torch.inference_mode():
                model = load_model(folder, dtype=dtype, device="cpu")
                for n in (int(p) for p in args.prefills.split(",")):
                    ids, cache = torch.randint(0, 1000, (1, n)), KVCache(model.config, 1, n)
                    times: dict[str, list[float]] = {"upcast": [], "pack": []}
                    for _ in range(5):
                        for name, rows_min in (("upcast", None), ("pack", 1)):
                            linear.half_pack_rows_min = lambda r=rows_min: r
                            times[name].append(median_ms(lambda: model(ids, 0, cache, last_only=True), 1, warmup=0))
                    a, b = min(times["upcast"]), min(times["pack"])
                    print(f"{dtype:>9} {n:>6} {a:>10.1f} {b:>15.1f} {b / a:>12.2f}", flush=True)
    finally:
        linear.half_pack_rows_min = original


if __name__ == "__main__":
    main()

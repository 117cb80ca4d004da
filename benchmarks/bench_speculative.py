"""Speculative decoding on SmolLM2-135M, 2 threads, 128 new tokens (greedy, eos ignored so every run has the same
length): tok/s vs plain decoding, acceptance rate and mean accepted length per round, per draft kind and K, on an
input-grounded workload (rewrite a ~400-token passage given in the prompt) and an open-ended one (a story).

SmolLM2-135M has no smaller sibling with its tokenizer, so `--draft-model` is measured with a draft built here:
the checkpoint's first N layers (and its embeddings, final norm and head) written to a temp folder, a
same-tokenizer model of about N/30 of the per-token cost. `--draft-quantize int4` is measured as the CLI runs
it: an int4 copy (group 32) of the same checkpoint, quantized as it loads, sharing the model's KV cache. Last, the
measured per-forward costs: a 1-token step against a (k+1)-token verify forward at the same position, which bound
what any draft can win.

    python benchmarks/bench_speculative.py [--threads 2] [--new 128] [--layers 6] [--ks 2,4,8] [--adaptive-ks 4]
        [--kinds lookup,layers,int4] [--repeat 3]  (a smoke run: --new 16 --ks 2 --kinds int4)

`--ks` are the fixed-K runs, `--adaptive-ks` the adaptive ones (K their upper bound; default: --draft-tokens').
With `--repeat N` every repetition runs plain decoding and then each draft run, each ratio is taken against its
own repetition's plain run, and a cell shows the median with the range (a 2-core machine varies by 10% or more
from one run to the next).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from llamacli.generation import DraftModel, Engine, PromptLookup, Request, Speculator  # noqa: E402
from llamacli.request import DEFAULT_DRAFT_TOKENS  # noqa: E402

PASSAGE = (
    "The lighthouse on Carrow Point was built in 1871, after three ships were lost on the reef in a single winter. "
    "Its tower is forty-one metres tall, made of granite blocks cut on the mainland and carried across by barge "
    "during the calm months of summer. For most of its history the light was kept by two families who lived in "
    "the cottages at its base. They trimmed the wicks, wound the clockwork that turned the lens, and wrote the "
    "weather into a logbook every four hours. In 1932 the oil lamp was replaced by an electric one, powered by a "
    "diesel generator that the keepers had to start by hand each evening. The generator was loud, and the keepers "
    "complained that they could no longer hear the sea. In 1968 a storm tore the roof from the northern cottage "
    "and flooded the store room, destroying forty years of logbooks. Only the volumes kept in the tower survived. "
    "The last keeper, Margaret Hale, left in 1991, when the light was automated and connected to the mainland by "
    "a cable laid along the sea floor. Today the station is run from a control room two hundred kilometres away. "
    "The cottages have been restored by a local trust and are open to visitors from April to October. The trust "
    "also publishes the surviving logbooks, which record not only the weather but also the birds that nested on "
    "the cliffs, the ships that passed, and the small events of daily life: a birthday, a broken window, a seal "
    "that slept on the landing stage for a week. Researchers have used the records to study how the climate of "
    "the coast has changed, because the keepers measured the temperature of the air and the sea at the same hour "
    "every day for more than a century. The measurements show that the sea has warmed by almost one degree since "
    "the records began, and that the storms of winter now arrive later in the year than they once did."
)
GROUNDED = "Rewrite the following passage in your own words, keeping every fact:\n\n" + PASSAGE
OPEN = "Write a long story about a fox who wants to learn to sing."


def truncated_checkpoint(folder: Path, out_root: Path, n_layers: int) -> Path:
    """A copy of the checkpoint in `folder` that keeps its first n_layers blocks: a same-tokenizer draft."""
    from safetensors.torch import load_file, save_file

    out = Path(out_root) / f"first{n_layers}"
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for f in sorted(Path(folder).glob("*.safetensors")):
        for name, t in load_file(f).items():
            parts = name.split(".")
            if "layers" in parts and int(parts[parts.index("layers") + 1]) >= n_layers:
                continue
            tensors[name] = t.contiguous()
    save_file(tensors, out / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((Path(folder) / "config.json").read_text())
    config["num_hidden_layers"] = n_layers
    (out / "config.json").write_text(json.dumps(config))
    for f in Path(folder).iterdir():
        if f.is_file() and f.suffix != ".safetensors" and f.name not in ("config.json", "model.safetensors.index.json"):
            shutil.copy(f, out / f.name)
    return out


def _spread(values: list[float], fmt: str) -> str:
    """The median of values, with their range when there are several: '1.31 (1.25-1.36)'."""
    text = format(statistics.median(values), fmt)
    return text if len(values) == 1 else f"{text} ({format(min(values), fmt)}-{format(max(values), fmt)})"


def run(engine, ids, n_new, stream) -> dict:
    """One generation: decode tok/s and the draft counts."""
    fin = None
    for event in stream(ids, Request(max_new_tokens=n_new, ignore_eos=True)):
        fin = event
    s = fin.stats
    out = {"tok_s": s.decode_tps, "tokens": fin.token_ids}
    if s.draft:
        out.update(rate=s.acceptance_rate, mean_accepted=s.accepted_tokens / max(1, s.verify_forwards),
                   mean_drafted=s.drafted_tokens / max(1, s.verify_forwards), forwards=s.verify_forwards)
    return out


def forward_costs(engines: dict, position: int, ks=(1, 2, 4, 8), repeats: int = 20) -> dict:
    """Median ms of a 1-token step and of (k+1)-token forwards at `position`, per engine; engines and sizes
    interleave in every repeat, so a busy spell slows them all alike."""
    caches = {}
    for name, engine in engines.items():
        caches[name] = engine.new_cache(position + 16)
        engine.model(torch.randint(0, 1000, (1, position)), 0, caches[name])
    sizes = [1] + [k + 1 for k in ks]
    times = {(name, T): [] for name in engines for T in sizes}
    for _ in range(repeats):
        for name, engine in engines.items():
            for T in sizes:
                tokens = torch.randint(0, 1000, (1, T))
                t0 = time.perf_counter()
                engine.model(tokens, position, caches[name])
                times[name, T].append(time.perf_counter() - t0)
    return {name: {T: statistics.median(times[name, T]) * 1000 for T in sizes} for name in engines}


@torch.inference_mode()
def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--layers", type=int, default=6, help="layers kept in the truncated draft")
    ap.add_argument("--ks", default="2,4,8", help="K of the fixed-K runs")
    ap.add_argument("--adaptive-ks", default=str(DEFAULT_DRAFT_TOKENS), help="K (the upper bound) of the adaptive runs")
    ap.add_argument("--kinds", default="lookup,layers,int4", help="draft kinds: lookup, layers, int4")
    ap.add_argument("--repeat", type=int, default=1,
                    help="repetitions, each a plain run then every draft run; cells give the median (min-max)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from llamacli.weights import load_model
    from tests.smollm2 import smollm2_checkpoint

    folder = smollm2_checkpoint()
    # As the CLI loads them: plain decoding one row at a time (unpacked fp32), the model that verifies drafts for
    # (k+1)-row forwards (packed), a draft for one row at a time.
    plain_engine = Engine.load(folder, dtype="float32", device="cpu", decode_rows=1)
    engine = Engine.load(folder, dtype="float32", device="cpu", decode_rows=1 + DEFAULT_DRAFT_TOKENS)
    tmp = Path(tempfile.mkdtemp())
    wanted = set(args.kinds.split(","))
    engines = {}
    if "layers" in wanted:
        engines[f"first {args.layers} layers"] = Engine.load(truncated_checkpoint(folder, tmp, args.layers),
                                                             dtype="float32", device="cpu", decode_rows=1)
    if "int4" in wanted:  # what --draft-quantize int4 loads: the same checkpoint, quantized layer by layer
        engines["int4 self-draft"] = Engine(load_model(folder, dtype="float32", device="cpu", quantize="int4",
                                                       decode_rows=1),
                                            engine.tokenizer)
    ks = [int(k) for k in args.ks.split(",")]
    runs = [(k, False) for k in ks] + [(int(k), True) for k in args.adaptive_ks.split(",")]
    kinds = ([("prompt-lookup 3", lambda: PromptLookup(3))] if "lookup" in wanted else []) + [
        (f"draft {name}", lambda e=e, name=name: DraftModel(e, name=name, share_cache=name == "int4 self-draft"))
        for name, e in engines.items()]
    print(f"SmolLM2-135M fp32, {args.threads} threads, {args.new} new tokens, greedy")
    print("| workload | draft | K | adaptive | tok/s | vs plain | acceptance | mean drafted/round | mean accepted/round "
          "| same tokens |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for wname, text in (("grounded", GROUNDED), ("open-ended", OPEN)):
        ids = engine.chat_ids([{"role": "user", "content": text}])
        run(plain_engine, ids, 8, plain_engine.stream)  # warm-up
        plains, results = [], {(kname, k, adaptive): [] for kname, _ in kinds for k, adaptive in runs}
        for _ in range(args.repeat):  # plain first in every repetition; each ratio is within its repetition
            plain = run(plain_engine, ids, args.new, plain_engine.stream)
            plains.append(plain)
            for kname, make in kinds:
                for k, adaptive in runs:
                    r = run(engine, ids, args.new, Speculator(engine, make(), k, adaptive=adaptive).stream)
                    results[kname, k, adaptive].append(dict(r, ratio=r["tok_s"] / plain["tok_s"],
                                                            same=r["tokens"] == plain["tokens"]))
        tok_s = [p["tok_s"] for p in plains]
        print(f"| {wname} ({len(ids)} prompt tokens) | plain | - | - | {_spread(tok_s, '.1f')} | 1.00 | - | - | - | - |")
        for (kname, k, adaptive), rs in results.items():
            print(f"| {wname} | {kname} | {k} | {'yes' if adaptive else 'no'} | {_spread([r['tok_s'] for r in rs], '.1f')} "
                  f"| {_spread([r['ratio'] for r in rs], '.2f')} | {_spread([r.get('rate', 0) for r in rs], '.0%')} | "
                  f"{statistics.median(r.get('mean_drafted', 0) for r in rs):.2f} | "
                  f"{statistics.median(r.get('mean_accepted', 0) for r in rs):.2f} | {all(r['same'] for r in rs)} |",
                  flush=True)
    costs = forward_costs({"SmolLM2-135M, plain layout": plain_engine, "SmolLM2-135M, verify layout": engine,
                           **engines}, 500)
    for name, by_size in costs.items():
        print(f"{name}: forward ms at position 500: " + ", ".join(f"T={t}: {ms:.1f}" for t, ms in by_size.items()))
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()

"""`llamacli bench`: prefill and decode speed, peak memory and memory-bandwidth use, as a table or JSON."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer

from llamacli.cli.app import (Device, DeviceOpt, Dtype, GroupSizeOpt, ModelOpt, RevisionOpt, TensorParallelOpt, app,
                              errors, note, resolve, start_distributed)
from llamacli.errors import UsageError


@app.command()
def bench(
    model: ModelOpt,
    prompt_tokens: Annotated[str, typer.Option("--prompt-tokens", "-p",
                                               help="Prompt lengths to prefill, comma-separated.")] = "128,512",
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", "-g", min=1,
                                            help="Tokens to decode after each prompt.")] = 128,
    batch_size: Annotated[str, typer.Option("--batch-size", "-b", help="Batch sizes, comma-separated.")] = "1",
    dtype: Annotated[str, typer.Option("--dtype", help="Weight dtypes, comma-separated: auto, float32, "
                                                       "bfloat16, float16.")] = "auto",
    device: DeviceOpt = Device.auto,
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", min=1,
                                             help="Timed runs per configuration, after one warm-up.")] = 5,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", min=1, show_default=False,
                                                   help="CPU threads (default: torch's choice).")] = None,
    quantize: Annotated[str, typer.Option("--quantize", "-q", help="Weight quantizations, comma-separated: none, "
                                                                   "int8, int4 (each is benched).")] = "none",
    group_size: GroupSizeOpt = None,
    revision: RevisionOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout, for scripts.")] = False,
    tensor_parallel: TensorParallelOpt = False,
) -> None:
    """Measure prefill and decode speed, peak memory and decode's share of the memory bandwidth."""
    with errors():
        from llamacli.bench import parse_int_list, run_bench

        prompts = parse_int_list(prompt_tokens, "--prompt-tokens")
        batches = parse_int_list(batch_size, "--batch-size")
        dtypes = parse_dtypes(dtype)
        quants = parse_quantize(quantize, group_size)
        if any(quants):
            from llamacli.gguf import refuse_quantized

            refuse_quantized(model, "bench it with -q none")
        start_distributed(device)
        folder = resolve(model, revision, Dtype(dtypes[0]))
        shard = None
        if tensor_parallel:
            from llamacli import parallel
            from llamacli.config import load_config

            shard = parallel.ShardPlan.for_config(load_config(folder), parallel.rank(), parallel.world_size())
        report = run_bench(folder, prompts, gen_tokens, batches, dtypes, device=device.value,
                           repetitions=repetitions, threads=threads, model_name=model,
                           quantize=quants, group_size=group_size, shard=shard)
    if as_json:
        print(json.dumps(report.as_dict()), flush=True)
        return
    print_report(report)
    note(f"median ± stdev of {repetitions} runs after a warm-up; decode GB/s = weights + KV cache read per step "
         f"x steps/s; bandwidth: {report.bandwidth_method}")


def parse_dtypes(text: str) -> list[str]:
    """The --dtype list: comma-separated `Dtype` values, at least one (UsageError otherwise)."""
    dtypes = [d.strip() for d in text.split(",") if d.strip()]
    allowed = [d.value for d in Dtype]
    bad = [d for d in dtypes if d not in allowed]
    if bad or not dtypes:
        raise UsageError(f"--dtype must be comma-separated values of {', '.join(allowed)}, got '{text}'")
    return dtypes


def parse_quantize(text: str, group_size: int | None) -> list[str | None]:
    """The --quantize list: none, int8, int4 (None for none); UsageError for another value or a stray group size."""
    from llamacli.weights import check_quantize

    items = [q.strip() for q in text.split(",") if q.strip()]
    bad = [q for q in items if q not in ("none", "int8", "int4")]
    if bad or not items:
        raise UsageError(f"--quantize must be comma-separated values of none, int8, int4, got '{text}'")
    if group_size is not None:
        check_quantize("int4" if "int4" in items else None, group_size)
    return [None if q == "none" else q for q in items]


def print_report(report) -> None:
    """A bench report as one table on stdout, one row per (dtype, batch, prompt) configuration."""
    from rich.console import Console
    from rich.table import Table

    devices = sorted({r.device for r in report.rows})
    table = Table(title=f"{report.model} on {', '.join(devices)}, {report.threads} threads; measured memory "
                        f"bandwidth {report.memory_bandwidth_gb_per_s:.1f} GB/s", title_justify="left")
    for name in ("dtype", "batch", "prompt", "prefill tok/s", "gen", "decode tok/s", "GB/s", "% bw", "peak MiB"):
        table.add_column(name, justify="left" if name == "dtype" else "right", no_wrap=True)
    for r in report.rows:
        pre, dec = r.prefill_tokens_per_s, r.decode_tokens_per_s
        table.add_row(r.dtype, str(r.batch_size), str(r.prompt_tokens),
                      f"{pre.median:.1f} ± {pre.stdev:.1f}", str(r.gen_tokens), f"{dec.median:.1f} ± {dec.stdev:.1f}",
                      f"{r.decode_gb_per_s:.1f}", f"{r.bandwidth_pct:.0f}%", f"{r.peak_memory_mb:.0f}")
    console = Console(highlight=False)
    if not console.is_terminal:
        console.width = max(console.width, 120)  # piped into a file: keep the table whole
    console.print(table)

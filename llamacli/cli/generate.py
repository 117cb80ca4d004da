"""`llamacli generate`: one prompt streamed to stdout, or batch mode (`--prompts-file`) writing JSONL rows."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Annotated, Optional

import typer

from llamacli.cli.app import (DeviceOpt, Device, Dtype, DtypeOpt, GroupSizeOpt, IgnoreEosOpt, MaxNewOpt, MinPOpt,
                              ModelOpt, QuantizeOpt, RepPenaltyOpt, RevisionOpt, SeedOpt, StatsOpt, StopOpt,
                              SystemOpt, TemperatureOpt, TemplateOpt, TensorParallelOpt, TokenizerOpt, TopKOpt,
                              TopPOpt, app, check_sampling, errors, load_engine, note, read_text_arg, shared_seed,
                              start_distributed, stats_line, stderr, stop_on_interrupt, write)
from llamacli.cli.speculative import (DraftGroupSizeOpt, DraftModelOpt, DraftOptions, DraftQuantizeOpt, DraftTokensOpt,
                                      PromptLookupOpt)
from llamacli.errors import TokenizerError, UsageError
from llamacli.prompts import default_max_new_tokens, encode_prompt, sampling_params
from llamacli.request import Finished, Request, TokenEvent

_BATCH = "Batch"


@app.command()
def generate(
    model: ModelOpt,
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "-p", help="The prompt; '-' reads standard input.", show_default=False)] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(
        "--prompt-file", "-f", help="Read the prompt from a file.", show_default=False)] = None,
    system: SystemOpt = None,
    raw: Annotated[bool, typer.Option(
        "--raw", help="Send the prompt as it is, without the chat template (BOS added as the tokenizer does).")] = False,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repetition_penalty: RepPenaltyOpt = None,
    seed: SeedOpt = None,
    max_new_tokens: MaxNewOpt = None,
    stop: StopOpt = None,
    ignore_eos: IgnoreEosOpt = False,
    dtype: DtypeOpt = Dtype.auto,
    device: DeviceOpt = Device.auto,
    quantize: QuantizeOpt = None,
    group_size: GroupSizeOpt = None,
    revision: RevisionOpt = None,
    tokenizer: TokenizerOpt = None,
    chat_template: TemplateOpt = None,
    draft_model: DraftModelOpt = None,
    draft_quantize: DraftQuantizeOpt = None,
    draft_group_size: DraftGroupSizeOpt = None,
    prompt_lookup: PromptLookupOpt = None,
    draft_tokens: DraftTokensOpt = None,
    stats: StatsOpt = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help='Print one JSON object {"text", "token_ids", "prompt_token_ids", "finish_reason", '
                       '"stats"} instead of streaming.')] = False,
    logprobs: Annotated[bool, typer.Option(
        "--logprobs", help='With --json: add "logprobs", one per generated token.')] = False,
    prompts_file: Annotated[Optional[Path], typer.Option(
        "--prompts-file", help="Batch mode: a JSONL file of prompts (or text, one prompt per line); '-' = stdin.",
        show_default=False, rich_help_panel=_BATCH)] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Batch mode: the JSONL file to write (default: stdout); never the prompts file. "
                               "An existing non-empty file needs --resume or --overwrite.", show_default=False,
        rich_help_panel=_BATCH)] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, help="Batch mode: prompts generated together.", rich_help_panel=_BATCH)] = 8,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Batch mode: continue --output. A row is done when the output has a result for its id "
                         "(its line number if it has none) and the same prompt_hash (prompt or messages + "
                         "overrides); an id whose result came from another prompt (the input was edited) is "
                         "refused, never skipped. Error rows are retried and replaced.",
        rich_help_panel=_BATCH)] = False,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Batch mode: replace an existing --output. The old file stays until this run has "
                            "written a row: it is replaced at the end, or when the run stops early with rows "
                            "written (then --resume continues them).", rich_help_panel=_BATCH)] = False,
    tensor_parallel: TensorParallelOpt = False,
) -> None:
    """Generate text after a prompt, streamed to stdout (status and stats go to stderr)."""
    with errors(), stop_on_interrupt():  # a second Ctrl-C while stopping is ignored, not a traceback
        check_sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed=seed, system=system, stop=stop)
        start_distributed(device)
        if raw and system:
            raise UsageError("--system needs the chat template; it cannot be used with --raw")
        if logprobs and not as_json and prompts_file is None:
            raise UsageError("--logprobs needs --json (log-probabilities are part of the JSON output)")
        spec = DraftOptions(draft_model, prompt_lookup, draft_tokens, draft_quantize, draft_group_size)
        spec.check()
        if prompts_file is not None and spec.drafts:
            raise UsageError(f"batch mode (--prompts-file) decodes its batches normally; {spec.drafts[0]} applies "
                             "to a single prompt")
        if prompts_file is None:
            if output is not None or resume or overwrite:
                raise UsageError("--output, --resume and --overwrite belong to batch mode: pass --prompts-file")
            text = read_text_arg(prompt, prompt_file, "--prompt", "--prompt-file")
        elif prompt is not None or prompt_file is not None:
            raise UsageError("pass either --prompts-file (batch) or --prompt / --prompt-file, not both")

        sharded = check_launch(prompts_file, output, tensor_parallel)
        seed = shared_seed(seed) if tensor_parallel else seed
        # Batch mode reads its input and checks its output before the (slow) model load.
        if sharded:
            prepared = prepare_sharded_batch(prompts_file, output, resume, overwrite)
        else:
            prepared = prepare_batch(prompts_file, output, resume, overwrite) if prompts_file is not None else None
        engine, folder, load_s = load_engine(model, revision, dtype, device, tokenizer, chat_template, quantize,
                                             group_size, tensor_parallel,
                                             decode_rows=spec.decode_rows if prepared is None else batch_size)
        gen = engine.config.generation
        sampling = sampling_params(gen, temperature, top_k, top_p, min_p, repetition_penalty)
        request = Request(max_new_tokens=max_new_tokens or default_max_new_tokens(gen), sampling=sampling,
                          seed=seed, stop=tuple(stop or ()), ignore_eos=ignore_eos, logprobs=logprobs)
        if prepared is not None:
            # `--system ""` is no system message, as in llamacli.prompts (batch reads None as "none").
            run = run_sharded_batch if sharded else run_batch_mode
            run(engine, prepared, request, output=output, batch_size=batch_size, raw=raw, system=system or None,
                cap_to_context=max_new_tokens is None)
            return
        if not raw and engine.chat_template is None:
            raise TokenizerError("this model has no chat template: pass --raw to send the prompt as it is, "
                                 "or --chat-template FILE")
        ids = encode_prompt(engine.tokenizer, engine.chat_template, prompt=text, system=system, raw=raw,
                            config=engine.config)
        if max_new_tokens is None:  # the default is capped to what the context has left after this prompt
            room = engine.config.context_length - len(ids)
            request = replace(request, max_new_tokens=default_max_new_tokens(gen, room))
        stream = spec.stream(engine, folder, revision, dtype, device, tensor_parallel)
        stream_generation(engine, ids, request, as_json, stats, load_s, stream)


def stream_generation(engine, ids: list[int], request: Request, as_json: bool, show_stats: bool,
                      load_s: float, stream=None) -> None:
    """Generate after ids (with `stream`, `engine.stream` by default): stream the text to stdout (or print one
    JSON object); Ctrl-C exits 130."""
    finished = None
    pieces: list[str] = []
    tokens: list[int] = []
    token_logprobs: list[float] = []
    try:
        for event in (stream or engine.stream)(ids, request):
            if isinstance(event, Finished):
                finished = event
                continue
            if isinstance(event, TokenEvent):
                tokens.append(event.token_id)
                if event.logprob is not None:
                    token_logprobs.append(event.logprob)
            pieces.append(event.text)
            if not as_json and event.text:
                write(event.text)
    except KeyboardInterrupt:
        # Ctrl-C: keep what was produced (stdout), say so (stderr), exit 130 as shells expect.
        if as_json:
            obj = {"text": "".join(pieces), "token_ids": tokens, "prompt_token_ids": ids,
                   "finish_reason": "interrupted"}
            if request.logprobs:
                obj["logprobs"] = token_logprobs
            print(json.dumps(obj, ensure_ascii=False), flush=True)
        else:
            write("\n")
        note(f"interrupted after {len(tokens)} tokens")
        raise typer.Exit(130) from None
    stats = finished.stats
    if as_json:
        obj = {"text": finished.text, "token_ids": finished.token_ids, "prompt_token_ids": ids,
               "finish_reason": finished.reason, "stats": {**stats.as_dict(), "load_s": round(load_s, 6)}}
        if request.logprobs:
            obj["logprobs"] = finished.logprobs
        print(json.dumps(obj, ensure_ascii=False), flush=True)
    else:
        write("\n")
    if show_stats:
        note(stats_line(stats, load_s) + f", finish {finished.reason}")


# -- batch mode --------------------------------------------------------------------------------------------------


def prepare_batch(prompts_file: Path, output: Optional[Path], resume: bool, overwrite: bool = False):
    """Batch mode, before any model is loaded: read every input row and check the output can be written.

    Returns (rows, done_ids, opener); an unreadable input or an output that may not be written raises here.
    """
    from llamacli.batch import prepare_output, read_rows
    from llamacli.batch_output import check_not_input

    from llamacli import parallel

    target = "-" if output is None else output
    check_not_input(target, prompts_file)  # before reading: stdin redirected from the output is read only once
    rows = read_rows(prompts_file)
    done_ids, opener = prepare_output(target, resume, rows=rows, overwrite=overwrite, source=prompts_file)
    if parallel.rank() != 0:  # tensor-parallel ranks run every row with rank 0; rank 0 alone writes
        opener = _discard
    return rows, done_ids, opener


def _discard():
    import contextlib
    import os

    return contextlib.closing(open(os.devnull, "w", encoding="utf-8"))


def check_launch(prompts_file: Optional[Path], output: Optional[Path], tensor_parallel: bool) -> bool:
    """Under torchrun: what the ranks share (UsageError for what they cannot). True for a data-parallel batch."""
    from llamacli import parallel

    if parallel.world_size() == 1:
        return False
    if prompts_file is not None and str(prompts_file) == "-":
        raise UsageError("under torchrun every rank reads --prompts-file: pass a file, not '-' (standard input)")
    if tensor_parallel:
        return False
    if prompts_file is None:
        raise UsageError(f"under torchrun ({parallel.world_size()} ranks) one prompt needs --tensor-parallel; "
                         "a --prompts-file batch without it is split across the ranks")
    if output is None or str(output) == "-":
        raise UsageError("a batch split across torchrun ranks needs --output FILE (each rank writes a part of it)")
    return True


def prepare_sharded_batch(prompts_file: Path, output: Path, resume: bool, overwrite: bool):
    """A data-parallel batch, before the model load: rank 0 folds the parts an unfinished run left into the output
    (with --resume) or drops them (--overwrite); then every rank reads the rows and what is done.

    Returns (rows, done_ids, keep): `keep` says whether the output's rows stay in the merged file."""
    from llamacli import batch_shards, parallel

    leftover = batch_shards.check_parts(output, resume, overwrite)  # every rank: the same answer
    if parallel.rank() == 0 and leftover:
        if resume:
            from llamacli.batch import read_rows

            batch_shards.merge(output, read_rows(prompts_file), leftover)
        else:
            for part in leftover:
                part.unlink(missing_ok=True)
    parallel.barrier()
    rows, done_ids, _ = prepare_batch(prompts_file, output, resume, overwrite)
    return rows, done_ids, not overwrite


def run_sharded_batch(engine, prepared, request: Request, *, output: Path, batch_size: int, raw: bool,
                      system: Optional[str], cap_to_context: bool) -> None:
    """This rank's share of the rows to do into its part file; rank 0 then merges every part into --output.

    A rank that fails leaves its finished rows in its part (merged by rank 0 now, or by the next --resume).
    """
    from llamacli import batch_shards, parallel
    from llamacli.batch import rows_to_run

    rows, done_ids, keep = prepared
    rank, world = parallel.rank(), parallel.world_size()
    mine = batch_shards.share(rows_to_run(rows, done_ids), rank, world)
    part = batch_shards.part_path(output, rank, world)
    finished = False
    try:
        run_batch_mode(engine, (mine, {}, lambda: open(part, "w", encoding="utf-8")), request, output=part,
                       batch_size=batch_size, raw=raw, system=system, cap_to_context=cap_to_context,
                       final_note=False)
        parallel.wait_all()  # ranks finish their shares at different times: no collective timeout here
        finished = True
    finally:
        if rank == 0:
            parts = [batch_shards.part_path(output, r, world) for r in range(world)]
            merged = batch_shards.merge(output, rows, parts, keep_output=keep, remove=finished)
            note(f"batch: {merged.ok + merged.failed} rows from {world} ranks merged into {output} "
                 f"({merged.ok} ok, {merged.failed} failed, {merged.generated_tokens} tokens)"
                 + ("" if finished else "; a rank did not finish: run again with --resume for the rest"))
    if rank == 0 and merged.failed:
        raise typer.Exit(1)


def run_batch_mode(engine, prepared, request: Request, *, output: Optional[Path], batch_size: int, raw: bool,
                   system: Optional[str], cap_to_context: bool, final_note: bool = True) -> None:
    """One JSONL result per input row to --output (stdout by default), progress on stderr.

    `request` carries the defaults (sampling, seed, stop strings, max_new_tokens, logprobs); with
    `cap_to_context` (max_new_tokens not asked for) each row is capped to its context, as single generate does.
    Exit code 1 when a row failed, 130 when interrupted (finished rows are kept: rerun with --resume).
    """
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from llamacli.batch import BatchDefaults, run_batch

    rows, done_ids, opener = prepared
    defaults = BatchDefaults(request, raw=raw, system=system, cap_to_context=cap_to_context)
    where = "stdout" if output is None or str(output) == "-" else str(output)
    summary = None
    with Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[tps]}"),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=stderr(),
                  transient=True) as bar:
        task = bar.add_task("", total=None, tps="")

        def progress(s, result: dict) -> None:
            if "error" in result:
                bar.console.print(f"error: {result['error']} (id {result['id']!r})", markup=False,
                                  highlight=False)
            bar.update(task, completed=s.done, total=s.total, tps=f"{s.tokens_per_s:.1f} tok/s")
            nonlocal summary
            summary = s

        try:
            with opener() as out:
                summary = run_batch(engine, rows, defaults, out, batch_size, done_ids, on_progress=progress)
        except KeyboardInterrupt:
            done = summary.done if summary is not None else 0
            bar.stop()
            if done:
                note(f"interrupted: {done} rows written to {where}; run again with --resume to finish the rest")
            else:
                note(f"interrupted before any row was written to {where}")
            raise typer.Exit(130) from None
    if not final_note:
        return
    skipped = f", {summary.skipped} skipped (already in the output)" if summary.skipped else ""
    note(f"batch: {summary.done} rows written to {where} ({summary.ok} ok, {summary.failed} failed){skipped}; "
         f"{summary.generated_tokens} tokens in {summary.elapsed_s:.1f} s ({summary.tokens_per_s:.1f} tok/s)")
    if summary.failed:
        raise typer.Exit(1)

"""The command-line interface: the only module that imports typer or rich.

Torch-heavy modules are imported inside commands so that `--help` starts fast.
"""

from __future__ import annotations

import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Optional

import typer

from llamacli.errors import LlamaCliError

app = typer.Typer(
    name="llamacli",
    help="Run, chat with, inspect and batch-generate from Hugging Face Llama checkpoints.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
)

_state = {"debug": False}


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show tracebacks for errors.")] = False,
) -> None:
    _state["debug"] = debug


class _ConvertDtype(str, Enum):
    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="The llama GGUF file to convert.", metavar="SRC.gguf",
                                         show_default=False)],
    out_dir: Annotated[Path, typer.Argument(help="Folder to write the Hugging Face checkpoint into.",
                                            metavar="OUT_DIR", show_default=False)],
    dtype: Annotated[_ConvertDtype, typer.Option("--dtype", help="Dtype of the written weights.")] = (
        _ConvertDtype.bfloat16
    ),
) -> None:
    """Convert a GGUF file (llama architecture) into a Hugging Face checkpoint folder."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    from llamacli.gguf import convert_gguf

    err = Console(stderr=True)
    with _errors(), Progress(TextColumn("converting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                             TextColumn("{task.description}"), console=err, transient=True) as bar:
        task = bar.add_task("", total=None)

        def progress(done: int, total: int, name: str) -> None:
            bar.update(task, completed=done, total=total, description=name)

        out = convert_gguf(src, out_dir, dtype=dtype.value, progress=progress)
    err.print(f"wrote {out} ({dtype.value})", markup=False, highlight=False)


def _tokenizer_source(model: Optional[str], tokenizer: Optional[Path]) -> Path:
    """The file or folder to load a tokenizer from: --tokenizer wins, else the resolved --model."""
    from llamacli.errors import UsageError
    from llamacli.sources import resolve_model

    if tokenizer is not None:
        return tokenizer
    if model is None:
        raise UsageError("pass --model (a checkpoint) or --tokenizer (a tokenizer file or folder)")
    return resolve_model(model)


@app.command()
def tokenize(
    text: Annotated[str, typer.Option("--text", help="Text to tokenize; '-' reads standard input.",
                                      show_default=False)],
    model: Annotated[Optional[str], typer.Option("--model", "-m", help="Checkpoint folder (or model spec).",
                                                 show_default=False)] = None,
    tokenizer: Annotated[Optional[Path], typer.Option(
        "--tokenizer", help="tokenizer.json / tokenizer.model file or folder; overrides the model's.",
        show_default=False)] = None,
    as_json: Annotated[bool, typer.Option("--json", help='Print {"token_ids": [...], "tokens": [...]}.')] = False,
    no_special: Annotated[bool, typer.Option("--no-special", help="Do not add BOS/EOS around the text.")] = False,
) -> None:
    """Show the token ids and pieces of a text, as the model's tokenizer splits it."""
    import json

    from llamacli.tokenizer import load_tokenizer

    with _errors():
        if text == "-":
            text = sys.stdin.read()
        tok = load_tokenizer(_tokenizer_source(model, tokenizer))
        ids = tok.encode(text, add_special_tokens=not no_special)
        pieces = [tok.id_to_piece(i) for i in ids]
    if as_json:
        print(json.dumps({"token_ids": ids, "tokens": pieces}, ensure_ascii=False))
        return
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    # Cells are Text, not str: pieces like "[INST]" must not be read as rich markup.
    table = Table(title=f"{len(ids)} tokens ({tok.kind})", title_justify="left")
    table.add_column("#", justify="right", style="dim")
    table.add_column("id", justify="right")
    table.add_column("piece")
    for n, (i, piece) in enumerate(zip(ids, pieces)):
        shown = repr(piece)[1:-1]  # make spaces, newlines and tabs visible
        table.add_row(str(n), str(i), Text(shown + ("  (special)" if tok.is_special(i) else "")))
    Console(highlight=False).print(table)


# =============================================================================================================
# generate, chat, inspect, perplexity (issue 4)
# =============================================================================================================


class _Dtype(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class _Device(str, Enum):
    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


_MODEL_HELP = "Checkpoint folder, a llama .gguf file, or a hub repo id org/name."
_ModelOpt = Annotated[str, typer.Option("--model", "-m", help=_MODEL_HELP, show_default=False)]
_RevisionOpt = Annotated[Optional[str], typer.Option(
    "--revision", help="Hub branch, tag or commit (hub repo ids only).", show_default=False)]
_DtypeOpt = Annotated[_Dtype, typer.Option(
    "--dtype", help="Compute dtype; auto = float32 on CPU, the checkpoint's dtype on a GPU.")]
_DeviceOpt = Annotated[_Device, typer.Option("--device", help="Where to run; auto = cuda, then mps, then cpu.")]
_TokenizerOpt = Annotated[Optional[Path], typer.Option(
    "--tokenizer", help="tokenizer.json / tokenizer.model file or folder; overrides the model's.",
    show_default=False)]
_TemplateOpt = Annotated[Optional[Path], typer.Option(
    "--chat-template", help="A Jinja chat template file; overrides the model's.", show_default=False)]
_SAMPLING = "Sampling"
_TemperatureOpt = Annotated[Optional[float], typer.Option(
    "--temperature", "-t", help="0 = greedy. Default: the model's generation_config.json if it samples, else 0.",
    show_default=False, rich_help_panel=_SAMPLING)]
_TopKOpt = Annotated[Optional[int], typer.Option(
    "--top-k", help="Keep the k most likely tokens (0 = off).", show_default=False, rich_help_panel=_SAMPLING)]
_TopPOpt = Annotated[Optional[float], typer.Option(
    "--top-p", help="Nucleus sampling mass in (0, 1] (1 = off).", show_default=False, rich_help_panel=_SAMPLING)]
_MinPOpt = Annotated[Optional[float], typer.Option(
    "--min-p", help="Drop tokens below min-p x the top probability (0 = off).", show_default=False,
    rich_help_panel=_SAMPLING)]
_RepPenaltyOpt = Annotated[Optional[float], typer.Option(
    "--repetition-penalty", help="> 1 discourages repeating prompt and generated tokens (1 = off).",
    show_default=False, rich_help_panel=_SAMPLING)]
_SeedOpt = Annotated[Optional[int], typer.Option(
    "--seed", help="Random seed: the same seed gives the same output.", show_default=False,
    rich_help_panel=_SAMPLING)]
_MaxNewOpt = Annotated[Optional[int], typer.Option(
    "--max-new-tokens", "-n", min=1, show_default=False, rich_help_panel=_SAMPLING,
    help="Most tokens to generate. Default: 256 (or the model's generation config), capped to the context left; "
         "an explicit value beyond the context is an error.")]
_StopOpt = Annotated[Optional[list[str]], typer.Option(
    "--stop", help="Stop when this text appears (repeatable; not printed).", show_default=False,
    rich_help_panel=_SAMPLING)]
_IgnoreEosOpt = Annotated[bool, typer.Option(
    "--ignore-eos", help="Do not stop on end-of-sequence tokens (for benchmarks).", rich_help_panel=_SAMPLING)]
_SystemOpt = Annotated[Optional[str], typer.Option("--system", "-s", help="A system message.", show_default=False)]
_StatsOpt = Annotated[bool, typer.Option("--stats", help="Print token counts and speeds to stderr.")]


def _stderr():
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def _note(message: str) -> None:
    """One line for a person, on stderr, printed as it is (no markup: it may quote model text or paths)."""
    _stderr().print(message, markup=False, highlight=False)


def _fail(exc: BaseException) -> typer.Exit:
    """Report an error as one line on stderr; return the Exit to raise (exit code 2 usage, 1 runtime)."""
    if isinstance(exc, LlamaCliError):
        message, code = str(exc), exc.exit_code
    else:
        message, code = f"{type(exc).__name__}: {exc}", 1
    print("error: " + " ".join(message.split("\n")), file=sys.stderr, flush=True)
    return typer.Exit(code)


class _errors:
    """`with _errors():` turns domain and unexpected errors into one line and an exit code (unless --debug)."""

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        from typer.exceptions import TyperException

        if exc is None or isinstance(exc, (typer.Exit, typer.Abort, TyperException)):
            return False
        if isinstance(exc, BrokenPipeError):  # the reader went away (`| head`): stop quietly, as Python's docs say
            import os

            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            raise typer.Exit(1) from None
        if not isinstance(exc, Exception) or _state["debug"]:
            return False
        raise _fail(exc) from None


def _check_sampling(temperature, top_k, top_p, min_p, repetition_penalty) -> None:
    """Validate the sampling options the user gave, before any model is loaded (UsageError, exit 2)."""
    from llamacli.sampling import SamplingParams

    SamplingParams(temperature=0.0 if temperature is None else temperature, top_k=top_k or 0,
                   top_p=1.0 if top_p is None else top_p, min_p=0.0 if min_p is None else min_p,
                   repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty)


def _sampling_params(generation: dict, temperature, top_k, top_p, min_p, repetition_penalty):
    """Options win; unset ones come from generation_config.json when it asks to sample (as transformers), else off."""
    from llamacli.sampling import SamplingParams

    samples = generation.get("do_sample") is True

    def pick(value, key, off):
        if value is not None:
            return value
        if samples and generation.get(key) is not None:
            return generation[key]
        return off

    temperature = pick(temperature, "temperature", 1.0 if samples else 0.0)
    return SamplingParams(temperature=float(temperature), top_k=int(pick(top_k, "top_k", 0)),
                          top_p=float(pick(top_p, "top_p", 1.0)), min_p=float(pick(min_p, "min_p", 0.0)),
                          repetition_penalty=float(repetition_penalty if repetition_penalty is not None
                                                   else generation.get("repetition_penalty") or 1.0))


def _default_max_new_tokens(generation: dict, room: int) -> int:
    """256 (or generation_config's max_new_tokens), capped to the positions left in the context (at least 1)."""
    wanted = generation.get("max_new_tokens") or 256
    return max(1, min(int(wanted), room))


def _resolve(model: str, revision, dtype: _Dtype) -> Path:
    """resolve_model, with a progress bar on stderr when a GGUF file is converted (once; cached after)."""
    from llamacli.sources import resolve_model

    if not model.lower().endswith(".gguf"):
        return resolve_model(model, revision, dtype=dtype.value)  # hub downloads show huggingface_hub's bar
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with Progress(TextColumn("converting GGUF (once)"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                  console=_stderr(), transient=True) as bar:
        task = bar.add_task("", total=None)
        return resolve_model(model, revision, dtype=dtype.value,
                             progress=lambda done, total, name: bar.update(task, completed=done, total=total))


def _load_engine(model: str, revision, dtype: _Dtype, device: _Device, tokenizer=None, chat_template=None):
    """Resolve --model and load the engine; returns (engine, folder, seconds spent loading)."""
    import time

    from llamacli.generation import Engine

    t0 = time.perf_counter()
    folder = _resolve(model, revision, dtype)
    engine = Engine.load(folder, dtype=dtype.value, device=device.value, tokenizer=tokenizer,
                         chat_template=chat_template)
    return engine, folder, time.perf_counter() - t0


def _read_text_arg(text: Optional[str], file: Optional[Path], text_flag: str, file_flag: str) -> str:
    """The text of exactly one of TEXT / FILE; '-' as TEXT reads stdin. One trailing newline is dropped."""
    from llamacli.errors import InputError, UsageError

    if text is not None and file is not None:
        raise UsageError(f"pass either {text_flag} or {file_flag}, not both")
    if text is None and file is None:
        raise UsageError(f"pass {text_flag} TEXT, {file_flag} FILE, or {text_flag} - to read standard input")
    if file is not None:
        try:
            value = file.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise InputError(f"{file}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{file}: cannot read ({exc})") from None
    elif text == "-":
        value = sys.stdin.read()
    else:
        return text
    return value[:-1] if value.endswith("\n") else value


def _stats_line(stats, load_s: float | None = None) -> str:
    parts = [f"prompt {stats.prompt_tokens} tokens", f"prefilled {stats.prefill_tokens}",
             f"generated {stats.generated_tokens}"]
    if load_s is not None:
        parts.append(f"load {load_s:.2f} s")
    parts += [f"first token {stats.ttft_s * 1000:.0f} ms", f"prefill {stats.prefill_tps:.1f} tok/s",
              f"decode {stats.decode_tps:.1f} tok/s"]
    return "stats: " + ", ".join(parts)


def _write(text: str) -> None:
    """Model text to stdout as it is (no rich: no markup, highlighting or wrapping), flushed at once."""
    sys.stdout.write(text)
    sys.stdout.flush()


def _prepare_batch(prompts_file: Path, output: Optional[Path], resume: bool):
    """Batch mode, before any model is loaded: read every input row and check the output can be written.

    Returns (rows, done_ids, opener); an unreadable input or unwritable output raises InputError here.
    """
    from llamacli.batch import prepare_output, read_rows

    rows = read_rows(prompts_file)
    done_ids, opener = prepare_output("-" if output is None else output, resume)
    return rows, done_ids, opener


def _generate_batch(engine, *, prompts_file: Path, output: Optional[Path], batch_size: int, resume: bool,
                    request, raw: bool, system: Optional[str], as_json: bool, stats: bool,
                    prepared=None, max_new_tokens_set: bool = True) -> None:
    """Batch mode: one JSONL result per input row to --output (stdout by default), progress on stderr.

    `request` carries the defaults (sampling, seed, stop strings, max_new_tokens, logprobs); when the user did
    not set max_new_tokens, each row is capped to its context, as single generate does. Exit code 1 when a row
    failed, 130 when interrupted (finished rows are kept: rerun with --resume).
    """
    from rich.progress import (BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from llamacli.batch import BatchDefaults, run_batch

    rows, done_ids, opener = prepared or _prepare_batch(prompts_file, output, resume)
    defaults = BatchDefaults(request, raw=raw, system=system, cap_to_context=not max_new_tokens_set)
    err = _stderr()
    where = "stdout" if output is None or str(output) == "-" else str(output)
    summary = None
    with Progress(TextColumn("generating"), BarColumn(), MofNCompleteColumn(), TextColumn("{task.fields[tps]}"),
                  TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(), console=err,
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
            _note(f"interrupted: {done} rows written to {where}; run again with --resume to finish the rest")
            raise typer.Exit(130) from None
    skipped = f", {summary.skipped} skipped (already in the output)" if summary.skipped else ""
    _note(f"batch: {summary.done} rows written to {where} ({summary.ok} ok, {summary.failed} failed){skipped}; "
          f"{summary.generated_tokens} tokens in {summary.elapsed_s:.1f} s ({summary.tokens_per_s:.1f} tok/s)")
    if summary.failed:
        raise typer.Exit(1)


@app.command()
def generate(
    model: _ModelOpt,
    prompt: Annotated[Optional[str], typer.Option(
        "--prompt", "-p", help="The prompt; '-' reads standard input.", show_default=False)] = None,
    prompt_file: Annotated[Optional[Path], typer.Option(
        "--prompt-file", "-f", help="Read the prompt from a file.", show_default=False)] = None,
    system: _SystemOpt = None,
    raw: Annotated[bool, typer.Option(
        "--raw", help="Send the prompt as it is, without the chat template (BOS added as the tokenizer does).")] = False,
    temperature: _TemperatureOpt = None,
    top_k: _TopKOpt = None,
    top_p: _TopPOpt = None,
    min_p: _MinPOpt = None,
    repetition_penalty: _RepPenaltyOpt = None,
    seed: _SeedOpt = None,
    max_new_tokens: _MaxNewOpt = None,
    stop: _StopOpt = None,
    ignore_eos: _IgnoreEosOpt = False,
    dtype: _DtypeOpt = _Dtype.auto,
    device: _DeviceOpt = _Device.auto,
    revision: _RevisionOpt = None,
    tokenizer: _TokenizerOpt = None,
    chat_template: _TemplateOpt = None,
    stats: _StatsOpt = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help='Print one JSON object {"text", "token_ids", "prompt_token_ids", "finish_reason", '
                       '"stats"} instead of streaming.')] = False,
    logprobs: Annotated[bool, typer.Option(
        "--logprobs", help='With --json: add "logprobs", one per generated token.')] = False,
    prompts_file: Annotated[Optional[Path], typer.Option(
        "--prompts-file", help="Batch mode: a JSONL file of prompts (or text, one prompt per line); '-' = stdin.", show_default=False,
        rich_help_panel="Batch")] = None,
    output: Annotated[Optional[Path], typer.Option(
        "--output", "-o", help="Batch mode: the JSONL file to write (default: stdout).", show_default=False,
        rich_help_panel="Batch")] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, help="Batch mode: prompts generated together.", rich_help_panel="Batch")] = 8,
    resume: Annotated[bool, typer.Option(
        "--resume", help="Batch mode: skip prompts already in --output.", rich_help_panel="Batch")] = False,
) -> None:
    """Generate text after a prompt, streamed to stdout (status and stats go to stderr)."""
    with _errors():
        from llamacli.errors import UsageError

        _check_sampling(temperature, top_k, top_p, min_p, repetition_penalty)
        if raw and system:
            raise UsageError("--system needs the chat template; it cannot be used with --raw")
        if logprobs and not as_json and prompts_file is None:
            raise UsageError("--logprobs needs --json (log-probabilities are part of the JSON output)")
        if prompts_file is None:
            if output is not None or resume:
                raise UsageError("--output and --resume belong to batch mode: pass --prompts-file")
            text = _read_text_arg(prompt, prompt_file, "--prompt", "--prompt-file")
        elif prompt is not None or prompt_file is not None:
            raise UsageError("pass either --prompts-file (batch) or --prompt / --prompt-file, not both")

        from llamacli.generation import Request

        # Batch mode reads its input and checks its output before the (slow) model load.
        prepared = _prepare_batch(prompts_file, output, resume) if prompts_file is not None else None
        engine, _, load_s = _load_engine(model, revision, dtype, device, tokenizer, chat_template)
        gen = engine.config.generation
        sampling = _sampling_params(gen, temperature, top_k, top_p, min_p, repetition_penalty)
        if prompts_file is not None:
            request = Request(max_new_tokens=max_new_tokens or _default_max_new_tokens(gen, 1 << 30),
                              sampling=sampling, seed=seed, stop=tuple(stop or ()), ignore_eos=ignore_eos,
                              logprobs=logprobs)
            _generate_batch(engine, prompts_file=prompts_file, output=output, batch_size=batch_size,
                            resume=resume, request=request, raw=raw, system=system, as_json=as_json, stats=stats,
                            prepared=prepared, max_new_tokens_set=max_new_tokens is not None)
            return
        if raw:
            if system is not None:
                raise UsageError("--system needs the chat template; it cannot be used with --raw")
            ids = engine.raw_ids(text)
        else:
            messages = ([{"role": "system", "content": system}] if system is not None else [])
            ids = engine.chat_ids(messages + [{"role": "user", "content": text}])
        if max_new_tokens is None:
            max_new_tokens = _default_max_new_tokens(gen, engine.config.context_length - len(ids))
        request = Request(max_new_tokens=max_new_tokens, sampling=sampling, seed=seed, stop=tuple(stop or ()),
                          ignore_eos=ignore_eos, logprobs=logprobs)
        _run_generation(engine, ids, request, as_json, stats, load_s)


def _run_generation(engine, ids: list[int], request, as_json: bool, show_stats: bool, load_s: float) -> None:
    import json

    from llamacli.generation import Finished, TokenEvent

    finished = None
    pieces: list[str] = []
    tokens: list[int] = []
    token_logprobs: list[float] = []
    try:
        for event in engine.stream(ids, request):
            if isinstance(event, Finished):
                finished = event
                continue
            if isinstance(event, TokenEvent):
                tokens.append(event.token_id)
                if event.logprob is not None:
                    token_logprobs.append(event.logprob)
            pieces.append(event.text)
            if not as_json and event.text:
                _write(event.text)
    except KeyboardInterrupt:
        # Ctrl-C: keep what was produced (stdout), say so (stderr), exit 130 as shells expect.
        if as_json:
            obj = {"text": "".join(pieces), "token_ids": tokens, "prompt_token_ids": ids,
                   "finish_reason": "interrupted"}
            if request.logprobs:
                obj["logprobs"] = token_logprobs
            print(json.dumps(obj, ensure_ascii=False), flush=True)
        else:
            _write("\n")
        _note(f"interrupted after {len(tokens)} tokens")
        raise typer.Exit(130) from None
    stats = finished.stats
    if as_json:
        obj = {"text": finished.text, "token_ids": finished.token_ids, "prompt_token_ids": ids,
               "finish_reason": finished.reason, "stats": {**stats.as_dict(), "load_s": round(load_s, 6)}}
        if request.logprobs:
            obj["logprobs"] = finished.logprobs
        print(json.dumps(obj, ensure_ascii=False), flush=True)
    else:
        _write("\n")
    if show_stats:
        _note(_stats_line(stats, load_s) + f", finish {finished.reason}")


_CHAT_HELP = """commands:
  /help          this help
  /reset         forget the conversation (and its cached keys/values)
  /system TEXT   set the system message (/system alone removes it)
  /stats         counts and speeds of the last reply
  /exit          quit (Ctrl-D too); Ctrl-C stops a reply and keeps the session"""


@app.command()
def chat(
    model: _ModelOpt,
    system: _SystemOpt = None,
    temperature: _TemperatureOpt = None,
    top_k: _TopKOpt = None,
    top_p: _TopPOpt = None,
    min_p: _MinPOpt = None,
    repetition_penalty: _RepPenaltyOpt = None,
    seed: _SeedOpt = None,
    max_new_tokens: _MaxNewOpt = None,
    stop: _StopOpt = None,
    dtype: _DtypeOpt = _Dtype.auto,
    device: _DeviceOpt = _Device.auto,
    revision: _RevisionOpt = None,
    tokenizer: _TokenizerOpt = None,
    chat_template: _TemplateOpt = None,
    max_context: Annotated[Optional[int], typer.Option(
        "--max-context", min=2, help="Positions kept for the conversation (default: the model's context).",
        show_default=False)] = None,
    stats: _StatsOpt = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help='One JSON object per turn: {"role", "content", "token_ids", "prompt_token_ids", '
                       '"prefill_tokens", "finish_reason"}.')] = False,
) -> None:
    """Chat with the model; the KV cache is kept across turns.

    With stdin not a terminal, each input line is one user turn and stdout carries only the replies, one per line.
    """
    with _errors():
        _check_sampling(temperature, top_k, top_p, min_p, repetition_penalty)
        from llamacli.generation import ChatSession

        engine, folder, load_s = _load_engine(model, revision, dtype, device, tokenizer, chat_template)
        if engine.chat_template is None:
            from llamacli.errors import TokenizerError

            raise TokenizerError(f"{folder}: this model has no chat template; chat needs one "
                                 "(pass --chat-template FILE, or use generate --raw)")
        sampling = _sampling_params(engine.config.generation, temperature, top_k, top_p, min_p,
                                    repetition_penalty)
        session = ChatSession(engine, system=system, max_context=max_context)
        loop = _ChatLoop(engine, session, sampling, seed, max_new_tokens, tuple(stop or ()), as_json, stats)
        interactive = sys.stdin.isatty()
        if interactive:
            _note(f"loaded {model} in {load_s:.1f} s; /help for commands, /exit or Ctrl-D to quit")
        failed = loop.run(interactive)
    if failed:
        raise typer.Exit(1)


class _ChatLoop:
    """The read-reply loop of `llamacli chat`; replies go to stdout, everything else to stderr."""

    def __init__(self, engine, session, sampling, seed, max_new_tokens, stop, as_json, show_stats):
        self.engine, self.session, self.sampling, self.seed = engine, session, sampling, seed
        self.max_new_tokens, self.stop, self.as_json, self.show_stats = max_new_tokens, stop, as_json, show_stats
        self.last_stats = None
        self.turns = 0

    def read(self, interactive: bool) -> Optional[str]:
        """The next input line, or None at end of input."""
        if interactive:
            try:
                return _stderr().input(">>> ", markup=False)
            except EOFError:
                _write("\n")
                return None
        line = sys.stdin.readline()
        return None if line == "" else line.rstrip("\r\n")

    def run(self, interactive: bool) -> bool:
        """Read turns until end of input or /exit; return whether any turn failed (piped mode)."""
        failed = False
        while True:
            try:
                line = self.read(interactive)
            except KeyboardInterrupt:
                _write("\n")
                _note("(Ctrl-C: /exit or Ctrl-D quits)")
                continue
            if line is None:
                return failed
            if not line.strip():
                continue
            if line.startswith("/"):
                if self.command(line.strip()):
                    return failed
                continue
            failed |= not self.turn(line, interactive)

    def command(self, line: str) -> bool:
        """Run a /command; return True to quit."""
        name, _, arg = line.partition(" ")
        if name in ("/exit", "/quit"):
            return True
        if name == "/help":
            _note(_CHAT_HELP)
        elif name == "/reset":
            self.session.reset()
            _note("(conversation cleared)")
        elif name == "/system":
            self.session.set_system(arg.strip() or None)
            _note("(system message set)" if arg.strip() else "(system message removed)")
        elif name == "/stats":
            if self.last_stats is None:
                _note("(no reply yet)")
            else:
                _note(_stats_line(self.last_stats) + f", turns {self.turns}, "
                      f"cached positions {len(self.session.cached_ids)} of {self.session.n_positions}")
        else:
            _note(f"unknown command {name}; /help lists the commands")
        return False

    def turn(self, text: str, interactive: bool) -> bool:
        """One user turn and the streamed reply; returns False when the turn could not run."""
        import itertools
        import json

        from llamacli.generation import Finished, Request
        from llamacli.errors import ContextOverflowError, LlamaCliError

        while True:
            try:
                ids = self.session.prompt_ids(text)
                room = self.session.n_positions - len(ids)
                n_new = self.max_new_tokens or _default_max_new_tokens(self.engine.config.generation, room)
                request = Request(max_new_tokens=n_new, sampling=self.sampling, seed=self.seed, stop=self.stop)
                events = self.session.turn(text, request)
                first = next(events)  # the context check happens here, before anything is shown
                break
            except ContextOverflowError as exc:
                if self.session.conversation.drop_oldest():
                    _note("(context full: dropped the oldest turn; /reset starts over)")
                    continue
                return self._turn_failed(f"{exc}")
            except LlamaCliError as exc:
                if _state["debug"]:
                    raise
                return self._turn_failed(str(exc))
        finished = None
        try:
            # Run the turn to its end: the session records the reply and its cache after the last event.
            for event in itertools.chain([first], events):
                if isinstance(event, Finished):
                    finished = event
                elif not self.as_json and event.text:
                    _write(event.text)
        except KeyboardInterrupt:
            events.close()
            if not self.as_json:
                _write("\n")
            _note("(reply stopped; it is not kept in the conversation)")
            return True
        self.turns += 1
        self.last_stats = finished.stats
        if self.as_json:
            print(json.dumps({"role": "assistant", "content": finished.text, "token_ids": finished.token_ids,
                              "prompt_token_ids": ids, "prefill_tokens": finished.stats.prefill_tokens,
                              "finish_reason": finished.reason}, ensure_ascii=False), flush=True)
        else:
            _write("\n")
        if self.show_stats:
            _note(_stats_line(finished.stats) + f", finish {finished.reason}")
        return True

    def _turn_failed(self, message: str) -> bool:
        import json

        print("error: " + " ".join(message.split("\n")), file=sys.stderr, flush=True)
        # Keep one output line per input line, so a script reading replies stays in step.
        if self.as_json:
            print(json.dumps({"role": "assistant", "content": "", "finish_reason": "error", "error": message}),
                  flush=True)
        else:
            _write("\n")
        return False


@app.command("inspect")
def inspect_command(
    model: _ModelOpt,
    revision: _RevisionOpt = None,
    dtype: Annotated[_Dtype, typer.Option(
        "--dtype", help="Dtype for the memory figures; auto = the checkpoint's own dtype.")] = _Dtype.auto,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")] = False,
) -> None:
    """Describe a checkpoint from its config and safetensors headers, without loading any weights."""
    with _errors():
        from llamacli.inspect import inspect_checkpoint

        info = inspect_checkpoint(_resolve(model, revision, dtype), dtype=dtype.value)
    if as_json:
        import json

        print(json.dumps(info, ensure_ascii=False), flush=True)
        return
    _print_inspect(info)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""


def _count(n: int) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n:,} ({n / scale:.2f}{unit})"
    return f"{n:,}"


def _print_inspect(info: dict) -> None:
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    summary = Table(title=Text(info["path"]), title_justify="left", show_header=False, box=None)
    summary.add_column(style="bold")
    summary.add_column()
    rope = info["rope"]
    tok = info["tokenizer"]
    rows = [
        ("architecture", f"{info['architecture']} ({info['model_type']})"),
        ("parameters", _count(info["parameters"])),
        *[(f"  {kind}", _count(n)) for kind, n in info["parameters_by_kind"].items()],
        ("on disk", f"{_size(info['disk']['bytes'])} in {len(info['disk']['files'])} file(s); "
                    + ", ".join(f"{d}: {_count(n)}" for d, n in info["disk"]["dtypes"].items())),
        ("layers", str(info["num_layers"])),
        ("hidden size", str(info["hidden_size"])),
        ("ffn dim", str(info["ffn_dim"])),
        ("vocab size", str(info["vocab_size"])),
        ("context length", str(info["context_length"])),
        ("rope", f"theta {rope['theta']:g}, {rope['type']}"
                 + (f" {rope['scaling']}" if rope["scaling"] else "")),
        ("tied embeddings", "yes" if info["tie_embeddings"] else "no"),
        (f"KV cache ({info['dtype']})", f"{_size(info['kv_cache_bytes_per_token'])} per token, "
                                       f"{_size(info['kv_cache_bytes_full_context'])} for the full context"),
        (f"memory ({info['dtype']})", f"~{_size(info['memory_estimate_bytes'])} "
                                      "(weights + KV cache for the full context)"),
        ("tokenizer", f"{tok['kind']}, {tok['vocab_size']} tokens" if tok else "none found"),
        ("BOS / EOS ids", f"{info['bos_token_id']} / {', '.join(map(str, info['eos_token_ids'])) or '-'}"),
        ("chat template", "yes" if info["chat_template"] else "no"),
    ]
    for key, value in rows:
        summary.add_row(Text(key), Text(value))
    console.print(summary)
    layers = Table(title="per layer", title_justify="left")
    for col in ("layer", "heads", "KV heads", "head dim", "GQA group"):
        layers.add_column(col, justify="right")
    for layer in info["layers"]:
        layers.add_row(*(str(layer[k]) for k in ("index", "num_heads", "num_kv_heads", "head_dim",
                                                 "gqa_group_size")))
    console.print(layers)


@app.command()
def perplexity(
    model: _ModelOpt,
    text: Annotated[Optional[str], typer.Option(
        "--text", help="The text to evaluate; '-' reads standard input.", show_default=False)] = None,
    text_file: Annotated[Optional[Path], typer.Option(
        "--text-file", help="Read the text from a file.", show_default=False)] = None,
    context: Annotated[Optional[int], typer.Option(
        "--context", "-c", help="Window length in tokens (default: the model's context, at most 1024).",
        show_default=False)] = None,
    stride: Annotated[Optional[int], typer.Option(
        "--stride", help="Tokens between window starts, less than --context (default: half of it).",
        show_default=False)] = None,
    dtype: _DtypeOpt = _Dtype.auto,
    device: _DeviceOpt = _Device.auto,
    revision: _RevisionOpt = None,
    tokenizer: _TokenizerOpt = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help='Print {"perplexity", "token_ids", "logprobs"}; logprobs[i] is log p(token_ids[i+1]).')]
    = False,
) -> None:
    """Perplexity of a text under the model, in sliding windows (how to check a checkpoint or a dtype)."""
    with _errors():
        from llamacli.errors import UsageError
        from llamacli.perplexity import check_window, compute_perplexity

        body = _read_text_arg(text, text_file, "--text", "--text-file")
        if context is not None and stride is not None:
            check_window(context, stride, context)  # the model's context is checked once it is loaded
        engine, _, _ = _load_engine(model, revision, dtype, device, tokenizer)
        ctx = context or min(engine.config.context_length, 1024)
        step = stride or max(1, ctx // 2)
        ids = engine.raw_ids(body)
        if len(ids) < 2:
            raise UsageError(f"perplexity needs at least 2 tokens, the text has {len(ids)}")
        check_window(ctx, step, engine.config.context_length)

        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        with Progress(TextColumn("perplexity"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      console=_stderr(), transient=True) as bar:
            task = bar.add_task("", total=None)
            result = compute_perplexity(engine.model, ids, ctx, step,
                                        progress=lambda done, total: bar.update(task, completed=done, total=total))
    if as_json:
        import json

        print(json.dumps({"perplexity": result.perplexity, "nll": result.nll, "token_ids": result.token_ids,
                          "logprobs": result.logprobs, "tokens_scored": len(result.logprobs),
                          "context": result.context, "stride": result.stride, "windows": result.windows}),
              flush=True)
        return
    print(f"{result.perplexity:.4f}", flush=True)
    _note(f"perplexity {result.perplexity:.4f} over {len(result.logprobs)} tokens "
          f"({result.windows} windows of {result.context}, stride {result.stride})")


# =============================================================================================================
# bench (issue 6)
# =============================================================================================================


@app.command()
def bench(
    model: _ModelOpt,
    prompt_tokens: Annotated[str, typer.Option("--prompt-tokens", "-p",
                                               help="Prompt lengths to prefill, comma-separated.")] = "128,512",
    gen_tokens: Annotated[int, typer.Option("--gen-tokens", "-g", min=1,
                                            help="Tokens to decode after each prompt.")] = 128,
    batch_size: Annotated[str, typer.Option("--batch-size", "-b", help="Batch sizes, comma-separated.")] = "1",
    dtype: Annotated[str, typer.Option("--dtype", help="Weight dtypes, comma-separated: auto, float32, "
                                                       "bfloat16, float16.")] = "auto",
    device: _DeviceOpt = _Device.auto,
    repetitions: Annotated[int, typer.Option("--repetitions", "-r", min=1,
                                             help="Timed runs per configuration, after one warm-up.")] = 5,
    threads: Annotated[Optional[int], typer.Option("--threads", "-t", min=1, show_default=False,
                                                   help="CPU threads (default: torch's choice).")] = None,
    revision: _RevisionOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON object on stdout, for scripts.")] = False,
) -> None:
    """Measure prefill and decode speed, peak memory and decode's share of the memory bandwidth."""
    import json

    with _errors():
        from llamacli.bench import parse_int_list, run_bench
        from llamacli.errors import UsageError

        prompts = parse_int_list(prompt_tokens, "--prompt-tokens")
        batches = parse_int_list(batch_size, "--batch-size")
        dtypes = [d.strip() for d in dtype.split(",") if d.strip()]
        allowed = [d.value for d in _Dtype]
        bad = [d for d in dtypes if d not in allowed]
        if bad or not dtypes:
            raise UsageError(f"--dtype must be comma-separated values of {', '.join(allowed)}, got '{dtype}'")
        folder = _resolve(model, revision, _Dtype(dtypes[0]))
        report = run_bench(folder, prompts, gen_tokens, batches, dtypes, device=device.value,
                           repetitions=repetitions, threads=threads, model_name=model)
    if as_json:
        print(json.dumps(report.as_dict()), flush=True)
        return
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
    _note(f"median ± stdev of {repetitions} runs after a warm-up; decode GB/s = weights + KV cache read per step "
          f"x steps/s; bandwidth: {report.bandwidth_method}")


def main() -> None:
    """Console entry point: every error is one line on stderr (exit 2 usage, 1 runtime, 130 Ctrl-C)."""
    from typer.exceptions import TyperException

    if len(sys.argv) <= 1:
        app()  # no arguments: the help, as Typer shows it
    try:
        rv = app(standalone_mode=False)
    except TyperException as exc:  # Click's usage errors: unknown option, bad value, missing --model ...
        ctx = getattr(exc, "ctx", None)
        hint = f" (see {ctx.command_path} --help)" if ctx is not None and exc.exit_code == 2 else ""
        print(f"error: {' '.join(exc.format_message().split())}{hint}", file=sys.stderr)
        raise SystemExit(exc.exit_code)
    except typer.Abort:
        raise SystemExit(130)
    except LlamaCliError as exc:  # raised outside a command's own handling
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code)
    raise SystemExit(rv if isinstance(rv, int) else 0)

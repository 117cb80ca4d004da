"""What every `llamacli` command shares: the Typer app and its `--debug` flag, the typed options, the one error
handler, the stderr helpers, model loading with its progress bar, and `main()`.

Each command lives in its own module of this package and registers itself on `app`. Typer and rich are imported
by the CLI only; torch-heavy modules are imported inside commands so that `--help` starts fast.
"""

from __future__ import annotations

import contextlib
import sys
from enum import Enum
from pathlib import Path
from typing import Annotated, Callable, Iterator, Optional

import typer

from llamacli.errors import LlamaCliError, UsageError
from llamacli.prompts import sampling_params
from llamacli.request import check_seed
from llamacli.text import check_text, decode_text, read_text_file

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


def debug_mode() -> bool:
    """Whether --debug was given: errors then propagate with their traceback."""
    return _state["debug"]


# -- shared options ----------------------------------------------------------------------------------------------


class Dtype(str, Enum):
    """--dtype of the commands that load a model."""

    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class Device(str, Enum):
    """--device of the commands that run a model."""

    auto = "auto"
    cpu = "cpu"
    cuda = "cuda"
    mps = "mps"


_MODEL_HELP = "Checkpoint folder, a llama .gguf file, or a hub repo id org/name."
_TOKENIZER_HELP = "tokenizer.json / tokenizer.model file or folder; overrides the model's."
ModelOpt = Annotated[str, typer.Option("--model", "-m", help=_MODEL_HELP, show_default=False)]
RevisionOpt = Annotated[Optional[str], typer.Option(
    "--revision", help="Hub branch, tag or commit (hub repo ids only).", show_default=False)]
DtypeOpt = Annotated[Dtype, typer.Option(
    "--dtype", help="Compute dtype; auto = float32 on CPU, the checkpoint's dtype on a GPU.")]
DeviceOpt = Annotated[Device, typer.Option("--device", help="Where to run; auto = cuda, then mps, then cpu.")]
class Quantize(str, Enum):
    """--quantize of the commands that load a model."""

    int8 = "int8"
    int4 = "int4"


QuantizeOpt = Annotated[Optional[Quantize], typer.Option(
    "--quantize", "-q", show_default=False,
    help="Quantize the weights as they load: int8 (per row) or int4 (per group; see --group-size). "
         "A quantized checkpoint loads as it is, without this flag.")]
GroupSizeOpt = Annotated[Optional[int], typer.Option(
    "--group-size", show_default=False, help="Columns per int4 group: 32 (default), 64 or 128.")]
TokenizerOpt = Annotated[Optional[Path], typer.Option("--tokenizer", help=_TOKENIZER_HELP, show_default=False)]
TemplateOpt = Annotated[Optional[Path], typer.Option(
    "--chat-template", help="A Jinja chat template file; overrides the model's.", show_default=False)]
_SAMPLING = "Sampling"
TemperatureOpt = Annotated[Optional[float], typer.Option(
    "--temperature", "-t", help="0 = greedy. Default: the model's generation_config.json if it samples, else 0.",
    show_default=False, rich_help_panel=_SAMPLING)]
TopKOpt = Annotated[Optional[int], typer.Option(
    "--top-k", help="Keep the k most likely tokens (0 = off).", show_default=False, rich_help_panel=_SAMPLING)]
TopPOpt = Annotated[Optional[float], typer.Option(
    "--top-p", help="Nucleus sampling mass in (0, 1] (1 = off).", show_default=False, rich_help_panel=_SAMPLING)]
MinPOpt = Annotated[Optional[float], typer.Option(
    "--min-p", help="Drop tokens below min-p x the top probability (0 = off).", show_default=False,
    rich_help_panel=_SAMPLING)]
RepPenaltyOpt = Annotated[Optional[float], typer.Option(
    "--repetition-penalty", help="> 1 discourages repeating prompt and generated tokens (1 = off).",
    show_default=False, rich_help_panel=_SAMPLING)]
SeedOpt = Annotated[Optional[int], typer.Option(
    "--seed", help="Random seed: the same seed gives the same output.", show_default=False,
    rich_help_panel=_SAMPLING)]
MaxNewOpt = Annotated[Optional[int], typer.Option(
    "--max-new-tokens", "-n", min=1, show_default=False, rich_help_panel=_SAMPLING,
    help="Most tokens to generate. Default: 256 (or the model's generation config), capped to the context left; "
         "an explicit value beyond the context is an error.")]
StopOpt = Annotated[Optional[list[str]], typer.Option(
    "--stop", help="Stop when this text appears (repeatable; not printed).", show_default=False,
    rich_help_panel=_SAMPLING)]
IgnoreEosOpt = Annotated[bool, typer.Option(
    "--ignore-eos", help="Do not stop on end-of-sequence tokens (for benchmarks).", rich_help_panel=_SAMPLING)]
SystemOpt = Annotated[Optional[str], typer.Option("--system", "-s", help="A system message.", show_default=False)]
StatsOpt = Annotated[bool, typer.Option("--stats", help="Print token counts and speeds to stderr.")]
TensorParallelOpt = Annotated[bool, typer.Option(
    "--tensor-parallel", help="Under torchrun: split every layer's heads and MLP over the ranks (each reads only "
                              "its own slices of the weights); rank 0 prints.")]

def check_sampling(temperature, top_k, top_p, min_p, repetition_penalty, *, seed=None, system=None,
                   stop=None) -> None:
    """Validate the sampling options (and seed, system message, stop strings) the user gave, before any model
    is loaded (UsageError, exit 2)."""
    sampling_params({}, temperature, top_k, top_p, min_p, repetition_penalty)
    check_seed(seed)
    if system is not None:
        check_text(system, "--system", UsageError)
    for s in stop or ():
        check_text(s, "--stop", UsageError)


# -- output and errors -------------------------------------------------------------------------------------------


def stderr():
    """A rich console on stderr that neither highlights nor wraps (it may print paths and model text)."""
    from rich.console import Console

    return Console(stderr=True, highlight=False, soft_wrap=True)


def note(message: str) -> None:
    """One line for a person, on stderr, printed as it is (no markup: it may quote model text or paths)."""
    stderr().print(message, markup=False, highlight=False)


def write(text: str) -> None:
    """Model text to stdout as it is (no rich: no markup, highlighting or wrapping), flushed at once."""
    sys.stdout.write(text)
    sys.stdout.flush()


def error_line(message: str) -> None:
    """The one shape of an error: `error: ...` on one line of stderr."""
    print("error: " + " ".join(message.split("\n")), file=sys.stderr, flush=True)


def fail(exc: BaseException) -> typer.Exit:
    """Report an error as one line on stderr; return the Exit to raise (exit code 2 usage, 1 runtime).

    Under torchrun a usage error, which every rank finds alike, is reported by rank 0 only."""
    if isinstance(exc, LlamaCliError):
        message, code = str(exc), exc.exit_code
    else:
        message, code = f"{type(exc).__name__}: {exc}", 1
    if not (isinstance(exc, UsageError) and _state.get("rank", 0) != 0):
        error_line(message)
    return typer.Exit(code)


@contextlib.contextmanager
def errors() -> Iterator[None]:
    """`with errors():` turns domain and unexpected errors into one line and an exit code (unless --debug)."""
    from typer.exceptions import TyperException

    try:
        yield
    except (typer.Exit, typer.Abort, TyperException):
        raise
    except BrokenPipeError:  # the reader went away (`| head`): stop quietly, as Python's docs say
        import os

        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise typer.Exit(1) from None
    except Exception as exc:
        if debug_mode():
            raise
        raise fail(exc) from None


@contextlib.contextmanager
def progress_bar(label: str, show_item: bool = False) -> Iterator[Callable[..., None]]:
    """A transient bar on stderr; yields `update(done, total, item="")` (item shown when show_item)."""
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    columns = [TextColumn(label), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn()]
    if show_item:
        columns.append(TextColumn("{task.description}"))
    with Progress(*columns, console=stderr(), transient=True) as bar:
        task = bar.add_task("", total=None)

        def update(done: int, total: int, item: str = "") -> None:
            bar.update(task, completed=done, total=total, description=item)

        yield update


@contextlib.contextmanager
def stop_on_interrupt() -> Iterator[None]:
    """Inside: the first Ctrl-C raises KeyboardInterrupt as usual; any later one is ignored, since the command is
    already stopping (a second Ctrl-C would break its cleanup, or torch's exit handlers with a traceback)."""
    import signal

    fired = []

    def first(signum, frame):
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        fired.append(signum)
        raise KeyboardInterrupt

    try:
        previous = signal.signal(signal.SIGINT, first)
    except ValueError:  # not the main thread: signals are not ours to handle
        yield
        return
    try:
        yield
    finally:
        if not fired:  # no Ctrl-C came (or a KeyboardInterrupt raised in code): as before
            signal.signal(signal.SIGINT, previous)


# -- inputs and models -------------------------------------------------------------------------------------------


def read_stdin(where: str = "standard input") -> str:
    """All of standard input as text; InputError naming the byte when it is not UTF-8. Under torchrun, rank 0
    reads it and sends the bytes to the others (which must not read it too); every rank decodes them alike."""
    import os

    def read() -> bytes:
        return sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8", "replace")

    if int(os.environ.get("WORLD_SIZE", "1")) == 1:  # no torch import outside torchrun
        return decode_text(read(), where)
    from llamacli import parallel

    return decode_text(parallel.broadcast_object(read() if parallel.rank() == 0 else None), where)


def read_text_arg(text: Optional[str], file: Optional[Path], text_flag: str, file_flag: str) -> str:
    """The text of exactly one of TEXT / FILE; '-' as TEXT reads stdin. One trailing newline is dropped."""
    if text is not None and file is not None:
        raise UsageError(f"pass either {text_flag} or {file_flag}, not both")
    if text is None and file is None:
        raise UsageError(f"pass {text_flag} TEXT, {file_flag} FILE, or {text_flag} - to read standard input")
    if file is not None:
        value = read_text_file(file, f"{file_flag}")
    elif text == "-":
        value = read_stdin(f"standard input ({text_flag} -)")
    else:
        return check_text(text, text_flag, UsageError)  # undecodable bytes in argv arrive as lone surrogates
    return value[:-1] if value.endswith("\n") else value


def resolve(model: str, revision: Optional[str], dtype: Dtype) -> Path:
    """resolve_model, with a progress bar on stderr when a GGUF file is converted (once; cached after)."""
    from llamacli.sources import resolve_model

    if not model.lower().endswith(".gguf"):
        return resolve_model(model, revision, dtype=dtype.value)  # hub downloads show huggingface_hub's bar
    with progress_bar("converting GGUF (once)") as update:
        return resolve_model(model, revision, dtype=dtype.value, progress=update)


def load_engine(model: str, revision: Optional[str], dtype: Dtype, device: Device, tokenizer=None,
                chat_template=None, quantize: Optional[Quantize] = None, group_size: Optional[int] = None,
                tensor_parallel: bool = False, decode_rows: Optional[int] = None):
    """Resolve --model and load the engine (quantized with --quantize; with `tensor_parallel` this rank loads
    only its shard, the shape checked before any tensor is read; `decode_rows`: see `weights.load_model`);
    returns (engine, folder, seconds spent)."""
    import time

    from llamacli.generation import Engine
    from llamacli.weights import check_quantize

    quant = quantize.value if quantize else None
    check_quantize(quant, group_size)  # before a download or a conversion
    if quant is not None:
        from llamacli.gguf import refuse_quantized

        refuse_quantized(model, "drop --quantize")
    start_distributed(device)
    t0 = time.perf_counter()
    folder = resolve(model, revision, dtype)
    options = {"quantize": quant, "group_size": group_size, "decode_rows": decode_rows}
    if tensor_parallel:
        options["shard"] = shard_plan(folder)
    engine = Engine.load(folder, dtype=dtype.value, device=device.value, tokenizer=tokenizer,
                         chat_template=chat_template, **options)
    return engine, folder, time.perf_counter() - t0


def shard_plan(folder: Path):
    """This rank's tensor-parallel plan for the checkpoint in `folder` (UsageError for a shape it cannot split)."""
    from llamacli import parallel
    from llamacli.config import load_config

    return parallel.ShardPlan.for_config(load_config(folder), parallel.rank(), parallel.world_size())


class _ErrorLinesOnly:
    """stderr of a rank other than 0: its `error:` lines only, each naming the rank."""

    def __init__(self, stream, rank: int):
        self.stream, self.rank, self.buffer = stream, rank, ""

    def write(self, text: str) -> int:
        self.buffer += text
        *lines, self.buffer = self.buffer.split("\n")
        for line in lines:
            if line.startswith("error: "):
                body = line[len("error: "):]
                tagged = body if body.startswith(f"rank {self.rank}:") else f"rank {self.rank}: {body}"
                self.stream.write(f"error: {tagged}\n")
                self.stream.flush()
        return len(text)

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


def start_distributed(device: Device | None = None) -> None:
    """Under torchrun: join the process group (once); ranks other than 0 print no model text or status, only
    their error lines. Outside torchrun: nothing."""
    import os

    from llamacli import parallel

    if not parallel.launched() or _state.get("started"):
        return
    from llamacli.weights import resolve_device

    parallel.init(resolve_device(device.value if device is not None else "auto"))
    import atexit

    atexit.register(parallel.shutdown)
    _state["started"], _state["rank"] = True, parallel.rank()
    if parallel.rank() != 0:
        sys.stdout = open(os.devnull, "w", encoding="utf-8")
        if not debug_mode():  # --debug: every rank's tracebacks
            sys.stderr = _ErrorLinesOnly(sys.stderr, parallel.rank())


def shared_seed(seed: Optional[int]) -> Optional[int]:
    """The seed every rank samples with: the given one, or under torchrun one drawn by rank 0 (tensor-parallel
    ranks must draw the same tokens)."""
    from llamacli import parallel

    if seed is not None or parallel.world_size() == 1:
        return seed
    import random

    return parallel.broadcast_object(random.randrange(2**63) if parallel.rank() == 0 else None)




def stats_line(stats, load_s: float | None = None) -> str:
    """The `--stats` line of a generation: counts, load time, first-token latency and speeds."""
    parts = [f"prompt {stats.prompt_tokens} tokens", f"prefilled {stats.prefill_tokens}",
             f"generated {stats.generated_tokens}"]
    if load_s is not None:
        parts.append(f"load {load_s:.2f} s")
    parts += [f"first token {stats.ttft_s * 1000:.0f} ms", f"prefill {stats.prefill_tps:.1f} tok/s",
              f"decode {stats.decode_tps:.1f} tok/s"]
    if stats.draft:
        parts.append(f"{stats.draft}: drafted {stats.drafted_tokens}, accepted {stats.accepted_tokens} "
                     f"({stats.acceptance_rate:.0%}) in {stats.verify_forwards} verify forwards")
    return "stats: " + ", ".join(parts)


# -- the entry point ---------------------------------------------------------------------------------------------


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
        if debug_mode():
            raise
        error_line(str(exc))
        raise SystemExit(exc.exit_code)
    raise SystemExit(rv if isinstance(rv, int) else 0)

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
    try:
        with Progress(TextColumn("converting"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                      TextColumn("{task.description}"), console=err, transient=True) as bar:
            task = bar.add_task("", total=None)

            def progress(done: int, total: int, name: str) -> None:
                bar.update(task, completed=done, total=total, description=name)

            out = convert_gguf(src, out_dir, dtype=dtype.value, progress=progress)
    except LlamaCliError as exc:
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None
    err.print(f"wrote {out} ({dtype.value})", markup=False, highlight=False)


def _tokenizer_source(model: Optional[str], tokenizer: Optional[Path]) -> Path:
    """The file or folder to load a tokenizer from: --tokenizer wins, else the resolved --model."""
    from llamacli.errors import InputError, UsageError

    if tokenizer is not None:
        return tokenizer
    if model is None:
        raise UsageError("pass --model (a checkpoint) or --tokenizer (a tokenizer file or folder)")
    try:
        from llamacli.sources import resolve_model
    except ImportError:  # sources.py not there yet: a local folder only
        path = Path(model)
        if not path.exists():
            raise InputError(f"model not found: {model} (expected a local checkpoint folder)")
        return path
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

    try:
        if text == "-":
            text = sys.stdin.read()
        tok = load_tokenizer(_tokenizer_source(model, tokenizer))
        ids = tok.encode(text, add_special_tokens=not no_special)
        pieces = [tok.id_to_piece(i) for i in ids]
    except LlamaCliError as exc:
        if _state["debug"]:
            raise
        print(f"error: {exc}", file=sys.stderr)
        raise typer.Exit(exc.exit_code) from None
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


def main() -> None:
    """Console entry point: run the app, turning domain errors into one line and an exit code."""
    try:
        app(standalone_mode=True)
    except LlamaCliError as exc:  # raised outside a command's own handling
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code)

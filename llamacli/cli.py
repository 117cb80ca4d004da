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


def main() -> None:
    """Console entry point: run the app, turning domain errors into one line and an exit code."""
    try:
        app(standalone_mode=True)
    except LlamaCliError as exc:  # raised outside a command's own handling
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code)

"""The command-line interface: the only module that imports typer or rich.

Torch-heavy modules are imported inside commands so that `--help` starts fast.
"""

from __future__ import annotations

import sys
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


def main() -> None:
    """Console entry point: run the app, turning domain errors into one line and an exit code."""
    try:
        app(standalone_mode=True)
    except LlamaCliError as exc:  # raised outside a command's own handling
        print(f"error: {exc}", file=sys.stderr)
        raise SystemExit(exc.exit_code)

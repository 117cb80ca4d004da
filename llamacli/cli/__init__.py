"""The command-line interface (`llamacli`, `python -m llamacli`): the only package that imports typer or rich.

`app` (the Typer app) and `main` (the console entry point) live in `app.py`; each command is a module that
registers itself on `app` when imported here, in the order `--help` lists them. The package's `app` is the
Typer app, so `import llamacli.cli.app as m` gives the app too: import names from the module
(`from llamacli.cli.app import errors`).
"""

from __future__ import annotations

from llamacli.cli.app import app, main
from llamacli.cli import convert, tokenize, generate, chat, serve, inspect, perplexity, bench, quantize  # noqa: F401,E402  (registers)

__all__ = ["app", "main"]

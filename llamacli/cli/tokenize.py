"""`llamacli tokenize`: the token ids and pieces of a text, as a table or JSON."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from llamacli.cli.app import TokenizerOpt, app, errors, read_stdin
from llamacli.errors import UsageError
from llamacli.text import check_text


def tokenizer_source(model: Optional[str], tokenizer: Optional[Path]) -> Path:
    """The file or folder to load a tokenizer from: --tokenizer wins, else the resolved --model."""
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
    tokenizer: TokenizerOpt = None,
    as_json: Annotated[bool, typer.Option("--json", help='Print {"token_ids": [...], "tokens": [...]}.')] = False,
    no_special: Annotated[bool, typer.Option("--no-special", help="Do not add BOS/EOS around the text.")] = False,
) -> None:
    """Show the token ids and pieces of a text, as the model's tokenizer splits it."""
    from llamacli.tokenizer import load_tokenizer

    with errors():
        text = read_stdin("standard input (--text -)") if text == "-" else check_text(text, "--text", UsageError)
        tok = load_tokenizer(tokenizer_source(model, tokenizer))
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

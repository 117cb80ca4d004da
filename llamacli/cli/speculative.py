"""Speculative decoding's CLI side: the shared --draft-model / --prompt-lookup / --draft-tokens options, their
checks, and the stream function (plain or speculative) a command decodes with."""

from __future__ import annotations

from typing import Annotated, Optional

import typer

from llamacli.cli.app import Device, Dtype, load_engine
from llamacli.errors import UsageError
from llamacli.request import DEFAULT_DRAFT_TOKENS

_SPEC = "Speculative decoding"
DraftModelOpt = Annotated[Optional[str], typer.Option(
    "--draft-model", help="A smaller checkpoint with the same tokenizer (folder, .gguf or hub id) that drafts "
                          "tokens for the model to verify several at a time (greedy output is unchanged; "
                          "sampling keeps its distribution).", show_default=False,
    rich_help_panel=_SPEC)]
PromptLookupOpt = Annotated[Optional[int], typer.Option(
    "--prompt-lookup", min=1, help="Draft by matching the last N..1 tokens against the prompt and the text so far "
                                   "(no second model): fast when the reply copies its input (summaries, rewrites, "
                                   "extraction).", show_default=False, rich_help_panel=_SPEC)]
DraftTokensOpt = Annotated[Optional[int], typer.Option(
    "--draft-tokens", min=1, help=f"Most tokens drafted per round (default {DEFAULT_DRAFT_TOKENS}); fewer when few "
                                  "are kept, and none for a while when speculation is not paying.",
    show_default=False, rich_help_panel=_SPEC)]


def check_speculative(draft_model: Optional[str], prompt_lookup: Optional[int], draft_tokens: Optional[int]) -> None:
    """Validate the speculative-decoding options before any model is loaded (UsageError, exit 2)."""
    if draft_model is not None and prompt_lookup is not None:
        raise UsageError("pass either --draft-model or --prompt-lookup, not both")
    if draft_tokens is not None and draft_model is None and prompt_lookup is None:
        raise UsageError("--draft-tokens needs a draft: --draft-model M or --prompt-lookup N")


def speculative_stream(engine, draft_model: Optional[str], prompt_lookup: Optional[int],
                       draft_tokens: Optional[int], revision: Optional[str], dtype: Dtype, device: Device):
    """How to decode: `engine.stream`, or a Speculator's with the draft asked for (a draft model is loaded and
    checked against the model's vocabulary here)."""
    if draft_model is None and prompt_lookup is None:
        return engine.stream
    from llamacli.generation.speculative import DraftModel, PromptLookup, Speculator, check_same_vocabulary

    if prompt_lookup is not None:
        draft = PromptLookup(prompt_lookup)
    else:
        draft_engine, _, load_s = load_engine(draft_model, revision, dtype, device)
        check_same_vocabulary(engine, draft_engine, f"--draft-model {draft_model}")
        draft = DraftModel(draft_engine)
    return Speculator(engine, draft, draft_tokens or DEFAULT_DRAFT_TOKENS).stream

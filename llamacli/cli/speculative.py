"""Speculative decoding's CLI side: the shared --draft-model / --draft-quantize / --prompt-lookup / --draft-tokens
options, their checks, and the stream function (plain or speculative) a command decodes with."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Optional

import typer

from llamacli.cli.app import Device, Dtype, Quantize, load_engine, shard_plan
from llamacli.errors import UsageError
from llamacli.request import DEFAULT_DRAFT_TOKENS

_SPEC = "Speculative decoding"
DraftModelOpt = Annotated[Optional[str], typer.Option(
    "--draft-model", help="A smaller checkpoint with the same tokenizer (folder, .gguf or hub id) that drafts "
                          "tokens for the model to verify several at a time (greedy output is unchanged; "
                          "sampling keeps its distribution).", show_default=False,
    rich_help_panel=_SPEC)]
DraftQuantizeOpt = Annotated[Optional[Quantize], typer.Option(
    "--draft-quantize", help="Self-speculation: draft with an int4 (or int8) copy of the model itself, quantized "
                             "layer by layer from the same checkpoint as it loads (no second model; most drafts "
                             "are kept because it is the same model).", show_default=False,
    rich_help_panel=_SPEC)]
DraftGroupSizeOpt = Annotated[Optional[int], typer.Option(
    "--draft-group-size", help="Columns per int4 group of the --draft-quantize int4 copy: 32 (default), 64 or 128.",
    show_default=False, rich_help_panel=_SPEC)]
PromptLookupOpt = Annotated[Optional[int], typer.Option(
    "--prompt-lookup", min=1, help="Draft by matching the last N..1 tokens against the prompt and the text so far "
                                   "(no second model): fast when the reply copies its input (summaries, rewrites, "
                                   "extraction).", show_default=False, rich_help_panel=_SPEC)]
DraftTokensOpt = Annotated[Optional[int], typer.Option(
    "--draft-tokens", min=1, help=f"Most tokens drafted per round (default {DEFAULT_DRAFT_TOKENS}); each round "
                                  "drafts as many as measured acceptance and costs make fastest, none for a while "
                                  "when no number beats plain decoding.",
    show_default=False, rich_help_panel=_SPEC)]


@dataclass(frozen=True)
class DraftOptions:
    """The speculative-decoding options of a command, as given."""

    draft_model: Optional[str] = None
    prompt_lookup: Optional[int] = None
    draft_tokens: Optional[int] = None
    draft_quantize: Optional[Quantize] = None
    draft_group_size: Optional[int] = None

    @property
    def drafts(self) -> list[str]:
        """The draft flags given (at most one may be)."""
        given = (("--draft-model", self.draft_model), ("--prompt-lookup", self.prompt_lookup),
                 ("--draft-quantize", self.draft_quantize))
        return [flag for flag, value in given if value is not None]

    @property
    def tokens(self) -> int:
        """The most tokens a round drafts: --draft-tokens, else the measured default."""
        return DEFAULT_DRAFT_TOKENS if self.draft_tokens is None else self.draft_tokens

    @property
    def decode_rows(self) -> int:
        """The rows the model's decode steps multiply: one token plain, a drafted round's k + 1 when verifying."""
        return 1 + self.tokens if self.drafts else 1

    def check(self) -> None:
        """Validate the options before any model is loaded (UsageError, exit 2)."""
        from llamacli.weights import check_quantize

        drafts = self.drafts
        if len(drafts) > 1:
            raise UsageError(f"pass one draft: {', '.join(drafts[:-1])} or {drafts[-1]}, "
                             f"not {'both' if len(drafts) == 2 else 'all three'}")
        if self.draft_tokens is not None and not drafts:
            raise UsageError("--draft-tokens needs a draft: --draft-model M, --draft-quantize int4 or --prompt-lookup N")
        quant = self.draft_quantize.value if self.draft_quantize is not None else None
        if self.draft_group_size is not None and quant != "int4":
            raise UsageError("--draft-group-size applies to --draft-quantize int4 only")
        try:
            check_quantize(quant, self.draft_group_size)
        except UsageError as exc:  # the same rules as --quantize / --group-size, said with the draft's flags
            raise UsageError(str(exc).replace("--group-size", "--draft-group-size")) from None

    def stream(self, engine, folder: Path, revision: Optional[str], dtype: Dtype, device: Device,
               tensor_parallel: bool = False):
        """How to decode: `engine.stream`, or a Speculator's with the draft asked for (a draft model is loaded and
        checked against the model's vocabulary here; a self-draft is quantized from `folder`, the model's own
        checkpoint, and under --tensor-parallel sharded as the model is)."""
        if not self.drafts:
            return engine.stream
        from llamacli.generation.speculative import DraftModel, PromptLookup, Speculator, check_same_vocabulary

        if self.prompt_lookup is not None:
            draft = PromptLookup(self.prompt_lookup)
        elif self.draft_quantize is not None:
            draft = DraftModel(self_draft(engine, folder, self.draft_quantize.value, self.draft_group_size, dtype,
                                          device, tensor_parallel), name=f"self-{self.draft_quantize.value}",
                               share_cache=True)
        else:
            draft_engine, _, _ = load_engine(self.draft_model, revision, dtype, device, decode_rows=1)
            check_same_vocabulary(engine, draft_engine, f"--draft-model {self.draft_model}")
            draft = DraftModel(draft_engine)
        return Speculator(engine, draft, self.tokens).stream


def self_draft(engine, folder: Path, quantize: str, group_size: Optional[int], dtype: Dtype, device: Device,
               tensor_parallel: bool = False):
    """An Engine on a quantized copy of the model's float checkpoint `folder` (its tokenizer and template shared)."""
    from llamacli import quantization
    from llamacli.generation import Engine
    from llamacli.weights import load_model

    stored = quantization.read_quantization(folder)
    if stored is not None:
        raise UsageError(f"--draft-quantize {quantize}: {folder} is already quantized ({stored.describe()}); a "
                         "self-draft is quantized from a float checkpoint (use --draft-model for another one)")
    options = {"shard": shard_plan(folder)} if tensor_parallel else {}
    model = load_model(folder, dtype=dtype.value, device=device.value, quantize=quantize, group_size=group_size,
                       decode_rows=1, **options)
    return Engine(model, engine.tokenizer, engine.chat_template)

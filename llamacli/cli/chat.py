"""`llamacli chat`: load a model and run the read-reply loop (`llamacli.cli.repl`) over its chat session."""

from __future__ import annotations

import sys
from typing import Annotated, Optional

import typer

from llamacli.cli.app import (Device, DeviceOpt, Dtype, DtypeOpt, GroupSizeOpt, MaxNewOpt, MinPOpt, ModelOpt,
                              QuantizeOpt, RepPenaltyOpt, RevisionOpt, SeedOpt, StatsOpt, StopOpt, SystemOpt,
                              TemperatureOpt, TemplateOpt, TensorParallelOpt, TokenizerOpt, TopKOpt, TopPOpt, app,
                              check_sampling, errors, load_engine, note, shared_seed, start_distributed)
from llamacli.cli.speculative import (DraftGroupSizeOpt, DraftModelOpt, DraftOptions, DraftQuantizeOpt, DraftTokensOpt,
                                      PromptLookupOpt)
from llamacli.cli.repl import ChatLoop
from llamacli.errors import TokenizerError, UsageError
from llamacli.prompts import sampling_params


@app.command()
def chat(
    model: ModelOpt,
    system: SystemOpt = None,
    temperature: TemperatureOpt = None,
    top_k: TopKOpt = None,
    top_p: TopPOpt = None,
    min_p: MinPOpt = None,
    repetition_penalty: RepPenaltyOpt = None,
    seed: SeedOpt = None,
    max_new_tokens: MaxNewOpt = None,
    stop: StopOpt = None,
    dtype: DtypeOpt = Dtype.auto,
    device: DeviceOpt = Device.auto,
    quantize: QuantizeOpt = None,
    group_size: GroupSizeOpt = None,
    revision: RevisionOpt = None,
    tokenizer: TokenizerOpt = None,
    chat_template: TemplateOpt = None,
    max_context: Annotated[Optional[int], typer.Option(
        "--max-context", min=2, help="Positions kept for the conversation (default: the model's context).",
        show_default=False)] = None,
    draft_model: DraftModelOpt = None,
    draft_quantize: DraftQuantizeOpt = None,
    draft_group_size: DraftGroupSizeOpt = None,
    prompt_lookup: PromptLookupOpt = None,
    draft_tokens: DraftTokensOpt = None,
    stats: StatsOpt = False,
    as_json: Annotated[bool, typer.Option(
        "--json", help='One JSON object per turn: {"role", "content", "token_ids", "prompt_token_ids", '
                       '"prefill_tokens", "finish_reason"}.')] = False,
    tensor_parallel: TensorParallelOpt = False,
) -> None:
    """Chat with the model; the KV cache is kept across turns.

    With stdin not a terminal, each input line is one user turn and stdout carries only the replies, one per line.
    """
    with errors():
        check_sampling(temperature, top_k, top_p, min_p, repetition_penalty, seed=seed, system=system, stop=stop)
        spec = DraftOptions(draft_model, prompt_lookup, draft_tokens, draft_quantize, draft_group_size)
        spec.check()
        from llamacli.generation import ChatSession

        start_distributed(device)
        from llamacli import parallel

        if parallel.world_size() > 1 and not tensor_parallel:
            raise UsageError(f"under torchrun ({parallel.world_size()} ranks) chat needs --tensor-parallel")
        seed = shared_seed(seed)
        engine, folder, load_s = load_engine(model, revision, dtype, device, tokenizer, chat_template,
                                             quantize, group_size, tensor_parallel, decode_rows=spec.decode_rows)
        if engine.chat_template is None:
            raise TokenizerError(f"{folder}: this model has no chat template; chat needs one "
                                 "(pass --chat-template FILE, or use generate --raw)")
        sampling = sampling_params(engine.config.generation, temperature, top_k, top_p, min_p, repetition_penalty)
        stream = spec.stream(engine, folder, revision, dtype, device, tensor_parallel)
        session = ChatSession(engine, system=system, max_context=max_context, stream=stream)
        loop = ChatLoop(engine, session, sampling, seed, max_new_tokens, tuple(stop or ()), as_json, stats)
        interactive = parallel.broadcast_object(sys.stdin.isatty())  # rank 0's terminal
        if parallel.world_size() > 1:
            loop.read = _read_on_rank0(loop.read)
        if interactive:
            note(f"loaded {model} in {load_s:.1f} s; /help for commands, /exit or Ctrl-D to quit")
        failed = loop.run(interactive)
    if failed:
        raise typer.Exit(1)


def _read_on_rank0(read):
    """The loop's `read` under tensor parallelism: rank 0 reads its terminal and every rank gets the same line."""
    from llamacli import parallel

    def shared(interactive: bool) -> Optional[str]:
        got = None
        if parallel.rank() == 0:
            try:
                got = ("line", read(interactive))
            except KeyboardInterrupt:
                got = ("interrupt", None)
        kind, line = parallel.broadcast_object(got)
        if kind == "interrupt":
            raise KeyboardInterrupt
        return line

    return shared

"""`llamacli perplexity`: the perplexity of a text under a model, in sliding windows."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Optional

import typer

from llamacli.cli.app import (Device, DeviceOpt, Dtype, DtypeOpt, GroupSizeOpt, ModelOpt, QuantizeOpt, RevisionOpt,
                              TensorParallelOpt, TokenizerOpt, app, errors, load_engine, note, progress_bar,
                              read_text_arg, start_distributed)
from llamacli.errors import UsageError
from llamacli.prompts import encode_raw


@app.command()
def perplexity(
    model: ModelOpt,
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
    dtype: DtypeOpt = Dtype.auto,
    device: DeviceOpt = Device.auto,
    quantize: QuantizeOpt = None,
    group_size: GroupSizeOpt = None,
    revision: RevisionOpt = None,
    tokenizer: TokenizerOpt = None,
    as_json: Annotated[bool, typer.Option(
        "--json", help='Print {"perplexity", "token_ids", "logprobs"}; logprobs[i] is log p(token_ids[i+1]).')]
    = False,
    tensor_parallel: TensorParallelOpt = False,
) -> None:
    """Perplexity of a text under the model, in sliding windows (how to check a checkpoint or a dtype)."""
    with errors():
        from llamacli.perplexity import check_window, compute_perplexity

        start_distributed(device)
        body = read_text_arg(text, text_file, "--text", "--text-file")
        if context is not None and stride is not None:
            check_window(context, stride, context)  # the model's context is checked once it is loaded
        engine, _, _ = load_engine(model, revision, dtype, device, tokenizer, quantize=quantize,
                                   group_size=group_size, tensor_parallel=tensor_parallel)
        ctx = context or min(engine.config.context_length, 1024)
        step = stride or max(1, ctx // 2)
        ids = encode_raw(engine.tokenizer, body)
        if len(ids) < 2:
            raise UsageError(f"perplexity needs at least 2 tokens, the text has {len(ids)}")
        check_window(ctx, step, engine.config.context_length)
        with progress_bar("perplexity") as update:
            result = compute_perplexity(engine.model, ids, ctx, step, progress=update)
    if as_json:
        print(json.dumps({"perplexity": result.perplexity, "nll": result.nll, "token_ids": result.token_ids,
                          "logprobs": result.logprobs, "tokens_scored": len(result.logprobs),
                          "context": result.context, "stride": result.stride, "windows": result.windows}),
              flush=True)
        return
    print(f"{result.perplexity:.4f}", flush=True)
    note(f"perplexity {result.perplexity:.4f} over {len(result.logprobs)} tokens "
         f"({result.windows} windows of {result.context}, stride {result.stride})")

"""Perplexity of a text under a model, in sliding windows (as Hugging Face's perplexity guide does).

Windows of `context` tokens start every `stride` tokens; each window scores only the tokens the previous one
did not reach, so every token after the first is scored exactly once, with up to `context - 1` tokens before
it (more overlap = more context per token = lower, fairer perplexity, and more compute).
`logprobs[i]` is log p(token_ids[i + 1] | what precedes it in its window).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator

import torch

from llamacli.errors import UsageError


@dataclass
class PerplexityResult:
    """The scored tokens and their log-probabilities (natural log)."""

    token_ids: list[int]
    logprobs: list[float]
    context: int
    stride: int
    windows: int

    @property
    def nll(self) -> float:
        """Mean negative log-likelihood per scored token."""
        return -sum(self.logprobs) / len(self.logprobs)

    @property
    def perplexity(self) -> float:
        """exp(mean negative log-likelihood)."""
        return math.exp(self.nll)


def windows(n_tokens: int, context: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """(begin, end, first_scored) per window: the model sees [begin, end) and scores [first_scored, end)."""
    prev_end = 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + context, n_tokens)
        yield begin, end, max(prev_end, begin + 1)
        prev_end = end
        if end == n_tokens:
            break


def check_window(context: int, stride: int, model_context: int) -> None:
    """Raise UsageError unless 2 <= context <= model_context and 1 <= stride < context.

    stride < context keeps at least one token of overlap, so the first token of each window after the first
    has something before it and is scored too (HF's guide with stride == context skips one token per window).
    """
    if context < 2:
        raise UsageError(f"--context must be at least 2 tokens, got {context}")
    if context > model_context:
        raise UsageError(f"--context {context} exceeds the model's context of {model_context} tokens")
    if not 1 <= stride < context:
        raise UsageError(f"--stride must be at least 1 and less than --context ({context}), got {stride}")


@torch.inference_mode()
def compute_perplexity(model, token_ids: list[int], context: int, stride: int,
                       progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Score token_ids with `model` (a `llamacli.model.Runtime` or `Llama`) in windows; see the module docstring."""
    if len(token_ids) < 2:
        raise UsageError(f"perplexity needs at least 2 tokens, the text has {len(token_ids)}")
    check_window(context, stride, model.config.context_length)
    device = model.device
    spans = list(windows(len(token_ids), context, stride))
    logprobs: list[float] = []
    for n, (begin, end, first) in enumerate(spans):
        tokens = torch.tensor([token_ids[begin:end]], device=device)
        logits = model(tokens)[0]  # (T, vocab)
        # Position j of the window predicts token begin + j + 1: keep the rows predicting [first, end).
        rows = logits[first - 1 - begin:end - 1 - begin].float()
        targets = tokens[0, first - begin:end - begin]
        lp = torch.log_softmax(rows, dim=-1).gather(1, targets[:, None])[:, 0]
        logprobs.extend(lp.cpu().tolist())
        if progress is not None:
            progress(n + 1, len(spans))
    return PerplexityResult(list(token_ids), logprobs, context, stride, len(spans))

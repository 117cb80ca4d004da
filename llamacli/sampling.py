"""Choosing the next token: the pure function `sample` over `request.SamplingParams`.

Order of processing, as in transformers' generate: repetition penalty (then OpenAI's presence and frequency
penalties, as vLLM applies them), temperature, top-k, top-p, min-p.
Greedy (temperature 0) is `argmax` of the penalised logits, never a tiny temperature.
"""

from __future__ import annotations

import torch

from llamacli.request import SamplingParams


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make already-seen tokens less likely: divide positive logits by penalty, multiply negative ones.

    `seen` is a bool mask over the vocabulary (tokens in the prompt or generated so far).
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


def apply_count_penalties(logits: torch.Tensor, counts: torch.Tensor, presence: float,
                          frequency: float) -> torch.Tensor:
    """OpenAI's penalties: subtract `presence` from each generated token's logit, and `frequency` x its count.

    `counts` (V,) holds how many times each token was generated so far (the prompt does not count).
    """
    if presence == 0 and frequency == 0:
        return logits
    return logits - presence * (counts > 0).to(logits.dtype) - frequency * counts.to(logits.dtype)


def filter_logits(logits: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """Scale by temperature and mask (to -inf) everything top-k / top-p / min-p exclude. logits: (V,)."""
    logits = logits.float() / p.temperature
    if p.top_k > 0 and p.top_k < logits.shape[-1]:
        keep = torch.topk(logits, p.top_k).indices  # exactly k, even with ties
        masked = torch.full_like(logits, float("-inf"))
        masked[keep] = logits[keep]
        logits = masked
    if p.top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Keep the smallest prefix whose mass reaches top_p: drop a token if the mass before it already does.
        before = torch.cumsum(probs, dim=-1) - probs
        drop_sorted = before >= p.top_p
        drop_sorted[0] = False
        drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    if p.min_p > 0:
        probs = torch.softmax(logits, dim=-1)
        logits = logits.masked_fill(probs < p.min_p * probs.max(), float("-inf"))
    return logits


def penalized(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None = None,
              counts: torch.Tensor | None = None) -> torch.Tensor:
    """logits (V,) after the repetition penalty (`seen`, bool) and the presence/frequency penalties (`counts`)."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if counts is not None:
        logits = apply_count_penalties(logits, counts, p.presence_penalty, p.frequency_penalty)
    return logits


def distribution(logits: torch.Tensor, p: SamplingParams, seen: torch.Tensor | None = None,
                 counts: torch.Tensor | None = None) -> torch.Tensor:
    """The probabilities (V,) that sampling draws from: penalties, temperature, then the filters."""
    return torch.softmax(filter_logits(penalized(logits, p, seen, counts), p), dim=-1)


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None, counts: torch.Tensor | None = None) -> int:
    """Pick the next token id from one row of logits (V,); `seen` (bool) and `counts` feed the penalties."""
    if p.greedy:
        return int(torch.argmax(penalized(logits, p, seen, counts)))
    return int(torch.multinomial(distribution(logits, p, seen, counts), 1, generator=generator))


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with `seed` (a random seed when None) on the device where sampling runs."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen

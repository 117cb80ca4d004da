"""Choosing the next token: `SamplingParams` (frozen, validated) and the pure function `sample`.

Order of processing, as in transformers' generate: repetition penalty, temperature, top-k, top-p, min-p.
Greedy (temperature 0) is `argmax` of the penalised logits, never a tiny temperature.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from llamacli.errors import UsageError


@dataclass(frozen=True)
class SamplingParams:
    """How to pick tokens. temperature 0 = greedy; top_k 0, top_p 1, min_p 0, penalty 1 = off."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        validate(self)

    @property
    def greedy(self) -> bool:
        """True when the choice is argmax (no randomness)."""
        return self.temperature == 0 or self.top_k == 1


def validate(p: SamplingParams) -> None:
    """Raise UsageError naming the option whose value is out of range."""
    def number(value, name):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value:
            raise UsageError(f"{name} must be a number, got {value!r}")

    for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
        number(getattr(p, name), name.replace("_", "-"))
    if p.temperature < 0:
        raise UsageError(f"temperature must be >= 0, got {p.temperature}")
    if isinstance(p.top_k, bool) or not isinstance(p.top_k, int) or p.top_k < 0:
        raise UsageError(f"top-k must be an integer >= 0, got {p.top_k!r}")
    if not 0 < p.top_p <= 1:
        raise UsageError(f"top-p must be in (0, 1], got {p.top_p}")
    if not 0 <= p.min_p <= 1:
        raise UsageError(f"min-p must be in [0, 1], got {p.min_p}")
    if p.repetition_penalty <= 0:
        raise UsageError(f"repetition-penalty must be > 0, got {p.repetition_penalty}")


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """Make already-seen tokens less likely: divide positive logits by penalty, multiply negative ones.

    `seen` is a bool mask over the vocabulary (tokens in the prompt or generated so far).
    """
    if penalty == 1.0:
        return logits
    penalised = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalised, logits)


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


def sample(logits: torch.Tensor, p: SamplingParams, generator: torch.Generator | None = None,
           seen: torch.Tensor | None = None) -> int:
    """Pick the next token id from one row of logits (V,)."""
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, p.repetition_penalty)
    if p.greedy:
        return int(torch.argmax(logits))
    probs = torch.softmax(filter_logits(logits, p), dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def make_generator(seed: int | None, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded with `seed` (a random seed when None) on the device where sampling runs."""
    gen = torch.Generator(device=device)
    if seed is None:
        gen.seed()
    else:
        gen.manual_seed(seed)
    return gen

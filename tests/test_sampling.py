"""Sampling: validation, exact filters, and parity with transformers' logits processors."""

from __future__ import annotations

import pytest
import torch

from llamacli.errors import UsageError
from llamacli.sampling import (SamplingParams, apply_repetition_penalty, filter_logits, make_generator,
                               sample)


def test_greedy_is_argmax():
    logits = torch.tensor([0.1, 3.0, 2.9, -1.0])
    assert sample(logits, SamplingParams()) == 1
    assert SamplingParams(temperature=0.7, top_k=1).greedy


@pytest.mark.parametrize("kwargs, message", [
    (dict(temperature=-0.1), "temperature must be >= 0"),
    (dict(top_p=0.0), "top-p must be in (0, 1]"),
    (dict(top_p=1.5), "top-p must be in (0, 1]"),
    (dict(top_k=-1), "top-k must be an integer >= 0"),
    (dict(min_p=2.0), "min-p must be in [0, 1]"),
    (dict(repetition_penalty=0.0), "repetition-penalty must be > 0"),
])
def test_bad_values_are_usage_errors(kwargs, message):
    with pytest.raises(UsageError, match=__import__("re").escape(message)):
        SamplingParams(**kwargs)


def test_top_k_keeps_exactly_k_even_with_ties():
    logits = torch.tensor([1.0, 1.0, 1.0, 1.0, 0.5])
    kept = torch.isfinite(filter_logits(logits, SamplingParams(temperature=1.0, top_k=2)))
    assert int(kept.sum()) == 2


def test_same_seed_same_tokens_and_different_seed_differs():
    logits = torch.randn(1000, generator=torch.Generator().manual_seed(0))
    p = SamplingParams(temperature=1.0)
    a = [sample(logits, p, g) for g in [make_generator(7)] for _ in range(20)]
    b = [sample(logits, p, g) for g in [make_generator(7)] for _ in range(20)]
    c = [sample(logits, p, g) for g in [make_generator(8)] for _ in range(20)]
    assert a == b
    assert a != c


@pytest.mark.parity
@pytest.mark.parametrize("kwargs", [
    dict(temperature=0.7, top_k=5),
    dict(temperature=1.0, top_p=0.9),
    dict(temperature=1.3, top_p=0.5),
    dict(temperature=0.8, min_p=0.05),
    dict(temperature=0.9, top_k=50, top_p=0.95, min_p=0.01),
])
def test_filters_match_transformers(kwargs):
    from transformers.generation.logits_process import (MinPLogitsWarper, TemperatureLogitsWarper,
                                                        TopKLogitsWarper, TopPLogitsWarper)

    torch.manual_seed(0)
    logits = torch.randn(1, 500) * 3
    p = SamplingParams(**kwargs)
    ref = TemperatureLogitsWarper(p.temperature)(None, logits.clone())
    if p.top_k:
        ref = TopKLogitsWarper(p.top_k)(None, ref)
    if p.top_p < 1:
        ref = TopPLogitsWarper(p.top_p)(None, ref)
    if p.min_p:
        ref = MinPLogitsWarper(p.min_p)(None, ref)
    ours = filter_logits(logits[0], p)
    assert torch.equal(torch.isfinite(ours), torch.isfinite(ref[0]))
    finite = torch.isfinite(ours)
    torch.testing.assert_close(ours[finite], ref[0][finite])


@pytest.mark.parity
def test_repetition_penalty_matches_transformers():
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor

    torch.manual_seed(1)
    logits = torch.randn(1, 50)
    history = torch.tensor([[3, 7, 7, 20, 41]])
    seen = torch.zeros(50, dtype=torch.bool)
    seen[history[0]] = True
    ref = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    torch.testing.assert_close(apply_repetition_penalty(logits[0], seen, 1.3), ref[0])


# -- OpenAI's presence / frequency penalties ---------------------------------------------------------------------


def test_presence_and_frequency_penalties_subtract_per_generated_token():
    from llamacli.sampling import apply_count_penalties

    logits = torch.tensor([1.0, 1.0, 1.0, 1.0])
    counts = torch.tensor([0.0, 1.0, 3.0, 0.0])
    out = apply_count_penalties(logits, counts, presence=0.5, frequency=0.25)
    assert out.tolist() == [1.0, 1.0 - 0.5 - 0.25, 1.0 - 0.5 - 0.75, 1.0]
    # A greedy pick moves off a token generated often enough, and a negative penalty favours it.
    peaked = torch.tensor([2.0, 1.9, 0.0])
    assert sample(peaked, SamplingParams(frequency_penalty=0.2), counts=torch.tensor([1.0, 0.0, 0.0])) == 1
    assert sample(peaked, SamplingParams(presence_penalty=-1.0), counts=torch.tensor([0.0, 1.0, 0.0])) == 1
    assert sample(peaked, SamplingParams(presence_penalty=2.0), counts=torch.zeros(3)) == 0


@pytest.mark.parametrize("name", ["presence_penalty", "frequency_penalty"])
def test_count_penalties_are_in_openai_range(name):
    with pytest.raises(UsageError, match=name.replace("_", "-") + r" must be in \[-2, 2\]"):
        SamplingParams(**{name: 2.5})

"""Perplexity in sliding windows: every token scored once, equal to a direct transformers computation."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from llamacli.errors import UsageError
from llamacli.perplexity import check_window, compute_perplexity, windows
from llamacli.weights import load_model

TEXT = ("The quick brown fox jumps over the lazy dog. Hello world! Hello again, world. How are you today? "
        "Numbers: 0 1 2 3 12 123 1234 3.14159 2024-06-01. def main():\n    print('hi')\n")


def hf_guide_perplexity(model, ids: list[int], context: int, stride: int) -> tuple[float, int]:
    """The loop of Hugging Face's perplexity guide (labels masked with -100), with transformers' own loss."""
    seq = torch.tensor([ids])
    nll_sum, n_tokens, prev_end = 0.0, 0, 0
    for begin in range(0, seq.size(1), stride):
        end = min(begin + context, seq.size(1))
        trg_len = end - prev_end
        input_ids = seq[:, begin:end]
        target = input_ids.clone()
        target[:, :-trg_len] = -100
        with torch.no_grad():
            loss = model(input_ids, labels=target).loss
        n_valid = (target[:, 1:] != -100).sum().item()  # labels are shifted inside the model
        nll_sum += loss.item() * n_valid
        n_tokens += n_valid
        prev_end = end
        if end == seq.size(1):
            break
    return math.exp(nll_sum / n_tokens), n_tokens


@pytest.fixture(scope="module")
def models(tiny_chat_dir):
    import transformers

    ours = load_model(tiny_chat_dir, dtype="float32", device="cpu")
    ref = transformers.LlamaForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
    return ours, ref


@pytest.fixture(scope="module")
def ids(tiny_chat_dir):
    from llamacli.tokenizer import load_tokenizer

    out = load_tokenizer(tiny_chat_dir).encode(TEXT)
    assert len(out) > 60
    return out


@settings(max_examples=200, deadline=None)
@given(n=st.integers(2, 300), context=st.integers(2, 64), data=st.data())
def test_windows_score_every_token_after_the_first_exactly_once(n, context, data):
    stride = data.draw(st.integers(1, context - 1))
    scored = []
    for begin, end, first in windows(n, context, stride):
        assert 0 <= begin < first <= end <= n and end - begin <= context
        scored.extend(range(first, end))
    assert scored == list(range(1, n))


@pytest.mark.parity
def test_single_window_logprobs_are_transformers_log_softmax(models, ids):
    ours, ref = models
    result = compute_perplexity(ours, ids, context=len(ids), stride=len(ids) - 1)
    with torch.no_grad():
        logp = torch.log_softmax(ref(torch.tensor([ids])).logits[0].float(), dim=-1)
    expected = [logp[i, ids[i + 1]].item() for i in range(len(ids) - 1)]
    assert result.windows == 1 and result.token_ids == ids
    assert result.logprobs == pytest.approx(expected, abs=1e-4)


@pytest.mark.parity
@pytest.mark.parametrize("context, stride", [(16, 8), (24, 5), (32, 31), (6, 2)])
def test_sliding_windows_equal_the_hf_guide(models, ids, context, stride):
    ours, ref = models
    ids = ids[:48]
    result = compute_perplexity(ours, ids, context=context, stride=stride)
    expected, n_scored = hf_guide_perplexity(ref, ids, context, stride)
    assert len(result.logprobs) == n_scored == len(ids) - 1
    assert result.perplexity == pytest.approx(expected, rel=1e-4)
    assert result.nll == pytest.approx(math.log(expected), rel=1e-4)


def test_more_context_per_token_changes_the_windows_not_the_count(models, ids):
    ours, _ = models
    progress = []
    a = compute_perplexity(ours, ids, context=16, stride=15, progress=lambda d, t: progress.append((d, t)))
    b = compute_perplexity(ours, ids, context=16, stride=4)
    assert len(a.logprobs) == len(b.logprobs) == len(ids) - 1
    assert b.windows > a.windows
    assert progress == [(i + 1, a.windows) for i in range(a.windows)]
    # The first window is the same in both, so its scores are too.
    assert a.logprobs[:15] == pytest.approx(b.logprobs[:15], abs=1e-5)


def test_lower_precision_stays_close(tiny_chat_dir, models, ids):
    ours, _ = models
    bf16 = load_model(tiny_chat_dir, dtype="bfloat16", device="cpu")
    full = compute_perplexity(ours, ids, 32, 16).perplexity
    low = compute_perplexity(bf16, ids, 32, 16).perplexity
    assert low == pytest.approx(full, rel=0.05)


@pytest.mark.parametrize("context, stride, model_context, pattern", [
    (1, 1, 64, "--context must be at least 2"),
    (65, 8, 64, "exceeds the model's context of 64"),
    (16, 16, 64, "--stride must be at least 1 and less than --context"),
    (16, 0, 64, "--stride must be"),
])
def test_window_checks(context, stride, model_context, pattern):
    with pytest.raises(UsageError, match=pattern):
        check_window(context, stride, model_context)


def test_too_short_text(models):
    with pytest.raises(UsageError, match="at least 2 tokens"):
        compute_perplexity(models[0], [5], 8, 4)


@pytest.mark.slow
@pytest.mark.parity
def test_smollm2_perplexity_close_to_transformers(smollm2_dir):
    import transformers
    from typer.testing import CliRunner

    from llamacli.cli import app

    text = ("Paris is the capital and most populous city of France. With an estimated population of 2,102,650 "
            "residents in January 2023 in an area of more than 105 km2, Paris is the fourth-most populous city "
            "in the European Union and the 30th most densely populated city in the world in 2022.")
    result = CliRunner().invoke(app, ["perplexity", "--model", str(smollm2_dir), "--text", text, "--context", "32",
                                      "--stride", "16", "--json"])
    assert result.exit_code == 0, result.stderr
    import json

    out = json.loads(result.stdout)
    ref = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    expected, n = hf_guide_perplexity(ref, out["token_ids"], 32, 16)
    assert len(out["logprobs"]) == n
    assert out["perplexity"] == pytest.approx(expected, rel=1e-3)
    assert 1 < out["perplexity"] < 100  # a real model on real text

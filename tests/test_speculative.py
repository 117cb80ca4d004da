"""Speculative decoding: greedy output equals plain decoding token for token (every draft kind, the int4 / int8
self-drafts included; stops, eos, max_new_tokens mid-draft, the context limit, long runs of rejections); sampling
keeps plain sampling's distribution (chi-square over seeded runs, stub drafts that always / never get accepted,
and wrong residuals that the same statistic must reject); the adaptive length; the vocabulary check; the CLI flags."""

from __future__ import annotations

import json

import pytest
import torch

from llamacli.errors import UsageError
from llamacli.generation import ChatSession, DraftModel, Engine, Finished, PromptLookup, Request, Speculator, TokenEvent
from llamacli.generation.speculative import DraftLength, check_same_vocabulary
from llamacli.sampling import SamplingParams
from llamacli.weights import load_model

PROMPT = [1, 17, 43, 99, 5, 64, 23, 77, 12, 8, 17, 43, 99, 5]


def load(folder) -> Engine:
    return Engine(load_model(folder, dtype="float32", device="cpu"))


@pytest.fixture(scope="module")
def target_dir(tmp_path_factory):
    from tests.conftest import write_tiny_checkpoint

    return write_tiny_checkpoint(tmp_path_factory.mktemp("target") / "ckpt", seed=0)


@pytest.fixture(scope="module")
def target(target_dir):
    return load(target_dir)


def self_draft(engine, folder, quantize: str) -> DraftModel:
    """The --draft-quantize draft: a quantized copy of the model's own checkpoint, sharing its tokenizer and its
    KV cache."""
    return DraftModel(Engine(load_model(folder, dtype="float32", device="cpu", quantize=quantize), engine.tokenizer),
                      name=f"self-{quantize}", share_cache=True)


@pytest.fixture(scope="module")
def quantized(target, target_dir):
    """The int4 and int8 copies of the target (engines: each test wraps them in a fresh DraftModel)."""
    return {q: self_draft(target, target_dir, q).engine for q in ("int4", "int8")}


@pytest.fixture(scope="module")
def other(tmp_path_factory):
    """Same shapes and vocabulary, other random weights: a draft that is nearly always wrong."""
    from tests.conftest import write_tiny_checkpoint

    return load(write_tiny_checkpoint(tmp_path_factory.mktemp("draft") / "ckpt", seed=1))


def drafts(target, other, quantized):
    return {"lookup": PromptLookup(3), "other": DraftModel(other), "self": DraftModel(target),
            "self-shared": DraftModel(target, share_cache=True),
            **{f"self-{q}": DraftModel(e, name=f"self-{q}", share_cache=True) for q, e in quantized.items()},
            **{f"self-{q}-own-cache": DraftModel(e, name=f"self-{q}") for q, e in quantized.items()}}


def events_of(stream):
    events = list(stream)
    assert isinstance(events[-1], Finished)
    return [(e.token_id, e.text, e.logprob) for e in events if isinstance(e, TokenEvent)], events[-1]


@pytest.mark.parametrize("kind", ["lookup", "other", "self", "self-shared", "self-int4", "self-int8",
                                  "self-int4-own-cache"])
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_equals_plain(target, other, quantized, kind, k):
    req = Request(max_new_tokens=40, ignore_eos=True, logprobs=True)
    plain, pf = events_of(target.stream(PROMPT, req))
    draft = drafts(target, other, quantized)[kind]
    spec, sf = events_of(Speculator(target, draft, k, adaptive=False).stream(PROMPT, req))
    assert [t for t, _, _ in spec] == [t for t, _, _ in plain]
    # Logprobs are the model's, from a (k+1)-position forward: equal up to float32 summation order.
    assert [lp for _, _, lp in spec] == pytest.approx([lp for _, _, lp in plain], abs=1e-4)
    assert sf.reason == pf.reason == "length" and sf.token_ids == pf.token_ids
    assert sf.stats.draft == draft.name and sf.stats.verify_forwards > 0
    if kind == "self":
        assert sf.stats.accepted_tokens == sf.stats.drafted_tokens > 0
        assert sf.stats.verify_forwards < 40 // (k + 1) + 2  # one forward per k + 1 tokens
    if kind.startswith("self-"):  # the same model, quantized: most drafts are kept
        assert sf.stats.accepted_tokens >= 0.7 * sf.stats.drafted_tokens > 0


@pytest.mark.parametrize("quant", [None, "int4"])
def test_eos_inside_a_draft_ends_there(target, target_dir, quant):
    free = target.generate(PROMPT, Request(max_new_tokens=20, ignore_eos=True)).token_ids
    eos_engine = Engine(target.model)
    eos_engine.eos_ids = frozenset({free[6]})  # the draft proposes it mid-round
    expected = eos_engine.generate(PROMPT, Request(max_new_tokens=20))
    for k in (3, 5):
        draft = DraftModel(eos_engine) if quant is None else self_draft(eos_engine, target_dir, quant)
        result = Speculator(eos_engine, draft, k, adaptive=False).stream(PROMPT, Request(max_new_tokens=20))
        _, fin = events_of(result)
        assert fin.token_ids == expected.token_ids == free[:free.index(free[6]) + 1]
        assert fin.reason == "stop"


@pytest.mark.parametrize("quant", [None, "int4"])
@pytest.mark.parametrize("n_new", [1, 2, 3, 7, 11])
def test_max_new_tokens_reached_mid_draft(target, quantized, quant, n_new):
    req = Request(max_new_tokens=n_new, ignore_eos=True)
    expected = target.generate(PROMPT, req).token_ids
    for k in (4, 6):
        draft = DraftModel(target) if quant is None else DraftModel(quantized[quant], share_cache=True)
        _, fin = events_of(Speculator(target, draft, k, adaptive=False).stream(PROMPT, req))
        assert fin.token_ids == expected and len(expected) == n_new and fin.reason == "length"


def test_a_draft_sharing_the_model_cache_runs_one_token_forwards_and_keeps_every_greedy_draft(target):
    """The model itself as a cache-sharing draft: no prefill and no catch-up in the draft (one-token forwards
    after the model's positions), every greedy draft kept, the output plain greedy decoding's."""
    calls = []

    class Recorded:
        def __init__(self, model):
            self.model, self.config, self.device, self.dtype = model, model.config, model.device, model.dtype

        def __call__(self, tokens, start_pos, cache, last_only=False):
            calls.append((tokens.shape[1], start_pos))
            return self.model(tokens, start_pos, cache, last_only=last_only)

    draft_engine = Engine(Recorded(target.model), target.tokenizer)
    req = Request(max_new_tokens=24, ignore_eos=True)
    expected = target.generate(PROMPT, req).token_ids
    _, fin = events_of(Speculator(target, DraftModel(draft_engine, share_cache=True), 4, adaptive=False)
                       .stream(PROMPT, req))
    assert fin.token_ids == expected
    assert fin.stats.accepted_tokens == fin.stats.drafted_tokens > 0
    assert {t for t, _ in calls} == {1} and min(p for _, p in calls) == len(PROMPT)  # the first new token
    own = []
    draft_engine = Engine(Recorded(target.model), target.tokenizer)
    calls = own
    events_of(Speculator(target, DraftModel(draft_engine), 4, adaptive=False).stream(PROMPT, req))
    assert own[0] == (len(PROMPT) + 1, 0)  # a draft with its own cache prefills the prompt and first token


def test_context_limit(target, other, quantized):
    ctx = target.config.context_length
    req = Request(max_new_tokens=ctx - len(PROMPT), ignore_eos=True)  # fills every position of the context
    expected = target.generate(PROMPT, req).token_ids
    for draft in drafts(target, other, quantized).values():
        _, fin = events_of(Speculator(target, draft, 6, adaptive=False).stream(PROMPT, req))
        assert fin.token_ids == expected, draft.name


def test_long_run_of_rejections_equals_plain(tiny_chat_dir, tmp_path):
    from tests.conftest import write_tiny_chat_checkpoint

    target = Engine.load(tiny_chat_dir, dtype="float32", device="cpu")
    draft = load(write_tiny_chat_checkpoint(tmp_path / "draft", seed=7))
    prompt = target.raw_ids("the cat sat on the mat and the cat sat on the")
    req = Request(max_new_tokens=200, ignore_eos=True)
    expected = target.generate(prompt, req).token_ids
    _, fin = events_of(Speculator(target, DraftModel(draft), 4, adaptive=False).stream(prompt, req))
    assert fin.token_ids == expected
    assert fin.stats.drafted_tokens - fin.stats.accepted_tokens > 150  # rollbacks: mostly rejected


def test_stop_strings_and_text_through_the_same_sequence(tiny_chat_dir):
    target = Engine.load(tiny_chat_dir, dtype="float32", device="cpu")
    prompt = target.raw_ids("the cat sat on the mat and the cat sat on the")
    free = target.generate(prompt, Request(max_new_tokens=40, ignore_eos=True))
    stop = free.text[len(free.text) // 2:len(free.text) // 2 + 3]
    req = Request(max_new_tokens=40, ignore_eos=True, stop=(stop,))
    plain, pf = events_of(target.stream(prompt, req))
    for draft in (PromptLookup(2), DraftModel(target), self_draft(target, tiny_chat_dir, "int4")):
        spec, sf = events_of(Speculator(target, draft, 5, adaptive=False).stream(prompt, req))
        assert [(t, x) for t, x, _ in spec] == [(t, x) for t, x, _ in plain]
        assert (sf.text, sf.reason) == (pf.text, "stop") and stop not in sf.text


@pytest.mark.parametrize("quant", [None, "int4"])
def test_chat_session_with_a_speculator(tiny_chat_dir, quant):
    engine = Engine.load(tiny_chat_dir, dtype="float32", device="cpu")
    req = Request(max_new_tokens=12, ignore_eos=True)
    plain = ChatSession(engine, max_context=250)
    draft = DraftModel(engine) if quant is None else self_draft(engine, tiny_chat_dir, quant)
    spec = ChatSession(engine, max_context=250, stream=Speculator(engine, draft, 4).stream)
    for text in ("hello there", "and again", "once more"):
        a = [e for e in plain.turn(text, req)][-1]
        b = [e for e in spec.turn(text, req)][-1]
        assert a.token_ids == b.token_ids and b.stats.prefill_tokens == a.stats.prefill_tokens


# -- sampling -------------------------------------------------------------------------------------------------


def test_prompt_lookup_sampling_is_plain_sampling(target):
    """A draft without probabilities keeps a token only when the model's own draw agrees: the same seed gives
    the same output as plain sampling, draw for draw."""
    for seed in range(5):
        req = Request(max_new_tokens=30, sampling=SamplingParams(temperature=0.7, top_k=5), seed=seed,
                      ignore_eos=True, logprobs=True)
        plain, _ = events_of(target.stream(PROMPT, req))
        spec, fin = events_of(Speculator(target, PromptLookup(1), 4, adaptive=False).stream(PROMPT, req))
        assert [t for t, _, _ in spec] == [t for t, _, _ in plain]
        assert fin.stats.drafted_tokens > 0


def chi_square_sf(x: float, df: int) -> float:
    """P(X > x) for a chi-square with df degrees of freedom."""
    return float(torch.special.gammaincc(torch.tensor(df / 2, dtype=torch.float64),
                                         torch.tensor(x / 2, dtype=torch.float64)))


def exact_three_token_probs(engine, params) -> dict[tuple[int, ...], float]:
    """P(first three tokens) under plain sampling, computed from the model's distributions."""
    from llamacli.generation import Sequence

    def dist(ids):
        seq = Sequence(ids, Request(sampling=params), eos_ids=frozenset(), vocab_size=engine.config.vocab_size)
        return seq.distribution(engine.model(torch.tensor([ids]))[0, -1].float())

    out = {}
    p1 = dist(PROMPT)
    for a in torch.nonzero(p1).flatten().tolist():
        p2 = dist(PROMPT + [a])
        for b in torch.nonzero(p2).flatten().tolist():
            p3 = dist(PROMPT + [a, b])
            for c in torch.nonzero(p3).flatten().tolist():
                out[(a, b, c)] = float(p1[a] * p2[b] * p3[c])
    return out


class OneHotDraft:
    """A stub draft: proposes `choose(ids)` with all its probability on that token."""

    name = "stub"

    def __init__(self, choose, vocab):
        self.choose, self.vocab = choose, vocab

    def propose(self, ids, k, params):
        tokens = [self.choose(ids)] * k
        probs = torch.zeros(k, self.vocab)
        probs[torch.arange(k), torch.tensor(tokens)] = 1.0
        return tokens, probs


def sample_counts(engine, stream_for, params, n):
    counts: dict[tuple[int, ...], int] = {}
    totals = [0, 0]
    for seed in range(n):
        _, fin = events_of(stream_for()(PROMPT, Request(max_new_tokens=3, sampling=params, seed=seed,
                                                        ignore_eos=True)))
        key = tuple(fin.token_ids)
        counts[key] = counts.get(key, 0) + 1
        totals[0] += fin.stats.drafted_tokens
        totals[1] += fin.stats.accepted_tokens
    return counts, totals


def chi_square_p(counts, probs, n) -> float:
    """Pool the cells expected below 5 into one; the p-value of the counts under probs (0 when a sequence plain
    sampling can never produce was drawn)."""
    if not set(counts) <= set(probs):
        return 0.0
    stat, df, small_e, small_o = 0.0, -1, 0.0, 0
    for key, p in probs.items():
        e, o = p * n, counts.get(key, 0)
        if e < 5:
            small_e, small_o = small_e + e, small_o + o
            continue
        stat, df = stat + (o - e) ** 2 / e, df + 1
    if small_e > 0:
        stat, df = stat + (small_o - small_e) ** 2 / small_e, df + 1
    return chi_square_sf(stat, df)


N_SAMPLES = 600
PARAMS = SamplingParams(temperature=1.0, top_k=3)


@pytest.fixture(scope="module")
def exact(target):
    return exact_three_token_probs(target, PARAMS)


class MixtureDraft:
    """A draft with probabilities, often rejected, whose rejections need the right residual: q puts 3/4 on the
    model's second most likely token (inside p's top-k support) and 1/4 on another model's distribution.

    (A draft whose q is half p and half a distribution on other tokens, as this test once used, makes the residual
    max(0, p - q) = p / 2 on p's support: then drawing from p after a rejection is right too, and no statistic can
    tell a wrong residual from the right one. `test_a_wrong_residual_is_rejected` keeps this draft honest.)"""

    name = "mixture"

    def __init__(self, target, other, seed):
        self.target, self.other = target, other
        self.generator = torch.Generator().manual_seed(seed)

    def propose(self, ids, k, params):
        from llamacli.sampling import filter_logits

        tokens, probs = [], []
        for _ in range(k):
            x = torch.tensor([ids + tokens])
            second = int(torch.topk(self.target.model(x)[0, -1], 2).indices[1])
            q = torch.softmax(filter_logits(self.other.model(x)[0, -1].float(), params), -1) / 4
            q[second] += 3 / 4
            tokens.append(int(torch.multinomial(q, 1, generator=self.generator)))
            probs.append(q)
        return tokens, torch.stack(probs)


def draft_streams(target, other, quantized, kind):
    """A fresh speculative stream per call for a sampling test: the mixture (reseeded) or the int4 self-draft."""
    seeds = iter(range(10**6))
    if kind == "mixture":
        return lambda: Speculator(target, MixtureDraft(target, other, next(seeds)), 2, adaptive=False).stream
    return lambda: Speculator(target, DraftModel(quantized["int4"]), 2, adaptive=False).stream


@pytest.mark.parametrize("kind", ["mixture", "self-int4"])
def test_draft_model_sampling_keeps_the_distribution(target, other, quantized, exact, kind):
    """Rejection sampling min(1, p/q) with the residual max(0, p - q): the first three tokens are distributed as
    under plain sampling (fixed seeds: deterministic), with a draft whose guesses are often rejected, and with
    the int4 copy of the model (q close to p: nearly every draft kept)."""
    counts, (drafted, accepted) = sample_counts(target, draft_streams(target, other, quantized, kind), PARAMS,
                                                N_SAMPLES)
    assert 0 < accepted < drafted if kind == "mixture" else accepted > 0.9 * drafted  # both branches ran
    assert chi_square_p(counts, exact, N_SAMPLES) > 1e-3


WRONG_RESIDUALS = {"p": (lambda p, q: p, N_SAMPLES),  # plain sampling's distribution after a rejection
                   "q": (lambda p, q: q, N_SAMPLES // 2)}  # the draft's own (far off: fewer samples show it)


@pytest.mark.parametrize("wrong", sorted(WRONG_RESIDUALS))
def test_a_wrong_residual_is_rejected(target, other, quantized, exact, wrong, monkeypatch):
    """The negative control: with a wrong residual in `Sequence.decide`, the same draft, seeds and statistic as
    above give a p-value far below the test's threshold, so that test cannot pass vacuously. (The int4 self-draft
    is kept nearly always, so its runs cannot tell residuals apart: the mixture carries this check.)"""
    from llamacli.generation.sequence import Sequence

    residual, n = WRONG_RESIDUALS[wrong]
    monkeypatch.setattr(Sequence, "residual", staticmethod(residual))
    counts, _ = sample_counts(target, draft_streams(target, other, quantized, "mixture"), PARAMS, n)
    assert chi_square_p(counts, exact, n) < 1e-6


def test_plain_sampling_passes_the_same_test(target, exact):
    counts, _ = sample_counts(target, lambda: target.stream, PARAMS, N_SAMPLES)
    assert chi_square_p(counts, exact, N_SAMPLES) > 1e-3


def test_never_accepted_stub_keeps_the_distribution(target, exact):
    """A draft whose token the model never samples (outside its top-k): every draft rejected, and the residual
    alone must give plain sampling's distribution."""
    def unlikely(ids):
        logits = target.model(torch.tensor([ids]))[0, -1]
        return int(torch.argmin(logits))

    counts, (drafted, accepted) = sample_counts(
        target, lambda: Speculator(target, OneHotDraft(unlikely, target.config.vocab_size), 2,
                                   adaptive=False).stream, PARAMS, N_SAMPLES // 2)
    assert drafted > 0 and accepted == 0
    assert chi_square_p(counts, exact, N_SAMPLES // 2) > 1e-3


def test_always_accepted_stub(target):
    """The model itself as the draft, sampling with the same parameters: p == q, so every draft is kept."""
    params = SamplingParams(temperature=0.9, top_p=0.9)
    req = Request(max_new_tokens=30, sampling=params, seed=11, ignore_eos=True)
    _, fin = events_of(Speculator(target, DraftModel(target), 3, adaptive=False).stream(PROMPT, req))
    assert fin.stats.drafted_tokens > 0
    assert fin.stats.accepted_tokens == fin.stats.drafted_tokens


# -- the adaptive length, the vocabulary check ------------------------------------------------------------------


PLAIN_S = 0.040  # a plain step of the synthetic runs below: SmolLM2-135M fp32's ~41 ms


def measured_length(k_max: int = 8, drafted: int | None = None, kept: int | None = None) -> DraftLength:
    """A DraftLength past its plain steps and its untimed catch-up round (`drafted` tokens, `kept` of them kept;
    k_max and all by default)."""
    length = DraftLength(k_max)
    assert length.want(0) == 0  # plain steps first, to know what a step costs
    length.plain(PLAIN_S)
    length.plain(PLAIN_S)
    assert length.want(2) == k_max
    drafted = k_max if drafted is None else drafted
    kept = drafted if kept is None else kept
    length.round(drafted, kept, 5.0, 9.0, 2 + kept + 1)  # carries the draft's prefill of the prompt: not timed
    assert length.draft_s is None and length.extra_s is None and length.rounds == 0
    return length


def play(length: DraftLength, generated: int, kept: int, drafted: int, draft_s: float, extra_s: float) -> int:
    """One round of `drafted` tokens that kept `kept`: the draft costs draft_s a token, the verify a plain step
    plus extra_s a drafted position. Returns the generated count after it."""
    generated += kept + 1
    length.round(drafted, kept, drafted * draft_s, PLAIN_S + drafted * extra_s, generated)
    return generated


def test_draft_length_high_acceptance_and_a_cheap_draft_draft_long():
    length = measured_length(8)
    g = play(length, 11, 8, 8, 0.010, 0.002)  # the int4 self-draft's shape: all kept, a quarter of a step a token
    assert length.want(g) == 8
    for _ in range(6):
        g = play(length, g, 8, 8, 0.010, 0.002)
    assert length.want(g) == 8 and length.acceptance() == 1.0
    assert length.speedup(8) == pytest.approx(9 * PLAIN_S / (PLAIN_S + 8 * 0.012))


def test_draft_length_picks_the_k_with_the_most_tokens_per_second():
    length = measured_length(8, 10, 9)
    g = 20
    for _ in range(10):  # 9 of 10 kept and one rejected: a = 0.9 per drafted position
        g = play(length, g, 9, 10, 0.010, 0.005)
    assert length.acceptance() == pytest.approx(0.9)
    # E(k) = (1 - 0.9^(k+1)) / 0.1 tokens in 40 + 15k ms: k = 3, 4, 5 give 1.618, 1.638, 1.630x plain
    assert length.want(g) == 4
    assert length.speedup(4) == pytest.approx(4.0951 * 0.040 / 0.100)


def test_draft_length_low_acceptance_drafts_short_then_turns_off():
    length = measured_length(8, 5, 1)
    g = 20
    for _ in range(3):  # kept 1 of 5 and rejected the next: a = 0.5, a nearly free draft (prompt lookup)
        g = play(length, g, 1, 5, 0.0001, 0.005)
    assert length.acceptance() == pytest.approx(0.5) and length.want(g) == 2  # 1.39x at k=2, 1.33x at k=1, 1.36x at k=3
    ks = []
    for _ in range(20):  # nothing kept any more: a falls, k falls to 1, then no k pays
        g = play(length, g, 0, length.want(g), 0.0001, 0.005)
        if length.want(g) == 0:
            break
        ks.append(length.want(g))
    assert ks == sorted(ks, reverse=True) and ks[0] == 2 and ks[-1] == 1 and len(ks) < 19
    assert length.want(g + 15) == 0 and length.want(g + 16) == 8  # off for 16 tokens, then measured afresh
    assert length.acceptance() is None and length.catch_up


def test_draft_length_turns_off_an_expensive_draft():
    length = measured_length(8)
    g = 20
    for i in range(DraftLength.MIN_ROUNDS):  # all kept, but each draft token costs a plain step
        assert length.want(g) > 0, i
        g = play(length, g, length.want(g), length.want(g), PLAIN_S, 0.002)
    assert length.want(g) == 0 and length.want(g + 16) == 8
    assert all(length.speedup(k) < 1 for k in range(1, 9))


def test_draft_length_a_stalled_plain_step_is_bounded_by_the_verify():
    length = DraftLength(8)
    length.plain(1.0)  # the machine stalled in the steps that measure a plain step
    length.plain(1.0)
    length.round(8, 8, 5.0, 9.0, 11)  # the untimed catch-up round
    g = 11
    for _ in range(DraftLength.MIN_ROUNDS):  # all kept, each draft token costs two plain steps: never pays
        g = play(length, g, length.want(g), length.want(g), 2 * PLAIN_S, 0.002)
    assert length.plain_s <= PLAIN_S + 8 * 0.002 and length.want(g) == 0


def test_draft_length_recovers_after_the_backoff_and_its_catch_up_round_is_untimed():
    length = measured_length(4)
    g = 20
    for _ in range(20):  # nothing kept: off
        g = play(length, g, 0, length.want(g), 0.0001, 0.003)
        if length.want(g) == 0:
            break
    assert length.want(g) == 0
    draft_s, extra_s = length.draft_s, length.extra_s
    for _ in range(16):  # the plain steps of the off period
        length.plain(PLAIN_S)
        g += 1
    assert length.want(g) == 4
    g = play(length, g, 4, 4, 1.0, 2.0)  # the draft catches up on the plain steps' tokens: not timed
    assert (length.draft_s, length.extra_s, length.rounds) == (draft_s, extra_s, 0)
    for _ in range(12):  # the text copies its input now: everything kept, and speculation stays on
        assert length.want(g) == 4
        g = play(length, g, 4, 4, 0.0001, 0.003)
    assert length.acceptance() == 1.0 and length.backoff == 32  # the next off period would be longer


def test_draft_length_fixed():
    length = DraftLength(6, adaptive=False)
    assert length.want(0) == 6
    for g in range(10, 60, 10):  # rounds that never pay change nothing
        length.round(6, 0, 1.0, 1.0, g)
        assert length.want(g) == 6
    with pytest.raises(UsageError, match="--draft-tokens"):
        DraftLength(0)


def test_speculator_times_the_draft_and_the_verify_apart(target, monkeypatch):
    import types

    from llamacli.generation import speculative

    clock = [0.0]  # a fake clock: 1 ms a reading, and a draft that takes a second (a real one is noisy under load)

    def perf_counter():
        clock[0] += 0.001
        return clock[0]

    class SlowGuess:
        name = "slow-guess"

        def propose(self, ids, k, params):
            clock[0] += 1.0
            return [ids[-1]] * k, None

    monkeypatch.setattr(speculative, "time", types.SimpleNamespace(perf_counter=perf_counter))
    rounds = []
    real = DraftLength.round
    monkeypatch.setattr(DraftLength, "round", lambda self, *args: (rounds.append(args), real(self, *args)))
    req = Request(max_new_tokens=12, ignore_eos=True)
    _, fin = events_of(Speculator(target, SlowGuess(), 3).stream(PROMPT, req))
    assert fin.token_ids == target.generate(PROMPT, req).token_ids and rounds
    for drafted, accepted, draft_seconds, verify_seconds, _ in rounds:
        assert draft_seconds == pytest.approx(1.0, abs=0.005) and 0 < verify_seconds < 0.005


def test_adaptive_run_still_equals_plain(target, other):
    req = Request(max_new_tokens=50, ignore_eos=True)
    expected = target.generate(PROMPT, req).token_ids
    _, fin = events_of(Speculator(target, DraftModel(other), 4).stream(PROMPT, req))
    assert fin.token_ids == expected


def test_vocabulary_mismatch_is_refused(target, tiny_checkpoint):
    small = load(tiny_checkpoint(vocab_size=100))
    with pytest.raises(UsageError, match="its vocabulary has 100 tokens, the model's 128"):
        check_same_vocabulary(target, small, "--draft-model small")
    other_eos = load(tiny_checkpoint(eos_token_id=3))
    with pytest.raises(UsageError, match="special ids differ"):
        check_same_vocabulary(target, other_eos, "--draft-model x")


# -- the CLI ----------------------------------------------------------------------------------------------------


def run_cli(*args):
    from typer.testing import CliRunner

    from llamacli.cli import app

    return CliRunner().invoke(app, list(args))


def run_cli_input(stdin: str, *args):
    from typer.testing import CliRunner

    from llamacli.cli import app

    return CliRunner().invoke(app, list(args), input=stdin)


def test_cli_generate_with_drafts(tiny_chat_dir, tmp_path):
    from tests.conftest import write_tiny_chat_checkpoint

    base = ["generate", "-m", str(tiny_chat_dir), "--raw", "-p", "the cat sat on the mat and the cat", "-n", "24",
            "--ignore-eos", "--json"]
    plain = json.loads(run_cli(*base).stdout)
    draft_dir = write_tiny_chat_checkpoint(tmp_path / "d", seed=3)
    for extra, name in ((["--prompt-lookup", "2"], "prompt-lookup"),
                        (["--draft-model", str(draft_dir), "--draft-tokens", "3"], "draft-model"),
                        (["--draft-model", str(tiny_chat_dir)], "draft-model"),
                        (["--draft-quantize", "int4"], "self-int4"),
                        (["--draft-quantize", "int4", "--draft-group-size", "64", "--draft-tokens", "3"], "self-int4"),
                        (["--draft-quantize", "int8"], "self-int8")):
        result = run_cli(*base, *extra)
        assert result.exit_code == 0, result.output
        out = json.loads(result.stdout)
        assert out["token_ids"] == plain["token_ids"]
        assert out["stats"]["drafted_tokens"] >= out["stats"]["accepted_tokens"] >= 0
        assert out["stats"]["draft"] == name
        assert "acceptance_rate" in out["stats"] and "draft" not in plain["stats"]
        if name.startswith("self-"):
            assert out["stats"]["accepted_tokens"] > 0


def test_cli_chat_with_an_int4_self_draft(tiny_chat_dir):
    base = ["chat", "-m", str(tiny_chat_dir), "-n", "10", "--json"]
    turns = "hello there\nand again\n"
    plain = run_cli_input(turns, *base)
    spec = run_cli_input(turns, *base, "--draft-quantize", "int4", "--stats")
    assert plain.exit_code == 0 and spec.exit_code == 0, spec.output
    ids = [[json.loads(line)["token_ids"] for line in r.stdout.splitlines()] for r in (plain, spec)]
    assert len(ids[0]) == 2 and ids[0] == ids[1]
    assert spec.stderr.count("self-int4: drafted") == 2


def test_cli_refuses_bad_draft_options(tiny_chat_dir, tmp_path):
    from tests.conftest import write_tiny_chat_checkpoint
    from llamacli.config import load_config

    padded = write_tiny_chat_checkpoint(tmp_path / "padded", vocab_size=load_config(tiny_chat_dir).vocab_size + 16)
    base = ["generate", "-m", str(tiny_chat_dir), "--raw", "-p", "hi", "-n", "4"]
    result = run_cli(*base, "--draft-model", str(padded))
    assert result.exit_code == 2 and "error: --draft-model" in result.output and "vocabulary" in result.output
    result = run_cli(*base, "--draft-tokens", "3")
    assert result.exit_code == 2 and "--draft-tokens needs a draft" in result.output
    result = run_cli(*base, "--prompt-lookup", "2", "--draft-model", str(tiny_chat_dir))
    assert result.exit_code == 2 and "not both" in result.output


@pytest.mark.parametrize("extra, message", [
    (["--draft-quantize", "int4", "--draft-model", "x"], "error: pass one draft: --draft-model or --draft-quantize, "
                                                         "not both"),
    (["--draft-quantize", "int4", "--prompt-lookup", "2"], "error: pass one draft: --prompt-lookup or "
                                                           "--draft-quantize, not both"),
    (["--draft-quantize", "int8", "--draft-group-size", "64"], "error: --draft-group-size applies to "
                                                               "--draft-quantize int4 only"),
    (["--draft-group-size", "64"], "error: --draft-group-size applies to --draft-quantize int4 only"),
    (["--draft-quantize", "int4", "--draft-group-size", "48"], "error: --draft-group-size 48 is not supported"),
    (["--draft-quantize", "int2"], "'int2' is not one of"),
])
def test_cli_refuses_bad_self_draft_options(tiny_chat_dir, extra, message):
    result = run_cli("generate", "-m", str(tiny_chat_dir), "--raw", "-p", "hi", "-n", "4", *extra)
    assert result.exit_code == 2 and message in result.output, result.output
    if message.startswith("error:"):
        assert len(result.output.strip().splitlines()) == 1


def test_cli_self_draft_of_a_quantized_checkpoint_is_refused(tiny_chat_dir, tmp_path):
    from llamacli import quantization
    from llamacli.quant.checkpoint import write_quantized

    q = write_quantized(tiny_chat_dir, tmp_path / "q8", quantization.Quantization(8))
    result = run_cli("generate", "-m", str(q), "--raw", "-p", "hi", "-n", "4", "--draft-quantize", "int4")
    assert result.exit_code == 2, result.output
    assert "--draft-quantize int4:" in result.output and "is already quantized (int8 per row)" in result.output
    batch = tmp_path / "in.txt"
    batch.write_text("hi\n")
    result = run_cli("generate", "-m", str(tiny_chat_dir), "--prompts-file", str(batch), "--draft-quantize", "int4")
    assert result.exit_code == 2 and "--draft-quantize applies to a single prompt" in result.output


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["lookup", "layers"])
def test_smollm2_greedy_equals_plain(smollm2_dir, tmp_path, kind):
    from benchmarks.bench_speculative import truncated_checkpoint

    engine = Engine.load(smollm2_dir, dtype="float32", device="cpu")
    text = ("Rewrite this sentence in plain words: The committee, having deliberated at considerable length, "
            "resolved to postpone the decision until further evidence could be gathered.")
    ids = engine.chat_ids([{"role": "user", "content": text}])
    req = Request(max_new_tokens=48)
    expected = engine.generate(ids, req)
    draft = PromptLookup(3) if kind == "lookup" else DraftModel(Engine.load(truncated_checkpoint(smollm2_dir,
                                                                                               tmp_path, 8)))
    _, fin = events_of(Speculator(engine, draft, 4, adaptive=False).stream(ids, req))
    assert fin.token_ids == expected.token_ids and fin.reason == expected.reason


def test_the_draft_length_default_reaches_the_speculator_and_the_layout(tiny_chat_dir, monkeypatch):
    """--draft-tokens unset: every draft kind drafts up to the measured default (8); given, it wins. The
    Speculator gets that number and the model is laid out for its k + 1 rows."""
    from llamacli.cli.speculative import DraftOptions
    from llamacli.generation import speculative
    from llamacli.request import DEFAULT_DRAFT_TOKENS

    assert DEFAULT_DRAFT_TOKENS == 8
    cases = [(DraftOptions(prompt_lookup=2), 8), (DraftOptions(draft_model="M"), 8),
             (DraftOptions(prompt_lookup=2, draft_tokens=3), 3), (DraftOptions(draft_model="M", draft_tokens=6), 6)]
    for options, k in cases:
        assert options.tokens == k and options.decode_rows == k + 1
    assert DraftOptions().decode_rows == 1
    seen = []
    original = speculative.Speculator.__init__
    monkeypatch.setattr(speculative.Speculator, "__init__",
                        lambda self, engine, draft, k, *a, **kw: seen.append(k) or original(self, engine, draft, k, *a, **kw))
    for extra in (["--prompt-lookup", "2"], ["--draft-quantize", "int4"], ["--draft-quantize", "int4", "--draft-tokens", "3"]):
        result = run_cli("generate", "-m", str(tiny_chat_dir), "--raw", "-p", "the cat", "-n", "3", *extra)
        assert result.exit_code == 0, result.output
    assert seen == [8, 8, 3]

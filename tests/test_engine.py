"""The engine: greedy output equals transformers, stop conditions, seeds, stop strings, chat cache reuse."""

from __future__ import annotations

import pytest
import torch

from llamacli.generation import Engine, Finished, Request, StopMatcher, TokenEvent
from llamacli.errors import ContextOverflowError
from llamacli.sampling import SamplingParams
from llamacli.weights import load_model

PROMPT = [1, 17, 43, 99, 5, 64, 23, 77, 12, 8]


@pytest.fixture(scope="module")
def engine(tiny_dir):
    return Engine(load_model(tiny_dir, dtype="float32", device="cpu"))


@pytest.mark.parity
def test_greedy_generate_equals_transformers(engine, tiny_dir):
    import transformers

    ref = transformers.LlamaForCausalLM.from_pretrained(tiny_dir, dtype=torch.float32).eval()
    expected = ref.generate(torch.tensor([PROMPT]), attention_mask=torch.ones(1, len(PROMPT), dtype=torch.long),
                            max_new_tokens=20, do_sample=False, pad_token_id=0,
                            eos_token_id=list(engine.eos_ids))[0, len(PROMPT):].tolist()
    result = engine.generate(PROMPT, Request(max_new_tokens=20))
    assert result.token_ids == expected
    assert result.reason == ("stop" if expected[-1] in engine.eos_ids else "length")


def test_stream_yields_one_event_per_token_then_finished(engine):
    events = list(engine.stream(PROMPT, Request(max_new_tokens=5, ignore_eos=True)))
    tokens = [e for e in events if isinstance(e, TokenEvent)]
    assert isinstance(events[-1], Finished)
    assert [e.token_id for e in tokens] == events[-1].token_ids
    assert len(tokens) == 5 and events[-1].reason == "length"
    stats = events[-1].stats
    assert stats.prompt_tokens == len(PROMPT) and stats.generated_tokens == 5


def test_stops_on_every_eos_id(engine):
    free = engine.generate(PROMPT, Request(max_new_tokens=6, ignore_eos=True)).token_ids
    # Pretend the third greedy token is an eos id: generation must end there with reason "stop".
    engine2 = Engine(engine.model)
    engine2.eos_ids = frozenset({free[2], 12345})
    result = engine2.generate(PROMPT, Request(max_new_tokens=6))
    assert result.token_ids == free[:3]
    assert result.reason == "stop"


def test_seeded_sampling_is_reproducible(engine):
    req = Request(max_new_tokens=12, sampling=SamplingParams(temperature=1.5), seed=3, ignore_eos=True)
    a = engine.generate(PROMPT, req).token_ids
    b = engine.generate(PROMPT, req).token_ids
    c = engine.generate(PROMPT, Request(max_new_tokens=12, sampling=SamplingParams(temperature=1.5), seed=4,
                                        ignore_eos=True)).token_ids
    assert a == b and a != c


def test_logprobs_are_log_softmax_of_model_logits(engine):
    result = engine.generate(PROMPT, Request(max_new_tokens=3, logprobs=True, ignore_eos=True))
    ids = PROMPT + result.token_ids
    full = torch.log_softmax(engine.model(torch.tensor([ids]))[0].float(), dim=-1)
    expected = [full[len(PROMPT) - 1 + i, t].item() for i, t in enumerate(result.token_ids)]
    assert result.logprobs == pytest.approx(expected, abs=1e-5)


def test_prompt_plus_new_tokens_beyond_context_is_refused_with_numbers(engine):
    with pytest.raises(ContextOverflowError, match=r"prompt \(10 tokens\) \+ max-new-tokens \(60\) = 70 exceeds "
                                                    r"the model's context of 64 tokens"):
        next(engine.stream(PROMPT, Request(max_new_tokens=60)))


@pytest.mark.parametrize("pieces, stops, expected_text, stopped", [
    (["Hel", "lo wor", "ld"], ("wor",), "Hello ", True),
    (["a", "b", "c"], ("bd",), "abc", False),
    (["x<", "/s", ">y"], ("</s>",), "x", True),
    (["one", " two"], ("three", "two"), "one ", True),
])
def test_stop_matcher_spans_pieces_and_hides_the_stop(pieces, stops, expected_text, stopped):
    m = StopMatcher(stops)
    out, hit = "", False
    for piece in pieces:
        text, hit = m.feed(piece)
        out += text
        if hit:
            break
    if not hit:
        out += m.flush()
    assert (out, hit) == (expected_text, stopped)


@pytest.fixture(scope="module")
def smol(smollm2_dir):
    return Engine.load(smollm2_dir, dtype="float32", device="cpu")


@pytest.mark.slow
def test_streamed_text_equals_decode_of_ids(smol):
    ids = smol.chat_ids([{"role": "user", "content": "List three fruits, with emoji."}])
    events = list(smol.stream(ids, Request(max_new_tokens=40)))
    finished = events[-1]
    streamed = "".join(e.text for e in events[:-1])
    assert streamed == finished.text
    assert finished.text == smol.tokenizer.decode(finished.token_ids, skip_special_tokens=True)


@pytest.mark.slow
def test_chat_session_reuses_cache_and_matches_a_fresh_run(smol):
    from llamacli.generation import ChatSession

    req = Request(max_new_tokens=24)
    chat = ChatSession(smol, system="You are brief.", max_context=1024)
    first = [e for e in chat.turn("Name a color.", req)][-1]
    second = [e for e in chat.turn("Name another one.", req)][-1]
    # A fresh run over the whole conversation gives the same reply ...
    conversation = [{"role": "system", "content": "You are brief."},
                    {"role": "user", "content": "Name a color."},
                    {"role": "assistant", "content": first.text},
                    {"role": "user", "content": "Name another one."}]
    fresh_ids = smol.chat_ids(conversation)
    fresh = smol.generate(fresh_ids, req)
    assert second.token_ids == fresh.token_ids
    # ... while turn 2 prefilled only what was not already in the cache.
    assert second.stats.prompt_tokens == len(fresh_ids)
    assert 0 < second.stats.prefill_tokens < len(fresh_ids) - first.stats.prompt_tokens + 8
    assert first.stats.prefill_tokens == first.stats.prompt_tokens


@pytest.mark.slow
def test_chat_session_overflow_names_the_numbers(smol):
    from llamacli.generation import ChatSession

    chat = ChatSession(smol, max_context=40)
    with pytest.raises(ContextOverflowError, match=r"exceeds the conversation's context of 40 tokens"):
        list(chat.turn("Tell me a long story about a dragon.", Request(max_new_tokens=32)))


# -- a model vocabulary padded past the tokenizer's -----------------------------------------------------------

PADDED_PROMPTS = ["hello there", "Name a fruit.", "What is 2+2?"]


@pytest.fixture(scope="module")
def padded(padded_vocab_dir):
    import transformers

    ref = transformers.LlamaForCausalLM.from_pretrained(padded_vocab_dir, dtype=torch.float32).eval()
    hf_tok = transformers.PreTrainedTokenizerFast(tokenizer_file=str(padded_vocab_dir / "tokenizer.json"))
    return Engine.load(padded_vocab_dir, dtype="float32", device="cpu"), ref, hf_tok


@pytest.mark.parity
def test_padded_vocab_generates_transformers_ids_and_text(padded):
    """Ids past the tokenizer's vocabulary are generated as transformers generates them and decode as nothing,
    as transformers' tokenizer decodes them; streamed text equals the final text."""
    engine, ref, hf_tok = padded
    n_tok = engine.tokenizer.vocab_size
    assert engine.config.vocab_size > n_tok
    emitted_padding = 0
    for text in PADDED_PROMPTS:
        ids = engine.chat_ids([{"role": "user", "content": text}])
        expected = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                                max_new_tokens=30, do_sample=False, pad_token_id=0,
                                eos_token_id=list(engine.eos_ids))[0, len(ids):].tolist()
        events = list(engine.stream(ids, Request(max_new_tokens=30)))
        result = events[-1]
        assert result.token_ids == expected
        assert result.text == "".join(e.text for e in events[:-1])
        assert engine.tokenizer.decode(result.token_ids, skip_special_tokens=True) == hf_tok.decode(
            result.token_ids, skip_special_tokens=True)
        emitted_padding += sum(t >= n_tok for t in result.token_ids)
    assert emitted_padding > 0  # the fixture must exercise the padded rows


def test_padded_vocab_batches_and_chats(padded):
    from llamacli.batch import generate_many
    from llamacli.generation import ChatSession

    engine, _, _ = padded
    results = generate_many(engine, PADDED_PROMPTS, batch_size=2, max_new_tokens=20)
    for text, result in zip(PADDED_PROMPTS, results):
        single = engine.generate(engine.chat_ids([{"role": "user", "content": text}]), Request(max_new_tokens=20))
        assert "error" not in result and result["token_ids"] == single.token_ids and result["text"] == single.text
    chat = ChatSession(engine)
    for text in PADDED_PROMPTS[:2]:
        assert isinstance(list(chat.turn(text, Request(max_new_tokens=20)))[-1], Finished)
    assert len(chat.conversation.turns) == 2


def test_chat_cache_grows_with_the_conversation_not_the_context(tmp_path):
    """The session's cache starts at what a turn needs and grows (keeping what is cached), instead of the model's
    whole context up front; the replies equal fresh runs of the same ids (issue 15)."""
    from tests.conftest import write_tiny_chat_checkpoint
    from llamacli.generation import ChatSession

    folder = write_tiny_chat_checkpoint(tmp_path / "long", max_position_embeddings=4096)
    engine = Engine.load(folder, dtype="float32", device="cpu")
    chat = ChatSession(engine)
    request = Request(max_new_tokens=40, ignore_eos=True)
    sizes = []
    for text in ["hi", "word " * 150, "and again " * 40, "ok"]:
        ids = chat.prompt_ids(text)
        reply = list(chat.turn(text, request))[-1]
        assert reply.token_ids == engine.generate(ids, request).token_ids
        assert reply.stats.prefill_tokens < len(ids) or len(sizes) == 0  # later turns reuse the cache
        sizes.append(chat.cache.max_seq_len)
    assert sizes[0] == 256 and sizes == sorted(sizes) and sizes[-1] < 4096
    capped = ChatSession(engine, max_context=200)  # --max-context caps it
    list(capped.turn("hi", request))
    assert capped.cache.max_seq_len == 200

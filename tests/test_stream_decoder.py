"""StreamDecoder contract, for both backends: the joined pieces equal decode(ids) at every emission and at the
end, no piece ends inside a character, and each step decodes a bounded window."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llamacli.tokenizer import load_tokenizer
from tests.tokenizer_assets import build_tiny_bpe, build_tiny_sp, mistral_dir, smollm2_tokenizer_dir

PROPERTY = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module", params=["tiny-bpe", "tiny-sp", "smollm2", "mistral"])
def tok(request, tmp_path_factory):
    name = request.param
    if name == "tiny-bpe":
        return load_tokenizer(build_tiny_bpe(tmp_path_factory.mktemp(name)))
    if name == "tiny-sp":
        return load_tokenizer(build_tiny_sp(tmp_path_factory.mktemp(name)))
    if name == "smollm2":
        return load_tokenizer(smollm2_tokenizer_dir())
    return load_tokenizer(mistral_dir(tmp_path_factory.mktemp(name)))


def check_stream(tok, ids, skip_special_tokens=True):
    """Feed ids one by one and check the contract at every step; return the pieces."""
    dec = tok.stream_decoder(skip_special_tokens=skip_special_tokens)
    pieces = []
    for k, i in enumerate(ids):
        piece = dec.add(i)
        if piece:
            pieces.append(piece)
            expected = tok.decode(ids[: k + 1], skip_special_tokens=skip_special_tokens)
            assert dec.text == expected, (ids[: k + 1], pieces)
            # a piece never ends in a replacement character that a later byte would turn into a character
            assert not piece.endswith("\ufffd") or expected.endswith("\ufffd")
    tail = dec.flush()
    if tail:
        pieces.append(tail)
    assert "".join(pieces) == dec.text == tok.decode(ids, skip_special_tokens=skip_special_tokens)
    return pieces


@PROPERTY
@given(data=st.data())
def test_random_id_sequences(tok, data):
    ids = data.draw(st.lists(st.integers(0, tok.vocab_size - 1), max_size=40))
    skip = data.draw(st.booleans())
    check_stream(tok, ids, skip_special_tokens=skip)


@PROPERTY
@given(text=st.text(max_size=60))
def test_random_unicode_text(tok, text):
    ids = tok.encode(text)
    pieces = check_stream(tok, ids)
    if "\ufffd" not in tok.decode(ids, skip_special_tokens=True):
        # when the whole text decodes cleanly, no piece ever carries a replacement character
        assert all("\ufffd" not in p for p in pieces)


# bytes of characters that tokenizers split across several tokens, followed by more text
SPLIT_CHARS = "😀 中文 👨‍👩‍👧 e\u0301 \U0001d54f done"


def test_multibyte_characters_come_out_whole(tok):
    ids = tok.encode(SPLIT_CHARS, add_special_tokens=False)
    pieces = check_stream(tok, ids)
    assert "".join(pieces) == tok.decode(ids)
    assert all("\ufffd" not in p for p in pieces)


def test_sentencepiece_leading_space_and_special_tokens(tmp_path):
    tok = load_tokenizer(mistral_dir(tmp_path))
    ids = tok.encode("Hello world, how are you?")  # starts with BOS
    pieces = check_stream(tok, ids)
    assert pieces[0] == "Hello" and pieces[1] == " world"  # the first word loses only the dummy-prefix space
    # an EOS in the middle is skipped, and the space of the next word is kept
    ids = tok.encode("Hello") + [tok.eos_id] + tok.encode("again", add_special_tokens=False)
    assert "".join(check_stream(tok, ids)) == "Hello again"
    assert "".join(check_stream(tok, ids, skip_special_tokens=False)) == "<s> Hello</s> again"


def test_byte_level_spaces(tmp_path):
    tok = load_tokenizer(smollm2_tokenizer_dir())
    ids = tok.encode("  two  spaces\n\tand tabs")
    assert "".join(check_stream(tok, ids)) == "  two  spaces\n\tand tabs"


def test_each_step_decodes_a_bounded_window(tok):
    """Cost per token does not grow with the text: no decode call sees more than a few ids."""
    text = "The quick brown fox jumps over the lazy dog. 中文 😀 " * 40
    ids = tok.encode(text, add_special_tokens=False)
    assert len(ids) > 400
    seen = []
    original = type(tok).decode

    class Counting(type(tok)):
        def decode(self, ids, skip_special_tokens=False):
            ids = list(ids)
            seen.append(len(ids))
            return original(self, ids, skip_special_tokens)

    counting = object.__new__(Counting)
    counting.__dict__.update(tok.__dict__)
    dec = counting.stream_decoder()
    for i in ids:
        dec.add(i)
    dec.flush()
    assert dec.text == tok.decode(ids)
    assert max(seen) <= 2 * dec.max_pending

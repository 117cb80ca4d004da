"""Tokenizer: ids equal the reference backends (tokenizers, sentencepiece, transformers), BOS/EOS policy,
special and added tokens, and the `llamacli tokenize` command."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sentencepiece as spm
from typer.testing import CliRunner

from llamacli.cli import app
from llamacli.errors import InputError, TokenizerError
from llamacli.tokenizer import load_tokenizer
from tests.tokenizer_assets import (build_tiny_bpe, build_tiny_sp, mistral_dir, smollm2_tokenizer_dir,
                                    write_json)

TRICKY = [
    "",
    " ",
    "Hello world",
    " leading space",
    "   three leading spaces",
    "trailing spaces   ",
    "repeated    inner     spaces",
    "tabs\tand\t\ttabs",
    "new\nlines\n\n\nand\r\nCRLF",
    " \t\n mixed whitespace \n\t ",
    "digits 0 12 345 6789 3.14159 1e10 2024-06-01",
    "中文字符测试，你好世界",
    "日本語のテキストです。한국어",
    "emoji 😀🎉 👍🏽 family 👨‍👩‍👧 flag 🇫🇷",
    "combining e\u0301 n\u0303 a\u030a\u0323 Z\u0351\u0352\u0353",
    "accents café naïve Ünïcödé straße ﬁ ligature",
    "rare chars \u2028 \u00a0 \u200b zero-width \U0001d54f \u0000 nul",
    "code: def f(x):\n    return x ** 2  # comment",
]
SPECIAL_TEXTS = {
    "smollm2": ["<|im_start|>user\nHello<|im_end|>\n<|im_start|>assistant\n", "a<|im_end|>b <|endoftext|> c"],
    "sp": ["<s>[INST] Hi there [/INST]", "Hi</s>there", "x<unk>y", "<s><s>two</s>"],
    "llama3": ["<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>", "x<|eot_id|> y"],
}


@pytest.fixture(scope="session")
def smollm2_dir():
    return smollm2_tokenizer_dir()


@pytest.fixture(scope="session")
def tiny_bpe_dir(tmp_path_factory):
    return build_tiny_bpe(tmp_path_factory.mktemp("tiny-bpe"))


@pytest.fixture(scope="session")
def tiny_sp_dir(tmp_path_factory):
    return build_tiny_sp(tmp_path_factory.mktemp("tiny-sp"))


@pytest.fixture(scope="session")
def mistral_legacy_dir(tmp_path_factory):
    return mistral_dir(tmp_path_factory.mktemp("mistral-legacy"), legacy=True)


@pytest.fixture(scope="session")
def mistral_nonlegacy_dir(tmp_path_factory):
    return mistral_dir(tmp_path_factory.mktemp("mistral-nonlegacy"), legacy=False)


def hf(folder):
    import transformers

    return transformers.AutoTokenizer.from_pretrained(str(folder))


# -- loading -------------------------------------------------------------------------------------------------


def test_tokenizer_json_wins_over_tokenizer_model(tmp_path, tiny_bpe_dir, tiny_sp_dir):
    both = tmp_path / "both"
    both.mkdir()
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (both / name).write_bytes((tiny_bpe_dir / name).read_bytes())
    (both / "tokenizer.model").write_bytes((tiny_sp_dir / "tokenizer.model").read_bytes())
    assert load_tokenizer(both).kind == "tokenizers"
    assert load_tokenizer(both / "tokenizer.model").kind == "sentencepiece"  # a file path picks that file
    assert load_tokenizer(tiny_sp_dir).kind == "sentencepiece"


def test_missing_and_bad_tokenizers_are_clear_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_tokenizer(tmp_path / "nope")
    with pytest.raises(TokenizerError, match="no tokenizer.json or tokenizer.model"):
        load_tokenizer(tmp_path)
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer(tmp_path)
    bad_sp = tmp_path / "sp"
    bad_sp.mkdir()
    (bad_sp / "tokenizer.model").write_bytes(b"garbage")
    with pytest.raises(TokenizerError, match="cannot load"):
        load_tokenizer(bad_sp)


def test_tokenizer_modules_do_not_import_torch():
    code = ("import sys, llamacli.tokenizer, llamacli.chat_template; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


# -- parity on real tokenizers -------------------------------------------------------------------------------


def test_smollm2_ids_equal_tokenizers_and_transformers(smollm2_dir):
    from tokenizers import Tokenizer as RustTokenizer

    tok = load_tokenizer(smollm2_dir)
    rust = RustTokenizer.from_file(str(smollm2_dir / "tokenizer.json"))
    ref = hf(smollm2_dir)
    assert tok.kind == "tokenizers" and tok.vocab_size == 49152
    assert (tok.bos_id, tok.eos_ids, tok.pad_id) == (1, (2,), 2)
    assert (tok.bos_token, tok.eos_token) == ("<|im_start|>", "<|im_end|>")
    assert tok.add_bos is False  # SmolLM2 adds no BOS to plain text
    for text in TRICKY + SPECIAL_TEXTS["smollm2"]:
        ids = tok.encode(text)
        assert ids == rust.encode(text).ids, text
        assert ids == ref.encode(text), text
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
        assert tok.decode(ids) == ref.decode(ids) == text
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert tok.encode("<|im_start|>")[0] == 1 and tok.is_special(1) and tok.is_special(2)
    assert not tok.is_special(tok.encode("Hello")[0])
    assert [tok.id_to_piece(i) for i in tok.encode(" world")] == ref.convert_ids_to_tokens(tok.encode(" world"))


def test_mistral_ids_equal_sentencepiece(mistral_legacy_dir):
    tok = load_tokenizer(mistral_legacy_dir)
    sp = spm.SentencePieceProcessor(model_file=str(mistral_legacy_dir / "tokenizer.model"))
    assert tok.kind == "sentencepiece" and tok.vocab_size == 32000
    assert (tok.bos_id, tok.eos_ids, tok.pad_id, tok.add_bos) == (1, (2,), None, True)
    assert (tok.bos_token, tok.eos_token) == ("<s>", "</s>")
    for text in TRICKY:
        ref = sp.encode(text)
        assert tok.encode(text, add_special_tokens=False) == ref, text
        assert tok.encode(text) == [1] + ref, text
        assert tok.decode(ref) == sp.decode(ref), text
        assert [tok.id_to_piece(i) for i in ref] == [sp.id_to_piece(i) for i in ref]
    # byte fallback: a character outside the vocabulary becomes <0x..> pieces and decodes back
    ids = tok.encode("\U0001d54f", add_special_tokens=False)
    assert any(tok.id_to_piece(i).startswith("<0x") for i in ids)
    assert tok.decode(ids) == "\U0001d54f"


@pytest.mark.parametrize("legacy", [True, False])
def test_mistral_special_strings_equal_transformers(tmp_path, legacy):
    folder = mistral_dir(tmp_path, legacy=legacy)
    tok, ref = load_tokenizer(folder), hf(folder)
    for text in SPECIAL_TEXTS["sp"] + ["Hello world", "中文 😀 x"]:
        ids = tok.encode(text)
        assert ids == ref.encode(text), text
        assert tok.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False), text
        assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True), text
    assert tok.encode("<s>[INST]", add_special_tokens=False)[0] == 1
    assert tok.is_special(1) and tok.is_special(2) and tok.is_special(0) and not tok.is_special(22557)
    if legacy:  # transformers' legacy decode keeps the dummy-prefix space after a special token
        ids = [1, 22557, 2, 1236]
        assert tok.decode(ids) == ref.decode(ids) == "<s> Hello</s> here"


def test_sentencepiece_chunks_between_special_tokens_are_encoded_as_sentencepiece_does(mistral_legacy_dir):
    # Text after a special token that starts with a space: we follow sentencepiece on each chunk (as Meta's
    # reference and transformers' slow legacy tokenizer do); transformers 5's converted tokenizer merges the
    # space into the next piece instead.
    tok = load_tokenizer(mistral_legacy_dir)
    sp = spm.SentencePieceProcessor(model_file=str(mistral_legacy_dir / "tokenizer.model"))
    assert tok.encode("a </s>  two") == [1] + sp.encode("a ") + [2] + sp.encode("  two")
    assert tok.encode("</s>") == [1, 2]


def test_tiny_trained_tokenizers_equal_transformers(tiny_bpe_dir, tiny_sp_dir):
    # transformers 5 converts a sentencepiece model to a `tokenizers` one that differs from sentencepiece on
    # runs of spaces; sentencepiece itself is the reference for those (below), transformers for special tokens.
    sp_texts = SPECIAL_TEXTS["sp"] + ["Hello world", "中文 😀 x", "digits 0 12 345"]
    for folder, texts in ((tiny_bpe_dir, TRICKY + SPECIAL_TEXTS["llama3"]), (tiny_sp_dir, sp_texts)):
        tok, ref = load_tokenizer(folder), hf(folder)
        for text in texts:
            ids = tok.encode(text)
            assert ids == ref.encode(text), (folder.name, text)
            assert tok.decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    bpe = load_tokenizer(tiny_bpe_dir)
    assert bpe.add_bos and bpe.bos_id == bpe.encode("x")[0] == 0 and bpe.bos_token == "<|begin_of_text|>"
    assert bpe.eos_ids == (4,) and bpe.eos_token == "<|eot_id|>"
    sp = load_tokenizer(tiny_sp_dir)
    raw = spm.SentencePieceProcessor(model_file=str(tiny_sp_dir / "tokenizer.model"))
    for text in TRICKY:
        assert sp.encode(text, add_special_tokens=False) == raw.encode(text)
        assert sp.decode(raw.encode(text)) == raw.decode(raw.encode(text))


# -- BOS/EOS policy, eos ids, added tokens ---------------------------------------------------------------------


def test_bos_eos_policy_from_tokenizer_config(tmp_path):
    folder = mistral_dir(tmp_path / "a")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    write_json(folder / "tokenizer_config.json", {**config, "add_bos_token": False, "add_eos_token": True})
    tok = load_tokenizer(folder)
    assert tok.add_bos is False
    assert tok.encode("Hello") == [22557, 2]
    assert tok.encode("Hello", add_special_tokens=False) == [22557]


def test_tokenizer_json_without_post_processor_adds_no_bos(tmp_path, tiny_bpe_dir):
    data = json.loads((tiny_bpe_dir / "tokenizer.json").read_text())
    data["post_processor"] = None
    (tmp_path / "tokenizer.json").write_text(json.dumps(data))
    tok = load_tokenizer(tmp_path / "tokenizer.json")  # a bare file: no tokenizer_config.json beside it
    assert tok.add_bos is False and tok.bos_id is None and tok.eos_ids == ()
    assert tok.encode("Hello") == tok.encode("Hello", add_special_tokens=False)


def test_extra_eos_ids_are_merged_without_duplicates(mistral_legacy_dir, tiny_bpe_dir):
    assert load_tokenizer(mistral_legacy_dir, extra_eos_ids=[2, 7, 7]).eos_ids == (2, 7)
    tok = load_tokenizer(tiny_bpe_dir, extra_eos_ids=(1,))
    assert tok.eos_ids == (4, 1) and tok.eos_id == 4


def test_sentencepiece_added_tokens_beyond_the_model(tmp_path):
    folder = build_tiny_sp(tmp_path, legacy=False)  # no dummy-prefix space after a special token
    write_json(folder / "added_tokens.json", {"<tool>": 400})
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"] = {
        "401": {"content": "<|think|>", "special": True, "lstrip": False, "rstrip": True},
    }
    write_json(folder / "tokenizer_config.json", config)
    tok = load_tokenizer(folder)
    assert tok.vocab_size == 402
    ids = tok.encode("a<tool>b<|think|>   c", add_special_tokens=False)
    assert 400 in ids and 401 in ids
    # rstrip: the spaces after <|think|> belong to the token
    assert ids == tok.encode("a<tool>b<|think|>c", add_special_tokens=False)
    assert tok.is_special(401) and not tok.is_special(400)
    assert tok.id_to_piece(400) == "<tool>"
    assert tok.decode(ids, skip_special_tokens=True) == "a<tool>bc"
    assert tok.decode(ids) == "a<tool>b<|think|>c"
    # An id past the tokenizer's vocabulary (a model's padded embedding rows) has no text: it decodes as nothing,
    # as transformers' tokenizers decode it, and only id_to_piece refuses it.
    assert tok.decode([402, 5000]) == ""
    assert tok.decode(ids[:2] + [402] + ids[2:], skip_special_tokens=True) == "a<tool>bc"
    with pytest.raises(TokenizerError, match="outside the vocabulary"):
        tok.id_to_piece(402)


# -- the tokenize command ----------------------------------------------------------------------------------------


runner = CliRunner()


def test_cli_tokenize_json_matches_the_tokenizer(mistral_legacy_dir):
    result = runner.invoke(app, ["tokenize", "--model", str(mistral_legacy_dir), "--text", "Hello [world]",
                                 "--json"])
    assert result.exit_code == 0, result.output
    data = json.loads(result.stdout)
    tok = load_tokenizer(mistral_legacy_dir)
    assert data["token_ids"] == tok.encode("Hello [world]") and data["token_ids"][0] == 1
    assert data["tokens"] == [tok.id_to_piece(i) for i in data["token_ids"]]

    raw = runner.invoke(app, ["tokenize", "--model", str(mistral_legacy_dir), "--text", "Hello", "--json",
                              "--no-special"])
    assert json.loads(raw.stdout)["token_ids"] == [22557]


def test_cli_tokenize_table_and_stdin(tiny_bpe_dir, tmp_path):
    result = runner.invoke(app, ["tokenize", "--tokenizer", str(tiny_bpe_dir), "--text", "-"],
                           input="[bold]x[/bold] <|eot_id|>")
    assert result.exit_code == 0, result.output
    tok = load_tokenizer(tiny_bpe_dir)
    ids = tok.encode("[bold]x[/bold] <|eot_id|>")
    for i in ids:
        assert str(i) in result.stdout
    for piece in {tok.id_to_piece(i) for i in ids}:  # shown as they are, never read as rich markup
        assert f"│ {piece} " in result.stdout or f"│ {piece}  (special)" in result.stdout
    assert "<|eot_id|>  (special)" in result.stdout
    assert f"{len(ids)} tokens (tokenizers)" in result.stdout


def test_cli_tokenize_errors_are_one_line(tmp_path):
    missing = runner.invoke(app, ["tokenize", "--model", str(tmp_path / "nope"), "--text", "x"])
    assert missing.exit_code == 1
    assert missing.stderr.startswith("error: ") and "Traceback" not in missing.output
    assert len(missing.stderr.strip().splitlines()) == 1
    empty = runner.invoke(app, ["tokenize", "--model", str(tmp_path), "--text", "x"])
    assert empty.exit_code == 1 and "no tokenizer.json or tokenizer.model" in empty.stderr
    usage = runner.invoke(app, ["tokenize", "--text", "x"])
    assert usage.exit_code == 2 and "--tokenizer" in usage.stderr


def test_cli_tokenize_subprocess_exit_code(tmp_path):
    script = Path(sys.executable).parent / "llamacli"  # the installed console entry point
    proc = subprocess.run([str(script), "tokenize", "--model", str(tmp_path / "x"), "--text", "x"],
                          capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: model not found")
    assert "Traceback" not in proc.stderr

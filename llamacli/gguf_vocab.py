"""GGUF vocabularies -> Hugging Face tokenizer files: a `tokenizer.json` for byte-level BPE vocabularies (with
the pre-tokenizer split llama.cpp names in `tokenizer.ggml.pre`), a SentencePiece `tokenizer.model` for
SentencePiece ones, and `tokenizer_config.json` / `special_tokens_map.json` (chat template included).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from llamacli.errors import TokenizerError

# GGUF token types (llama.cpp's llama_token_type), which are also SentencePiece's piece types.
_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE = 1, 2, 3, 4, 5, 6

_GPT2_SPLIT = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


@dataclass(frozen=True)
class _PreTokenizer:
    split: str
    digits: bool = False  # split every digit on its own first (StarCoder-style vocabularies)
    ignore_merges: bool = False  # a word that is a whole token is not merged (Llama 3)
    add_bos: bool = False  # llama.cpp's default when the file does not say


_LLAMA3 = _PreTokenizer(_LLAMA3_SPLIT, ignore_merges=True, add_bos=True)
_STARCODER = _PreTokenizer(_GPT2_SPLIT, digits=True)
_PRE_TOKENIZERS = {
    "default": _PreTokenizer(_GPT2_SPLIT),
    "gpt2": _PreTokenizer(_GPT2_SPLIT),
    "gpt-2": _PreTokenizer(_GPT2_SPLIT),
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "llama-bpe": _LLAMA3,
    "falcon3": _LLAMA3,
    "smaug-bpe": _PreTokenizer(_LLAMA3_SPLIT),
    "dbrx": _PreTokenizer(_LLAMA3_SPLIT),
    "smollm": _STARCODER,
    "starcoder": _STARCODER,
    "refact": _STARCODER,
    "command-r": _STARCODER,
    "codeshell": _STARCODER,
    "exaone": _STARCODER,
    "minerva-7b": _STARCODER,
    "qwen2": _PreTokenizer(_QWEN2_SPLIT),
    "deepseek-r1-qwen": _PreTokenizer(_QWEN2_SPLIT),
    "megrez": _PreTokenizer(_QWEN2_SPLIT),
    "tekken": _PreTokenizer(_TEKKEN_SPLIT),
    "gpt-4o": _PreTokenizer(_GPT4O_SPLIT),
    "llama4": _PreTokenizer(_GPT4O_SPLIT),
}



def special_id(meta: dict, name: str) -> int | None:
    """The id of a special token (bos, eos, unknown, padding) named in the GGUF metadata, or None."""
    value = meta.get(f"tokenizer.ggml.{name}_token_id")
    return int(value) if value is not None else None




def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's printable spelling of each byte, the alphabet of byte-level BPE vocabularies."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    spelling, extra = {}, 0
    for byte in range(256):
        if byte in keep:
            spelling[byte] = chr(byte)
        else:
            spelling[byte] = chr(256 + extra)
            extra += 1
    return spelling


def _write_bpe_tokenizer(meta: dict, out: Path, pre: _PreTokenizer, add_bos: bool) -> None:
    """tokenizer.json for a byte-level BPE (`gpt2`) vocabulary."""
    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))
    merges: list[str] = list(meta.get("tokenizer.ggml.merges") or [])
    spelling = _bytes_to_unicode()
    alphabet = set(spelling.values())

    vocab: dict[str, int] = {}
    added = []
    for index, (token, kind) in enumerate(zip(tokens, types)):
        key = token
        if not set(token) <= alphabet:
            # Added tokens are stored as raw text; the BPE vocabulary wants them in the byte alphabet.
            key = "".join(spelling[b] for b in token.encode("utf-8"))
        if key in vocab:
            key = token if token not in vocab else f"<gguf_duplicate_{index}>"
        vocab[key] = index
        if kind in (_CONTROL, _USER_DEFINED):
            added.append({
                "id": index, "content": token, "single_word": False, "lstrip": False, "rstrip": False,
                "normalized": False, "special": kind == _CONTROL,
            })

    pre_tokenizers: list[dict] = []
    if pre.digits:
        pre_tokenizers.append({"type": "Digits", "individual_digits": True})
    pre_tokenizers += [
        {"type": "Split", "pattern": {"Regex": pre.split}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False},
    ]
    post_processor: dict = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    bos_id = special_id(meta, "bos")
    if add_bos and bos_id is not None:
        bos = tokens[bos_id]
        post_processor = {
            "type": "TemplateProcessing",
            "single": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
            "pair": [{"SpecialToken": {"id": bos, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                     {"SpecialToken": {"id": bos, "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
            "special_tokens": {bos: {"id": bos, "ids": [bos_id], "tokens": [bos]}},
        }
    document = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": added,
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": pre_tokenizers},
        "post_processor": post_processor,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {
            "type": "BPE",
            "dropout": None,
            "unk_token": None,
            "continuing_subword_prefix": None,
            "end_of_word_suffix": None,
            "fuse_unk": False,
            "byte_fallback": False,
            "ignore_merges": pre.ignore_merges,
            "vocab": vocab,
            "merges": [merge.split(" ", 1) for merge in merges],
        },
    }
    (out / "tokenizer.json").write_text(json.dumps(document, ensure_ascii=False) + "\n", encoding="utf-8")
    # Fail here, not at first use, if `tokenizers` cannot read what we wrote.
    from tokenizers import Tokenizer

    try:
        Tokenizer.from_file(str(out / "tokenizer.json"))
    except Exception as exc:
        raise TokenizerError(f"the tokenizer built from the GGUF vocabulary does not load: {exc}") from exc


def _write_sentencepiece_tokenizer(meta: dict, out: Path) -> None:
    """tokenizer.model for a SentencePiece (`llama`) vocabulary."""
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as sp_pb2

    tokens: list[str] = list(meta["tokenizer.ggml.tokens"])
    scores: list[float] = list(meta.get("tokenizer.ggml.scores") or [0.0] * len(tokens))
    types: list[int] = list(meta.get("tokenizer.ggml.token_type") or [_NORMAL] * len(tokens))

    proto = sp_pb2.ModelProto()
    for token, score, kind in zip(tokens, scores, types):
        piece = proto.pieces.add()
        piece.piece = token
        piece.score = float(score)
        piece.type = kind if kind in (_NORMAL, _UNKNOWN, _CONTROL, _USER_DEFINED, _UNUSED, _BYTE) else _NORMAL
    trainer = proto.trainer_spec
    trainer.model_type = sp_pb2.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = _BYTE in types
    for field, name in (("unk_id", "unknown"), ("bos_id", "bos"), ("eos_id", "eos"), ("pad_id", "padding")):
        token_id = special_id(meta, name)
        setattr(trainer, field, -1 if token_id is None else token_id)
    for field, token_id in (("unk_piece", special_id(meta, "unknown")), ("bos_piece", special_id(meta, "bos")),
                            ("eos_piece", special_id(meta, "eos")), ("pad_piece", special_id(meta, "padding"))):
        if token_id is not None:
            setattr(trainer, field, tokens[token_id])
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    normalizer.remove_extra_whitespaces = bool(meta.get("tokenizer.ggml.remove_extra_whitespaces", False))
    normalizer.escape_whitespaces = True
    data = proto.SerializeToString()
    try:
        SentencePieceProcessor(model_proto=data)
    except Exception as exc:
        raise TokenizerError(f"the SentencePiece model built from the GGUF vocabulary does not load: {exc}") from exc
    (out / "tokenizer.model").write_bytes(data)


def write_tokenizer(meta: dict, out: Path, config: dict) -> None:
    """Write the tokenizer files for the GGUF vocabulary in `meta` into `out` (config: the HF config dict)."""
    model = meta.get("tokenizer.ggml.model")
    if not meta.get("tokenizer.ggml.tokens"):
        raise TokenizerError("GGUF file has no vocabulary (tokenizer.ggml.tokens)")
    tokens = meta["tokenizer.ggml.tokens"]
    if model == "gpt2":
        pre_name = meta.get("tokenizer.ggml.pre") or "default"
        if pre_name not in _PRE_TOKENIZERS:
            raise TokenizerError(f"unsupported GGUF pre-tokenizer {pre_name!r} (tokenizer.ggml.pre); "
                                 f"supported: {', '.join(sorted(_PRE_TOKENIZERS))}")
        pre = _PRE_TOKENIZERS[pre_name]
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", pre.add_bos))
        _write_bpe_tokenizer(meta, out, pre, add_bos)
        tokenizer_class = "PreTrainedTokenizerFast"
    elif model == "llama":
        add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", True))
        _write_sentencepiece_tokenizer(meta, out)
        tokenizer_class = "LlamaTokenizer"
    else:
        raise TokenizerError(f"unsupported GGUF tokenizer model {model!r} (supported: gpt2, llama)")

    def token(name: str) -> str | None:
        token_id = special_id(meta, name)
        return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

    tokenizer_config: dict[str, Any] = {
        "tokenizer_class": tokenizer_class,
        "bos_token": token("bos"),
        "eos_token": token("eos"),
        "unk_token": token("unknown"),
        "pad_token": token("padding"),
        "add_bos_token": add_bos,
        "add_eos_token": bool(meta.get("tokenizer.ggml.add_eos_token", False)),
        "clean_up_tokenization_spaces": False,
        "model_max_length": config["max_position_embeddings"],
    }
    if model == "llama":
        tokenizer_config["legacy"] = False
        tokenizer_config["add_prefix_space"] = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
    if (template := meta.get("tokenizer.chat_template")) is not None:
        tokenizer_config["chat_template"] = template
    tokenizer_config = {k: v for k, v in tokenizer_config.items() if v is not None}
    (out / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2, ensure_ascii=False) + "\n",
                                               encoding="utf-8")
    special = {k: tokenizer_config[k] for k in ("bos_token", "eos_token", "unk_token", "pad_token") if k in tokenizer_config}
    (out / "special_tokens_map.json").write_text(json.dumps(special, indent=2, ensure_ascii=False) + "\n",
                                                 encoding="utf-8")

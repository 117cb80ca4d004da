"""Text <-> token ids with the checkpoint's own tokenizer, and a streaming detokenizer.

One interface over two backends: `tokenizer.json` through `tokenizers`, and `tokenizer.model` through
`sentencepiece`. When a folder has both, `tokenizer.json` wins (as transformers does). Special and added tokens
written in text map to their ids for both backends; BOS/EOS follow the checkpoint's `tokenizer_config.json`
(or the tokenizer.json post-processor). No torch here.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Iterable

from llamacli.errors import InputError, TokenizerError
from llamacli.text import read_json_file

_SPIECE_SPACE = "\u2581"  # SentencePiece's visible space, "▁"


class Tokenizer:
    """Common interface; see `load_tokenizer` for how one is built."""

    kind: str
    bos_id: int | None
    eos_ids: tuple[int, ...]
    pad_id: int | None
    vocab_size: int
    bos_token: str | None
    eos_token: str | None
    add_bos: bool

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`; special-token strings in it map to their ids."""
        raise NotImplementedError

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Text of `ids`, as the backend decodes it."""
        raise NotImplementedError

    def id_to_piece(self, i: int) -> str:
        """The vocabulary entry (piece) of one id, e.g. '▁Hello' or 'Ġworld'."""
        raise NotImplementedError

    def is_special(self, i: int) -> bool:
        """Whether id `i` is a special token (skipped by `decode(skip_special_tokens=True)`)."""
        raise NotImplementedError

    @property
    def eos_id(self) -> int | None:
        """The first end-of-sequence id, or None."""
        return self.eos_ids[0] if self.eos_ids else None

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        """A fresh incremental decoder over this tokenizer."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens)

    def _known_ids(self, ids: Iterable[int]) -> list[int]:
        """The ids the tokenizer has text for. A model's vocabulary may be padded past its tokenizer's (a
        32128-row embedding with a 32000-token tokenizer is common in fine-tunes); an id in the padding has no
        text, so it decodes as nothing, as transformers' tokenizers decode it."""
        return [i for i in map(int, ids) if 0 <= i < self.vocab_size]

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(kind={self.kind!r}, vocab_size={self.vocab_size}, bos_id={self.bos_id}, "
                f"eos_ids={self.eos_ids}, add_bos={self.add_bos})")


# ---------------------------------------------------------------------------------------------------------------
# Checkpoint metadata: tokenizer_config.json, special_tokens_map.json, added_tokens.json


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    data = read_json_file(path, TokenizerError)
    if not isinstance(data, dict):
        raise TokenizerError(f"{path} should hold a JSON object")
    return data


def _token_str(value) -> str | None:
    """A special token as tokenizer_config writes it: a string or {"content": ...}."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


class _AddedToken:
    __slots__ = ("content", "id", "special", "lstrip", "rstrip")

    def __init__(self, content: str, id: int, special: bool, lstrip: bool = False, rstrip: bool = False):
        self.content, self.id, self.special, self.lstrip, self.rstrip = content, id, special, lstrip, rstrip


class _Meta:
    """What the tokenizer files around the model file say about special tokens and BOS/EOS."""

    def __init__(self, folder: Path):
        config = _read_json(folder / "tokenizer_config.json")
        special_map = _read_json(folder / "special_tokens_map.json")
        self.config = config
        names = {}
        for key in ("bos_token", "eos_token", "pad_token", "unk_token"):
            names[key] = _token_str(config.get(key)) or _token_str(special_map.get(key))
        self.bos_token, self.eos_token = names["bos_token"], names["eos_token"]
        self.pad_token, self.unk_token = names["pad_token"], names["unk_token"]
        self.add_bos = config.get("add_bos_token")
        self.add_eos = config.get("add_eos_token")
        self.legacy = config.get("legacy", True)
        self.added: dict[int, _AddedToken] = {}
        for key, entry in (config.get("added_tokens_decoder") or {}).items():
            content = _token_str(entry)
            if content is None:
                continue
            try:
                idx = int(key)
            except ValueError:
                raise TokenizerError(f"added_tokens_decoder has a non-integer id {key!r}") from None
            self.added[idx] = _AddedToken(content, idx, bool(entry.get("special", True)),
                                          bool(entry.get("lstrip")), bool(entry.get("rstrip")))
        known = {t.content for t in self.added.values()}
        for content, idx in _read_json(folder / "added_tokens.json").items():
            if content not in known and isinstance(idx, int):
                self.added[idx] = _AddedToken(content, idx, special=False)
        extra = list(config.get("additional_special_tokens") or []) + list(
            special_map.get("additional_special_tokens") or [])
        self.additional_special = [s for s in (_token_str(v) for v in extra) if s]


# ---------------------------------------------------------------------------------------------------------------
# tokenizers backend (tokenizer.json)


class _HFTokenizer(Tokenizer):
    kind = "tokenizers"

    def __init__(self, path: Path, meta: _Meta, extra_eos_ids: Iterable[int]):
        from tokenizers import Tokenizer as RustTokenizer

        try:
            self._tok = RustTokenizer.from_file(str(path))
        except Exception as exc:  # the Rust side raises plain Exceptions
            raise TokenizerError(f"cannot load {path}: {exc}") from exc
        tok = self._tok
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)
        added = tok.get_added_tokens_decoder()  # {id: AddedToken}
        self._special = {i for i, t in added.items() if t.special}

        def tid(s):
            return tok.token_to_id(s) if s is not None else None

        # BOS policy is the post-processor's: see what it adds around a plain text.
        plain = tok.encode("a", add_special_tokens=False).ids
        with_special = tok.encode("a", add_special_tokens=True).ids
        added_front = with_special[: len(with_special) - len(plain)] if with_special[-len(plain):] == plain else []
        self.add_bos = bool(added_front)

        self.bos_token = meta.bos_token
        self.bos_id = tid(meta.bos_token)
        if self.bos_id is None and added_front:
            self.bos_id = added_front[0]
            self.bos_token = tok.id_to_token(self.bos_id)
        self.eos_token = meta.eos_token
        eos = tid(meta.eos_token)
        self.pad_id = tid(meta.pad_token)
        self.eos_ids = _merge_ids(eos, extra_eos_ids)
        for i in (self.bos_id, eos, self.pad_id):
            if i is not None:
                self._special.add(i)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self._tok.decode(self._known_ids(ids), skip_special_tokens=skip_special_tokens)

    def id_to_piece(self, i: int) -> str:
        piece = self._tok.id_to_token(int(i))
        if piece is None:
            raise TokenizerError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return piece

    def is_special(self, i: int) -> bool:
        return int(i) in self._special


# ---------------------------------------------------------------------------------------------------------------
# sentencepiece backend (tokenizer.model)


class _SPTokenizer(Tokenizer):
    kind = "sentencepiece"

    def __init__(self, path: Path, meta: _Meta, extra_eos_ids: Iterable[int]):
        import sentencepiece

        try:
            self._sp = sp = sentencepiece.SentencePieceProcessor(model_file=str(path))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"cannot load {path}: {exc}") from exc
        self._n_pieces = sp.get_piece_size()
        self._legacy = bool(meta.legacy)

        # Tokens that are matched in text before SentencePiece sees it: sp's own control/unknown pieces
        # (<s>, </s>, <unk>), then the checkpoint's added tokens (which may lie beyond sp's vocabulary).
        self._added: dict[int, _AddedToken] = {}
        for i in range(self._n_pieces):
            if sp.is_control(i) or sp.is_unknown(i):
                self._added[i] = _AddedToken(sp.id_to_piece(i), i, special=True)
        for i, t in meta.added.items():
            self._added[i] = t
        self._by_content = {t.content: t for t in self._added.values()}
        for s in meta.additional_special:
            if s in self._by_content:
                self._by_content[s].special = True
        self.vocab_size = max([self._n_pieces] + [i + 1 for i in self._added])

        def tid(s, fallback):
            if s is None:
                return fallback
            if s in self._by_content:
                return self._by_content[s].id
            i = sp.piece_to_id(s)
            if i == sp.unk_id() and s != sp.id_to_piece(i):
                return fallback
            return i

        self.bos_id = tid(meta.bos_token, sp.bos_id() if sp.bos_id() >= 0 else None)
        eos = tid(meta.eos_token, sp.eos_id() if sp.eos_id() >= 0 else None)
        self.pad_id = tid(meta.pad_token, sp.pad_id() if sp.pad_id() >= 0 else None)
        self.bos_token = self._piece_or_none(self.bos_id)
        self.eos_token = self._piece_or_none(eos)
        self.eos_ids = _merge_ids(eos, extra_eos_ids)
        self.add_bos = bool(meta.add_bos if meta.add_bos is not None else True) and self.bos_id is not None
        self._add_eos = bool(meta.add_eos) and eos is not None
        self._eos = eos
        for i in (self.bos_id, eos, self.pad_id):
            if i is not None and i in self._added:
                self._added[i].special = True
            elif i is not None:
                self._added[i] = _AddedToken(sp.id_to_piece(i), i, special=True)
                self._by_content[sp.id_to_piece(i)] = self._added[i]

        contents = sorted(self._by_content, key=len, reverse=True)
        self._split_re = re.compile("(" + "|".join(re.escape(c) for c in contents) + ")") if contents else None
        # sp removes one leading space when decoding text that starts with "▁"; we need to know to undo it
        # when a run of ordinary pieces follows other text (a special token's string).
        self._dummy_prefix = sp.encode("a", out_type=str)[:1] == [_SPIECE_SPACE + "a"] or (
            sp.encode("a", out_type=str)[:1] == [_SPIECE_SPACE])
        self._unk_prefix_len = len(sp.encode("<unk>"))

    def _piece_or_none(self, i: int | None) -> str | None:
        if i is None:
            return None
        return self._added[i].content if i in self._added else self._sp.id_to_piece(i)

    def _encode_chunk(self, text: str, at_start: bool) -> list[int]:
        if not text:
            return []
        if self._legacy or at_start or not self._dummy_prefix:
            return self._sp.encode(text)
        # Non-legacy (as transformers): text after a special token gets no dummy-prefix space. Encode behind
        # "<unk>" and drop its pieces, the same trick transformers uses.
        ids = self._sp.encode("<unk>" + text)
        return ids[self._unk_prefix_len:]

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids: list[int] = []
        parts = self._split_re.split(text) if self._split_re is not None else [text]
        # parts alternate: text, token, text, token, ..., text
        for k in range(0, len(parts), 2):
            chunk = parts[k]
            if k > 0 and self._by_content[parts[k - 1]].rstrip:
                chunk = chunk.lstrip()
            if k + 1 < len(parts) and self._by_content[parts[k + 1]].lstrip:
                chunk = chunk.rstrip()
            ids.extend(self._encode_chunk(chunk, at_start=(k == 0)))
            if k + 1 < len(parts):
                ids.append(self._by_content[parts[k + 1]].id)
        if add_special_tokens:
            if self.add_bos:
                ids.insert(0, self.bos_id)
            if self._add_eos:
                ids.append(self._eos)
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        ids = self._known_ids(ids)
        out: list[str] = []
        run: list[int] = []

        def flush_run():
            if not run:
                return
            text = self._sp.decode(run)
            # sp dropped the leading space of a first piece "▁x"; keep it when other text came before.
            if any(out) and self._dummy_prefix and self._sp.id_to_piece(run[0]).startswith(_SPIECE_SPACE):
                text = " " + text
            out.append(text)
            run.clear()

        for i in ids:
            tok = self._added.get(i)
            if tok is None:
                if i >= self._n_pieces:
                    raise TokenizerError(f"token id {i} is not in the SentencePiece model nor an added token")
                run.append(i)
                continue
            if skip_special_tokens and tok.special:
                continue
            flush_run()
            out.append(tok.content)
        flush_run()
        return "".join(out)

    def id_to_piece(self, i: int) -> str:
        i = int(i)
        if i in self._added:
            return self._added[i].content
        if not 0 <= i < self._n_pieces:
            raise TokenizerError(f"token id {i} is outside the vocabulary (size {self.vocab_size})")
        return self._sp.id_to_piece(i)

    def is_special(self, i: int) -> bool:
        tok = self._added.get(int(i))
        return tok is not None and tok.special


def _merge_ids(first: int | None, extra: Iterable[int]) -> tuple[int, ...]:
    ids = ([first] if first is not None else []) + [int(i) for i in extra]
    return tuple(dict.fromkeys(ids))


def load_tokenizer(path, extra_eos_ids: Iterable[int] = ()) -> Tokenizer:
    """Load the tokenizer of a checkpoint folder, or a tokenizer.json / tokenizer.model file."""
    path = Path(path)
    if path.is_dir():
        folder = path
        if (path / "tokenizer.json").is_file():
            file = path / "tokenizer.json"
        elif (path / "tokenizer.model").is_file():
            file = path / "tokenizer.model"
        else:
            raise TokenizerError(f"no tokenizer.json or tokenizer.model in {path}")
    elif path.is_file():
        folder, file = path.parent, path
    else:
        raise InputError(f"tokenizer path not found: {path}")
    meta = _Meta(folder)
    if file.suffix == ".json":
        return _HFTokenizer(file, meta, extra_eos_ids)
    if file.suffix == ".model":
        return _SPTokenizer(file, meta, extra_eos_ids)
    raise TokenizerError(f"{file} is neither a tokenizer.json nor a SentencePiece .model file")


# ---------------------------------------------------------------------------------------------------------------
# Streaming detokenizer


class StreamDecoder:
    """Turn ids, fed one at a time, into text pieces.

    Contract: after every non-empty piece and after `flush()`, `text` (all pieces joined) equals
    `tokenizer.decode(ids so far)`; no piece ends inside a UTF-8 character. Each step decodes only a short window:
    the ids of the last emitted piece (context, so SentencePiece's leading space and decoder stripping behave as
    in the full text) plus the ids not yet emitted.
    """

    # A UTF-8 character spans at most 4 byte tokens; past this many held-back ids the text is emitted anyway
    # (only a run of invalid bytes gets here), which keeps the per-token cost bounded.
    max_pending = 16

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self._context: list[int] = []
        self._context_text = ""
        self._pending: list[int] = []
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """Everything emitted so far."""
        return "".join(self._pieces)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def _emit(self, force: bool) -> str:
        full = self._decode(self._context + self._pending)
        if full.endswith("\ufffd") and not force:
            return ""  # maybe a character cut between tokens: wait for its other bytes
        piece = full[len(self._context_text):]
        if piece:
            self._context, self._context_text = self._pending, self._decode(self._pending)
            self._pieces.append(piece)
            self._pending = []
        elif self._pieces or force:
            # Ids with no text of their own (skipped special tokens) do not change what follows once some
            # text is out. Before that they may: SentencePiece's first "▁" is dropped only at the very start.
            self._pending = []
        return piece

    def add(self, token_id: int) -> str:
        """Feed one id; return the newly completed text ('' if none yet)."""
        self._pending.append(int(token_id))
        return self._emit(force=len(self._pending) >= self.max_pending)

    def flush(self) -> str:
        """Return whatever text is still held back (call once, at the end)."""
        return self._emit(force=True) if self._pending else ""

"""Text where it enters: bytes decoded as UTF-8 and strings checked to be real text (no lone surrogates, which
JSON escapes and undecodable command-line bytes can produce), with one-line errors that say where. No torch here.
"""

from __future__ import annotations

import json
from pathlib import Path

from llamacli.errors import InputError, LlamaCliError


def text_problem(value: str) -> str | None:
    """Why `value` is not valid text (a lone surrogate, with its position), or None when it is."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError as exc:
        return f"a lone surrogate {value[exc.start]!r} at character {exc.start}"
    return None


def check_text(value: str, where: str, error: type[LlamaCliError] = InputError) -> str:
    """`value` if it is valid text; else raise `error` saying that `where` is not."""
    problem = text_problem(value)
    if problem is not None:
        raise error(f"{where} is not valid text ({problem})")
    return value


def check_texts(value, where: str, error: type[LlamaCliError] = InputError) -> None:
    """`check_text` on every string in a JSON value (keys too, at any depth), naming the field that fails."""
    if isinstance(value, str):
        check_text(value, where, error)
    elif isinstance(value, dict):
        for k, v in value.items():
            check_texts(k, f"a key of {where}", error)
            check_texts(v, f"{where}[{k!r}]" if text_problem(str(k)) is None else where, error)
    elif isinstance(value, list):
        for i, v in enumerate(value):
            check_texts(v, f"{where}[{i}]", error)


def decode_text(data: bytes, where: str, error: type[LlamaCliError] = InputError) -> str:
    """`data` decoded as UTF-8 (a leading byte-order mark dropped); else raise `error` naming `where` and the byte."""
    try:
        return data.decode("utf-8").removeprefix("\ufeff")
    except UnicodeDecodeError as exc:
        raise error(f"{where} is not UTF-8 ({exc.reason} at byte {exc.start})") from None


def read_text_file(path: str | Path, what: str = "file") -> str:
    """The text of a UTF-8 file; InputError naming it when it is missing, a folder, unreadable or not UTF-8."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{what} {p} is a directory, not a file")
    try:
        data = p.read_bytes()
    except FileNotFoundError:
        raise InputError(f"{what} {p}: no such file") from None
    except OSError as exc:
        raise InputError(f"cannot read {what} {p}: {exc.strerror or exc}") from None
    return decode_text(data, f"{what} {p}")


def read_json_file(path: str | Path, error: type[LlamaCliError] = InputError):
    """The parsed JSON of a UTF-8 file; `error` naming the file (and the byte, or line and column) if it fails."""
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        raise error(f"cannot read {path}: {exc.strerror or exc}") from None
    try:
        return json.loads(decode_text(data, str(path), error))
    except json.JSONDecodeError as exc:
        raise error(f"{path}: malformed JSON at line {exc.lineno} column {exc.colno}: {exc.msg}") from None

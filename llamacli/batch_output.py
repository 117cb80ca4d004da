"""The batch result file: which output a run may write, what `--resume` counts as done, and how the file is opened.

Rules (the CLI's `--output`, `--resume`, `--overwrite` and the README state them too):
- The output is never the input (same file through a path, a symlink or a hard link, or stdin redirected from it).
- An existing non-empty output is refused unless `resume` (continue it) or `overwrite` (replace it). With
  `overwrite` the rows go to a temporary file beside it that replaces it when the run ends, and also when the
  run stops early (Ctrl-C, an error) after writing at least one row, so `--resume` can continue; a run that
  stops before its first row leaves the old file untouched.
- Every result row carries `"prompt_hash"`: a hash of what the row asked for (its `prompt` or `messages` and its
  overrides). With `resume`, a row is done when the output has a result for its id with the same hash. An id
  whose result was made from another prompt (the input was edited: a changed prompt, or lines inserted or
  removed so that line-number ids moved) is refused before any model loads, naming it: results are never
  attributed to the wrong prompt. Old error rows of the input's ids are dropped when the run starts (those
  rows are tried again), so each id ends with one row; a complete last row without a final newline is kept,
  a cut one is dropped.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
from pathlib import Path
from typing import Callable, Iterator, TextIO

from llamacli import files
from llamacli.errors import InputError, UsageError

HASH_FIELDS = ("prompt", "messages", "max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "system")

Opener = Callable[[], contextlib.AbstractContextManager]


def id_key(rid) -> tuple:
    """Ids compare with their JSON type: the string "3" and the line number 3 are different ids."""
    return (type(rid).__name__, rid)


def prompt_hash(row) -> str | None:
    """A short hash of what a row asks for (prompt or messages, and its overrides); None for a row that failed to
    parse. ASCII JSON with sorted keys, so that any text, even an unpaired surrogate, hashes the same each time."""
    if row.prompt is None and row.messages is None:
        return None
    content = {"prompt": row.prompt} if row.prompt is not None else {"messages": row.messages}
    content.update({k: v for k, v in row.overrides.items() if k in HASH_FIELDS})
    text = json.dumps(content, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(text.encode("ascii")).hexdigest()[:16]


def rows_to_run(rows: list, done: dict) -> list:
    """The rows a resumed run still has to write: those with an error, and those without a result for their id
    and prompt in `done` (id key -> prompt hash). InputError if an id's result was made from another prompt."""
    todo, stale = [], []
    for row in rows:
        if row.error is not None or id_key(row.id) not in done:
            todo.append(row)
        elif done[id_key(row.id)] != prompt_hash(row):
            stale.append(row)
    if stale:
        first = stale[0]
        why = ("has no prompt_hash (written by an older llamacli)" if done[id_key(first.id)] is None
               else "was made from another prompt")
        raise InputError(f"cannot resume: the output's result for id {first.id!r} ({first.where} of the input) "
                         f"{why}; {len(stale)} row(s) differ from the run that wrote the output. Restore the "
                         "input, give rows explicit ids, or start again with --overwrite")
    return todo


def _stdin_is(path: Path) -> bool:
    with contextlib.suppress(AttributeError, OSError, ValueError):
        return files.same_file(sys.stdin.fileno(), path)
    return False


def check_not_input(output: str | Path, source: str | Path | None) -> None:
    """UsageError when the output is the prompts file itself (also through a symlink, a hard link or stdin)."""
    if source is None or str(output) == "-":
        return
    same = _stdin_is(Path(output)) if str(source) == "-" else files.same_file(source, output)
    if same:
        shown = "standard input" if str(source) == "-" else f"the prompts file {source}"
        raise UsageError(f"--output {output} is {shown}: writing results there would destroy the prompts; "
                         "write to another file")


def prepare_output(path: str | Path, resume: bool = False, *, rows: list | None = None, overwrite: bool = False,
                   source: str | Path | None = None) -> tuple[dict, Opener]:
    """Check the output can be written (UsageError / InputError if not) and, with resume, read what is done.

    Returns (done, opener): `done` maps id keys to the prompt hash of their result; `opener()` is a context
    manager giving the text stream to write rows to (stdout for '-'). `rows` (the input) is needed with resume;
    `source` (the prompts file) is checked not to be the output. Call this before loading a model.
    """
    if resume and overwrite:
        raise UsageError("pass either --resume (continue the output) or --overwrite (replace it), not both")
    if str(path) == "-":
        if resume or overwrite:
            raise UsageError(f"--{'resume' if resume else 'overwrite'} needs an --output file")

        @contextlib.contextmanager
        def stdout() -> Iterator[TextIO]:
            yield sys.stdout

        return {}, stdout
    p = Path(path)
    check_not_input(p, source)
    files.check_writable(p)
    exists = p.exists()
    if exists and not files.is_regular(p):  # a device or a pipe: written in place, nothing to keep or replace
        if resume:
            raise UsageError(f"--resume needs a regular output file; {p} is not one")
        return {}, lambda: open(p, "w", encoding="utf-8")
    size = p.stat().st_size if exists else 0
    if size and not (resume or overwrite):
        raise UsageError(f"output {p} already holds results ({size} bytes): pass --resume to continue it, "
                         "--overwrite to replace it, or choose another file")
    if resume and size:
        if rows is None:
            raise ValueError("prepare_output(resume=True) needs the input rows")
        return _prepare_resume(p, rows)
    if size:  # --overwrite: the old file stays until the new one has rows
        return {}, lambda: files.replacing(p, "w", keep_on_error=lambda f: f.tell() > 0)
    # New or empty: rows go straight into the file, flushed one by one, so that a kill leaves them resumable.
    return {}, lambda: open(p, "w", encoding="utf-8")


def _prepare_resume(p: Path, rows: list) -> tuple[dict, Opener]:
    try:
        data = p.read_bytes()
    except OSError as exc:
        raise InputError(f"cannot read output {p} to resume: {exc.strerror or exc}") from None
    lines = data.split(b"\n")
    last = lines.pop()  # b"" when the file ends with a newline
    if last.strip():
        try:
            json.loads(last)
            lines.append(last)  # a complete row, only its newline missing
        except (json.JSONDecodeError, UnicodeDecodeError):
            pass  # a row cut short by an interruption: dropped, and that prompt runs again
    input_ids = {id_key(row.id) for row in rows}
    done: dict = {}
    kept: list[bytes] = []
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InputError(f"cannot resume: line {n} of {p} is not a JSON row") from None
        rid = obj.get("id") if isinstance(obj, dict) else None
        valid_id = isinstance(rid, (str, int)) and not isinstance(rid, bool)
        if valid_id and "error" in obj and id_key(rid) in input_ids:
            continue  # this id runs again: its old error goes
        if valid_id and "error" not in obj:
            done.setdefault(id_key(rid), obj.get("prompt_hash"))
        kept.append(line)
    rows_to_run(rows, done)  # refuse now, before any model loads, if a result belongs to another prompt
    rewrite = kept != [ln for ln in data.split(b"\n") if ln.strip()] or not data.endswith(b"\n")

    @contextlib.contextmanager
    def opener() -> Iterator[TextIO]:
        if rewrite:  # atomically: a failure here leaves the old file as it was
            files.write_bytes(p, b"".join(line + b"\n" for line in kept))
        with open(p, "a", encoding="utf-8") as f:
            yield f

    return done, opener


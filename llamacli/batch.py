"""Batch generation: rows of prompts in (JSONL or plain text), one JSONL result per row out, on the batched engine.

Input, read whole before any model is loaded (`read_rows`):
- JSONL: one object per line, `{"id"?, "prompt": str}` or `{"id"?, "messages": [{"role", "content"}, ...]}`,
  each optionally overriding `max_new_tokens, temperature, top_p, top_k, seed, stop, system`. Other fields are
  ignored (eval sets carry their own). A row without an id gets its line number (an int).
- Plain text: one prompt per line.
- Which one: a `.jsonl` / `.ndjson` / `.json` file is JSONL and a `.txt` file is plain text; anything else
  (stdin included) is JSONL when its first non-blank line starts with `{`, plain text otherwise. Blank lines are
  skipped in both; line numbers count every physical line, from 1.

Prompts: a `prompt` goes through the chat template as a user message (after `system`, if any) unless `raw`;
`messages` always use the chat template. Seeds: a row's `seed`, else the default seed; a row samples with its own
generator, so it draws what a single-prompt run with that seed draws, whatever its batch mates (its tokens can
differ only where batched float sums round differently at a near-tie).

Output: `{"id", "text", "token_ids", "prompt_tokens", "finish_reason", "prompt_hash"}` (+ `"logprobs"`), written
and flushed as each row finishes, or `{"id", "error"}` naming the input line and the problem. Which output file a
run may write, and what `resume` skips, is `llamacli.batch_output`'s job (rows are keyed by id and prompt hash).
No typer or rich here: the CLI draws the progress from `on_progress`.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, TextIO

from llamacli import prompts
from llamacli.batch_output import prepare_output, prompt_hash, rows_to_run  # noqa: F401  (prepare_output: API)
from llamacli.errors import InputError, LlamaCliError, UsageError
from llamacli.request import Request, SamplingParams, check_seed
from llamacli.text import check_text, check_texts, text_problem

OVERRIDES = ("max_new_tokens", "temperature", "top_p", "top_k", "seed", "stop", "system")
JSONL_SUFFIXES = (".jsonl", ".ndjson", ".json")
TEXT_SUFFIXES = (".txt",)


@dataclass
class Row:
    """One input row: where it came from, its id, and either its prompt/messages or why it cannot run."""

    line: int
    where: str  # "line 4" (files) or "prompt 3" (the Python API): how errors name the row
    id: object
    prompt: str | None = None
    messages: list[dict] | None = None
    overrides: dict = field(default_factory=dict)
    error: str | None = None


@dataclass(frozen=True)
class BatchDefaults:
    """What a row does not override: the engine Request single-prompt generate would use, plus prompt options."""

    request: Request | None = None  # None = Request()
    system: str | None = None
    raw: bool = False
    # When max_new_tokens is only a default (not asked for), a row gets at most what its context has left,
    # as single-prompt generate does; a row's own max_new_tokens is never cut.
    cap_to_context: bool = False

    def __post_init__(self):
        if self.request is None:
            object.__setattr__(self, "request", Request())
        if self.raw and self.system:
            raise UsageError("a system message needs the chat template; it cannot be used with raw prompts")
        if self.system is not None:
            check_text(self.system, "the system message", UsageError)

    @classmethod
    def of(cls, **options) -> "BatchDefaults":
        """Defaults from flat options, as scripts write them: any Request or SamplingParams field, or a
        BatchDefaults one (`max_new_tokens=32, temperature=0.7, seed=1, system="...", raw=False`)."""
        from dataclasses import fields

        sampling_keys = {f.name for f in fields(SamplingParams)}
        request_keys = {f.name for f in fields(Request)} - {"sampling"}
        own_keys = {f.name for f in fields(cls)} - {"request"}
        unknown = set(options) - sampling_keys - request_keys - own_keys
        if unknown:
            raise UsageError(f"unknown batch option(s): {', '.join(sorted(unknown))}")
        pick = lambda keys: {k: v for k, v in options.items() if k in keys}  # noqa: E731
        request_opts = pick(request_keys)
        if "stop" in request_opts:
            request_opts["stop"] = tuple(request_opts["stop"])
        request = Request(sampling=SamplingParams(**pick(sampling_keys)), **request_opts)
        return cls(request=request, **pick(own_keys))

    def request_for(self, overrides: dict, prompt_len: int = 0, context: int | None = None):
        """The engine Request for a row with these overrides (UsageError on a bad value)."""
        from dataclasses import replace

        base = self.request
        sampling = {k: overrides[k] for k in ("temperature", "top_p", "top_k") if k in overrides}
        fields_ = {k: overrides[k] for k in ("max_new_tokens", "seed", "stop") if k in overrides}
        if self.cap_to_context and context is not None and "max_new_tokens" not in overrides:
            fields_["max_new_tokens"] = max(1, min(base.max_new_tokens, context - prompt_len))
        return replace(base, sampling=replace(base.sampling, **sampling), **fields_)


@dataclass
class BatchSummary:
    """What a run did: rows written (ok / failed), rows skipped by resume, tokens generated, wall time."""

    total: int = 0  # rows to do in this run (skipped ones excluded)
    ok: int = 0
    failed: int = 0
    skipped: int = 0
    generated_tokens: int = 0
    elapsed_s: float = 0.0
    errors: list[tuple[object, str]] = field(default_factory=list)

    @property
    def done(self) -> int:
        """Rows written so far."""
        return self.ok + self.failed

    @property
    def tokens_per_s(self) -> float:
        """Generated tokens per second of wall time so far."""
        return self.generated_tokens / self.elapsed_s if self.elapsed_s > 0 else 0.0


# -- reading rows ------------------------------------------------------------------------------------------------


def read_rows(path: str | Path) -> list[Row]:
    """Read and check every row of a JSONL or plain-text file ('-' = stdin); InputError if it cannot be read."""
    if str(path) == "-":
        data = sys.stdin.buffer.read() if hasattr(sys.stdin, "buffer") else sys.stdin.read().encode("utf-8")
        suffix = ""
    else:
        p = Path(path)
        if not p.exists():
            raise InputError(f"prompts file not found: {p}")
        if p.is_dir():
            raise InputError(f"prompts file is a directory: {p}")
        try:
            data = p.read_bytes()
        except OSError as exc:
            raise InputError(f"cannot read prompts file {p}: {exc.strerror or exc}") from None
        suffix = p.suffix.lower()
    lines = data.split(b"\n")
    if lines and lines[-1] == b"":
        lines.pop()
    if suffix in JSONL_SUFFIXES:
        jsonl = True
    elif suffix in TEXT_SUFFIXES:
        jsonl = False
    else:
        first = next((ln.strip() for ln in lines if ln.strip()), b"")
        jsonl = first.startswith(b"{")
    rows, first_line = [], {}
    for n, raw in enumerate(lines, start=1):
        where = f"line {n}"
        try:
            text = raw.decode("utf-8").removesuffix("\r")
        except UnicodeDecodeError as exc:
            rows.append(Row(n, where, n, error=f"{where}: not UTF-8 text ({exc.reason} at byte {exc.start})"))
            continue
        if n == 1:
            text = text.removeprefix("\ufeff")  # a byte-order mark from some editors
        if not text.strip():
            continue
        if jsonl:
            try:
                obj = json.loads(text)
            except json.JSONDecodeError as exc:
                rows.append(Row(n, where, n, error=f"{where}: malformed JSON ({exc.msg} at column {exc.colno})"))
                continue
            row = parse_row(obj, n, where, default_id=n)
        else:
            row = Row(n, where, n, prompt=text)
        _check_duplicate(row, first_line)
        rows.append(row)
    return rows


def parse_row(obj, line: int, where: str, default_id) -> Row:
    """Check one decoded row (a JSON object, or a str prompt); problems become the row's error."""
    if isinstance(obj, str):
        obj = {"prompt": obj}
    if not isinstance(obj, dict):
        return Row(line, where, default_id, error=f"{where}: expected a JSON object, got {type(obj).__name__}")
    rid = obj.get("id", default_id)
    row = Row(line, where, default_id)
    if rid is None or isinstance(rid, bool) or not isinstance(rid, (str, int)):
        row.error = f"{where}: id must be a string or an integer, got {rid!r}"
        return row
    if isinstance(rid, str) and text_problem(rid) is not None:
        row.error = f"{where}: id is not valid text ({text_problem(rid)})"  # the line number names it instead
        return row
    row.id = rid
    try:
        has_prompt, has_messages = "prompt" in obj, "messages" in obj
        if has_prompt and has_messages:
            raise UsageError("has both 'prompt' and 'messages' (give one)")
        if not has_prompt and not has_messages:
            raise UsageError("has neither 'prompt' nor 'messages'")
        if has_prompt:
            if not isinstance(obj["prompt"], str):
                raise UsageError(f"'prompt' must be a string, got {type(obj['prompt']).__name__}")
            row.prompt = check_text(obj["prompt"], "'prompt'", UsageError)
        else:
            row.messages = _check_messages(obj["messages"])
        row.overrides = _check_overrides({k: obj[k] for k in OVERRIDES if k in obj})
    except UsageError as exc:
        row.error = f"{where}: {exc}"
    return row


def _check_messages(messages) -> list[dict]:
    if not isinstance(messages, list) or not messages:
        raise UsageError("'messages' must be a non-empty list of {\"role\", \"content\"} objects")
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
            raise UsageError(f"messages[{i}] must be an object with string 'role' and 'content', got {m!r}")
        check_texts(m, f"messages[{i}]", UsageError)  # every field of a message reaches the chat template
    return messages


def _check_overrides(o: dict) -> dict:
    """Type-check the per-row overrides (ranges are checked when the Request is built)."""
    if "seed" in o:
        check_seed(o["seed"])
    if "stop" in o:
        stop = o["stop"]
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or any(not isinstance(s, str) or not s for s in stop):
            raise UsageError(f"stop must be a non-empty string or a list of them, got {o['stop']!r}")
        check_texts(stop, "stop", UsageError)
        o["stop"] = tuple(stop)
    if "system" in o and not isinstance(o["system"], str):
        raise UsageError(f"system must be a string, got {o['system']!r}")
    if "system" in o:
        check_text(o["system"], "system", UsageError)
    for name in ("temperature", "top_p"):
        if name in o and (isinstance(o[name], bool) or not isinstance(o[name], (int, float))):
            raise UsageError(f"{name} must be a number, got {o[name]!r}")
    for name in ("max_new_tokens", "top_k"):
        if name in o and (isinstance(o[name], bool) or not isinstance(o[name], int)):
            raise UsageError(f"{name} must be an integer, got {o[name]!r}")
    return o


def _check_duplicate(row: Row, first_line: dict) -> None:
    if row.error is not None:
        return
    key = (type(row.id), row.id)
    if key in first_line:
        row.error = f"{row.where}: duplicate id {row.id!r} (first used on {first_line[key]})"
    else:
        first_line[key] = row.where


# -- the output file: llamacli.batch_output (prepare_output, the resume keys) --------------------------------------


# -- running -----------------------------------------------------------------------------------------------------


def prompt_ids(engine, row: Row, defaults: BatchDefaults) -> list[int]:
    """Token ids of a row's prompt: chat template unless `raw` (for a `prompt`), system message first."""
    return prompts.encode_prompt(engine.tokenizer, engine.chat_template, prompt=row.prompt, messages=row.messages,
                                 system=row.overrides.get("system", defaults.system), raw=defaults.raw,
                                 config=engine.config)


def iter_results(engine, rows: list[Row], defaults: BatchDefaults, batch_size: int = 8) -> Iterator[tuple[Row, dict]]:
    """(row, result) for every row: the rows that cannot run first, then the others as they finish."""
    items, by_key = [], {}
    for i, row in enumerate(rows):
        error = row.error
        if error is None:
            try:
                ids = prompt_ids(engine, row, defaults)
                request = defaults.request_for(row.overrides, len(ids), engine.config.context_length)
                engine.check_fits(len(ids), request.max_new_tokens)
            except LlamaCliError as exc:
                error = f"{row.where}: {exc}"
        if error is not None:
            yield row, {"id": row.id, "error": error}
            continue
        items.append((i, ids, request))
        by_key[i] = (row, len(ids))
    for key, fin in engine.stream_batch(items, batch_size):
        row, n_prompt = by_key[key]
        result = {"id": row.id, "text": fin.text, "token_ids": fin.token_ids, "prompt_tokens": n_prompt,
                  "finish_reason": fin.reason}
        if fin.logprobs is not None:
            result["logprobs"] = fin.logprobs
        yield row, result


def run_batch(engine, rows: list[Row], defaults: BatchDefaults, out: TextIO, batch_size: int = 8,
              done_ids: dict | None = None, on_progress: Callable[[BatchSummary, dict], None] | None = None
              ) -> BatchSummary:
    """Generate for every row without a result in done_ids, writing one JSON line per row to `out` as each
    finishes, with the row's `prompt_hash` (see llamacli.batch_output for what resume counts as done).

    `done_ids` maps id keys to prompt hashes, as `prepare_output` reads them; `on_progress(summary, result)` is
    called after each row is written.
    """
    todo = rows_to_run(rows, done_ids or {})
    summary = BatchSummary(total=len(todo), skipped=len(rows) - len(todo))
    t0 = time.perf_counter()
    for row, result in iter_results(engine, todo, defaults, batch_size):
        if (h := prompt_hash(row)) is not None:
            result = {**result, "prompt_hash": h}
        out.write(json.dumps(result, ensure_ascii=False) + "\n")
        out.flush()
        if "error" in result:
            summary.failed += 1
            summary.errors.append((result["id"], result["error"]))
        else:
            summary.ok += 1
            summary.generated_tokens += len(result["token_ids"])
        summary.elapsed_s = time.perf_counter() - t0
        if on_progress is not None:
            on_progress(summary, result)
    summary.elapsed_s = time.perf_counter() - t0
    return summary


def generate_many(engine, prompts: list, *, batch_size: int = 8, **defaults) -> list[dict]:
    """Generate for each prompt (a str, or a dict shaped like a JSONL row); results in the same order.

    Keyword arguments are `BatchDefaults.of` options (max_new_tokens, temperature, seed, raw, ...). A result is
    `{"id", "text", "token_ids", "prompt_tokens", "finish_reason"}` or `{"id", "error"}` (a bad prompt does not
    stop the others); ids default to the prompt's index in the list.
    """
    settings = BatchDefaults.of(**defaults)
    rows, first = [], {}
    for i, p in enumerate(prompts):
        row = parse_row(p, i, f"prompt {i}", default_id=i)
        _check_duplicate(row, first)
        rows.append(row)
    results: list[dict | None] = [None] * len(rows)
    for row, result in iter_results(engine, rows, settings, batch_size):
        results[row.line] = result
    return results

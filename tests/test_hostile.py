"""Property tests: random and hostile batch rows and chat lines never end a run. Every good row is produced,
every bad one is reported with its line, nothing prints a traceback, and the exit code is 0 or 1.

The engine is loaded once (the CLI's `load_engine` is patched to hand it out); each example runs the real
`generate --prompts-file` and piped `chat` commands through Typer's CliRunner.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from llamacli.cli import app
from llamacli.generation import Engine
from tests.conftest import write_tiny_chat_checkpoint

runner = CliRunner()
SETTINGS = settings(max_examples=6, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    """A tiny chat checkpoint whose engine every command in this module gets without loading it again."""
    folder = write_tiny_chat_checkpoint(tmp_path_factory.mktemp("hostile") / "ckpt", max_position_embeddings=64)
    engine = Engine.load(folder, dtype="float32", device="cpu")
    with pytest.MonkeyPatch.context() as mp:
        for module in ("llamacli.cli.generate", "llamacli.cli.chat"):
            mp.setattr(f"{module}.load_engine", lambda *args, **kwargs: (engine, folder, 0.0))
        yield folder


# -- batch rows -------------------------------------------------------------------------------------------------

TEXT = st.text(st.characters(blacklist_categories=("Cs",)), max_size=12)  # valid text only
LONE = st.sampled_from(["\udcff", "\ud800", "a\udfffb"])
JSON_LEAF = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | TEXT
JSON_ANY = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3)
                        | st.dictionaries(TEXT, inner, max_size=3), max_leaves=6)
HUGE = st.integers(min_value=2**63, max_value=2**200) | st.integers(max_value=-1)


def dumps(obj) -> bytes:
    return json.dumps(obj).encode()  # ensure_ascii: lone surrogates become \udcff escapes, valid JSON


GOOD = st.builds(lambda text: {"prompt": text}, TEXT)
BAD = st.one_of(
    JSON_ANY.filter(lambda v: not isinstance(v, (dict, str))).map(dumps),         # not an object (nor a string)
    st.dictionaries(TEXT.filter(lambda k: k not in ("prompt", "messages", "id")), JSON_ANY, max_size=3).map(dumps),
    JSON_ANY.filter(lambda v: not isinstance(v, str)).map(lambda v: dumps({"prompt": v})),  # wrong prompt type
    JSON_ANY.filter(lambda v: not isinstance(v, list) or not v).map(lambda v: dumps({"messages": v})),
    st.builds(lambda v: dumps({"messages": [{"role": "user", "content": v}]}),
              JSON_ANY.filter(lambda v: not isinstance(v, str)) | LONE),
    LONE.map(lambda s: dumps({"prompt": s})),                                       # valid JSON, not valid text
    LONE.map(lambda s: dumps({"prompt": "x", "stop": [s]})),
    LONE.map(lambda s: dumps({"prompt": "x", "system": s})),
    LONE.map(lambda s: dumps({"id": s, "prompt": "x"})),
    HUGE.map(lambda n: dumps({"prompt": "x", "seed": n})),                          # huge numbers
    HUGE.map(lambda n: dumps({"prompt": "x", "max_new_tokens": n})),
    st.sampled_from(["many", True, None, 2.5, [1]]).map(lambda v: dumps({"prompt": "x", "top_k": v})),
    st.sampled_from([-1.0, 7, "hot"]).map(lambda v: dumps({"prompt": "x", "top_p": v})),
    st.binary(min_size=1, max_size=8).map(lambda b: b'{"prompt": "' + b"\xff" + b.replace(b"\n", b"") + b'"}'),
    st.sampled_from([b'{"prompt": ', b"{", b'{"prompt": "x"', b"{'prompt': 'x'}"]),  # malformed JSON
)
ROW = st.one_of(st.tuples(st.just("good"), GOOD), st.tuples(st.just("bad"), BAD),
                st.tuples(st.just("blank"), st.sampled_from([b"", b"   ", b"\t"])))


@SETTINGS
@given(rows=st.lists(ROW, min_size=1, max_size=6))
def test_random_batch_rows_never_end_the_run(model, tmp_path_factory, rows):
    lines, good, bad = [], {}, []
    for n, (kind, value) in enumerate(rows, start=1):
        if kind == "good":
            value = {**value, "id": f"good-{n}"}
            good[value["id"]] = n
            value = dumps(value)
        elif kind == "bad":
            bad.append(n)
        lines.append(value)
    src = tmp_path_factory.mktemp("rows") / "rows.jsonl"
    src.write_bytes(b"\n".join(lines) + b"\n")
    result = runner.invoke(app, ["generate", "--model", str(model), "--prompts-file", str(src), "-n", "2"])
    assert "Traceback" not in result.stdout + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code == (1 if bad else 0), result.stderr
    out = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(out) == len(good) + len(bad)
    produced = {r["id"] for r in out if "error" not in r}
    assert produced == set(good), result.stdout
    reported = sorted(r["id"] for r in out if "error" in r)
    assert reported == bad, result.stdout
    for r in out:
        if "error" in r:
            assert r["error"].startswith(f"line {r['id']}: ") and "\n" not in r["error"]


# -- chat lines on standard input ---------------------------------------------------------------------------------

LINE = st.one_of(
    TEXT.map(lambda s: s.encode()),
    st.binary(max_size=12),                               # mostly not UTF-8
    st.sampled_from([b"", b"  ", b"\r", b"hello there", "\u00e9t\u00e9 \U0001f600".encode(), b"x" * 300]),
).map(lambda b: b.replace(b"\n", b" ")).filter(lambda b: not b.lstrip().startswith(b"/"))  # no /commands


def expected_reply(line: bytes) -> str | None:
    """'error' for a line that is not UTF-8, None for a blank line (no turn), else 'reply'."""
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError:
        return "error"
    return None if not text.strip() else "reply"


@SETTINGS
@given(lines=st.lists(LINE, min_size=1, max_size=5))
def test_random_chat_lines_get_one_output_line_each(model, lines):
    result = runner.invoke(app, ["chat", "--model", str(model), "-n", "2", "--json"],
                           input=b"".join(line + b"\n" for line in lines))
    assert "Traceback" not in result.stdout + result.stderr
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    assert result.exit_code in (0, 1)
    expected = [(n, kind) for n, kind in enumerate(map(expected_reply, lines), start=1) if kind is not None]
    replies = [json.loads(line) for line in result.stdout.splitlines()]
    assert len(replies) == len(expected), (lines, result.stdout, result.stderr)
    for (n, kind), reply in zip(expected, replies):
        if kind == "error":
            assert reply["finish_reason"] == "error"
            assert reply["error"].startswith(f"line {n} of standard input is not UTF-8 ("), reply
        elif reply["finish_reason"] == "error":  # a turn may fail (a line too long for the context), one line
            assert "\n" not in reply["error"] and f"error: {reply['error']}" in result.stderr
    assert result.exit_code == (1 if any(r["finish_reason"] == "error" for r in replies) else 0)

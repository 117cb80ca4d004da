"""The batch output file (`llamacli.batch_output`), through the CLI where users meet it: the output is never the
input, results are never truncated or lost, resume never attributes a result to the wrong prompt, and a double
Ctrl-C exits quietly with the rows kept."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from llamacli.batch import prepare_output, read_rows
from llamacli.cli import app
from llamacli.errors import InputError, UsageError
from tests.conftest import write_tiny_chat_checkpoint

ROOT = Path(__file__).resolve().parents[1]
runner = CliRunner()


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    return write_tiny_chat_checkpoint(tmp_path_factory.mktemp("batch-out") / "ckpt")


def invoke(*args):
    return runner.invoke(app, [str(a) for a in args])


def jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").split("\n") if line.strip()]


def prompts(path: Path, texts: list[str], ids: bool = True) -> Path:
    rows = [({"id": f"q{i}"} if ids else {}) | {"prompt": t} for i, t in enumerate(texts)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return path


def run(chat_dir, src, out, *flags):
    return invoke("generate", "--model", chat_dir, "--prompts-file", src, "-o", out, "-n", "3", *flags)


# -- 1. the output is never the input ------------------------------------------------------------------------


@pytest.mark.parametrize("how", ["same", "symlink", "hardlink"])
@pytest.mark.parametrize("flags", [[], ["--resume"], ["--overwrite"]])
def test_output_that_is_the_prompts_file_is_refused_before_the_model_loads(tmp_path, how, flags):
    src = prompts(tmp_path / "a.jsonl", ["hello", "world"])
    before = src.read_bytes()
    out = src
    if how == "symlink":
        out = tmp_path / "link.jsonl"
        out.symlink_to(src)
    elif how == "hardlink":
        out = tmp_path / "hard.jsonl"
        os.link(src, out)
    result = invoke("generate", "--model", tmp_path / "no-such-model", "--prompts-file", src, "-o", out, *flags)
    assert result.exit_code == 2, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: --output {out} is the prompts file {src}") and "no-such-model" not in line
    assert src.read_bytes() == before


def test_output_that_stdin_is_read_from_is_refused(tmp_path):
    src = prompts(tmp_path / "a.jsonl", ["hello"])
    with open(src, "rb") as stdin:
        proc = subprocess.run([sys.executable, "-m", "llamacli", "generate", "--model", str(tmp_path / "none"),
                               "--prompts-file", "-", "-o", str(src)], stdin=stdin, capture_output=True, text=True,
                              timeout=120, cwd=ROOT)
    assert proc.returncode == 2 and "is standard input" in proc.stderr and "Traceback" not in proc.stderr
    assert jsonl(src) == [{"id": "q0", "prompt": "hello"}]


# -- 2. results are never truncated or lost --------------------------------------------------------------------


def test_a_non_empty_output_needs_resume_or_overwrite(tmp_path):
    src = prompts(tmp_path / "in.jsonl", ["hello"])
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "old", "text": "precious"}\n')
    result = invoke("generate", "--model", tmp_path / "no-such-model", "--prompts-file", src, "-o", out)
    assert result.exit_code == 2
    assert result.stderr.startswith(f"error: output {out} already holds results (")
    assert "--resume" in result.stderr and "--overwrite" in result.stderr
    assert out.read_text() == '{"id": "old", "text": "precious"}\n'
    both = invoke("generate", "--model", tmp_path / "m", "--prompts-file", src, "-o", out, "--resume", "--overwrite")
    assert both.exit_code == 2 and "not both" in both.stderr
    single = invoke("generate", "--model", tmp_path / "m", "--prompt", "hi", "--overwrite")
    assert single.exit_code == 2 and "belong to batch mode" in single.stderr
    (tmp_path / "empty.jsonl").write_text("")  # an empty file holds nothing to lose
    done, _ = prepare_output(tmp_path / "empty.jsonl")
    assert done == {}


def failing_stream(monkeypatch, rows_before_failure: int, error: type[BaseException]):
    """Make the engine write `rows_before_failure` rows, then fail with `error` (a crash, or Ctrl-C)."""
    from llamacli.generation import Engine

    real = Engine.stream_batch

    def stream_batch(self, items, batch_size):
        for n, item in enumerate(real(self, items, batch_size)):
            if n == rows_before_failure:
                raise error("the machine fell over")
            yield item
        raise error("the machine fell over")

    monkeypatch.setattr(Engine, "stream_batch", stream_batch)


@pytest.mark.parametrize("error, code", [(RuntimeError, 1), (KeyboardInterrupt, 130)])
def test_overwrite_keeps_the_old_file_until_the_new_run_has_rows(chat_dir, tmp_path, monkeypatch, error, code):
    src = prompts(tmp_path / "in.jsonl", ["one", "two", "three"])
    out = tmp_path / "out.jsonl"
    old = '{"id": "q0", "text": "old"}\n{"id": "q1", "text": "old"}\n'
    out.write_text(old)
    failing_stream(monkeypatch, 0, error)  # fails before its first row
    result = run(chat_dir, src, out, "--overwrite")
    assert result.exit_code == code, result.output
    assert out.read_text() == old and sorted(p.name for p in tmp_path.iterdir()) == ["in.jsonl", "out.jsonl"]
    monkeypatch.undo()
    failing_stream(monkeypatch, 2, error)  # fails after two rows: they replace the old file, resumable
    result = run(chat_dir, src, out, "--overwrite")
    assert result.exit_code == code
    partial = jsonl(out)
    assert len(partial) == 2 and all("prompt_hash" in r and r["text"] != "old" for r in partial)
    monkeypatch.undo()
    resumed = run(chat_dir, src, out, "--resume")
    assert resumed.exit_code == 0 and "2 skipped" in resumed.stderr
    assert sorted(r["id"] for r in jsonl(out)) == ["q0", "q1", "q2"]


def test_overwrite_replaces_the_file_when_the_run_ends(chat_dir, tmp_path):
    src = prompts(tmp_path / "in.jsonl", ["one", "two"])
    out = tmp_path / "out.jsonl"
    out.write_text('{"id": "zz", "text": "old"}\n')
    result = run(chat_dir, src, out, "--overwrite")
    assert result.exit_code == 0, result.output
    assert sorted(r["id"] for r in jsonl(out)) == ["q0", "q1"]


# -- 4. resume never attributes a result to the wrong prompt ---------------------------------------------------


def test_resume_after_lines_were_inserted_refuses_rather_than_skipping_the_wrong_prompts(chat_dir, tmp_path):
    src = prompts(tmp_path / "in.jsonl", ["alpha", "beta"], ids=False)  # ids are line numbers 1, 2
    out = tmp_path / "out.jsonl"
    assert run(chat_dir, src, out).exit_code == 0
    before = out.read_bytes()
    prompts(src, ["new first prompt", "alpha", "beta"], ids=False)  # every line number moved
    result = run(chat_dir, src, out, "--resume")
    assert result.exit_code == 1
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: cannot resume: the output's result for id 1 (line 1 of the input) was made "
                           "from another prompt; 2 row(s) differ")
    assert out.read_bytes() == before
    # Appending keeps the line numbers: the old rows count as done, only the new one runs.
    prompts(src, ["alpha", "beta", "gamma"], ids=False)
    result = run(chat_dir, src, out, "--resume")
    assert result.exit_code == 0 and "2 skipped" in result.stderr
    assert [r["id"] for r in jsonl(out)] == [1, 2, 3]


def test_resume_refuses_an_edited_prompt_or_override_and_rows_without_a_hash(chat_dir, tmp_path):
    src = prompts(tmp_path / "in.jsonl", ["alpha", "beta"])
    out = tmp_path / "out.jsonl"
    assert run(chat_dir, src, out).exit_code == 0
    src.write_text('{"id": "q0", "prompt": "alpha"}\n{"id": "q1", "prompt": "beta", "temperature": 0.5}\n')
    result = run(chat_dir, src, out, "--resume")
    assert result.exit_code == 1 and "result for id 'q1' (line 2 of the input) was made from another" in result.stderr
    out.write_text('{"id": "q0", "text": "from an older llamacli"}\n')
    result = run(chat_dir, src, out, "--resume")
    assert result.exit_code == 1 and "has no prompt_hash (written by an older llamacli)" in result.stderr


def test_resume_replaces_retried_error_rows_and_keeps_a_last_row_without_newline(chat_dir, tmp_path):
    src = prompts(tmp_path / "in.jsonl", ["alpha", "beta", "gamma"])
    full = tmp_path / "full.jsonl"
    assert run(chat_dir, src, full).exit_code == 0
    by_id = {r["id"]: r for r in jsonl(full)}
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps({"id": "q1", "error": "line 2: transient"}) + "\n"
                   + json.dumps({"id": "elsewhere", "error": "not in this input"}) + "\n"
                   + json.dumps(by_id["q0"]), encoding="utf-8")  # complete, its newline missing
    rows = read_rows(src)
    done, _ = prepare_output(out, resume=True, rows=rows)
    assert set(done) == {("str", "q0")}
    result = run(chat_dir, src, out, "--resume")
    assert result.exit_code == 0, result.output
    assert "1 skipped" in result.stderr  # q0 was not generated again
    got = jsonl(out)
    assert sorted(r["id"] for r in got) == ["elsewhere", "q0", "q1", "q2"]  # one row per id
    assert {r["id"]: r for r in got}["q0"] == by_id["q0"] and out.read_text().endswith("\n")
    # A row cut short by an interruption is dropped and generated again.
    out.write_text(json.dumps(by_id["q0"]) + "\n" + json.dumps(by_id["q1"])[:30])
    result = run(chat_dir, src, out, "--resume")
    assert result.exit_code == 0 and "1 skipped" in result.stderr
    assert sorted(r["id"] for r in jsonl(out)) == ["q0", "q1", "q2"]


def test_prepare_output_python_api_checks(tmp_path):
    src = prompts(tmp_path / "in.jsonl", ["a"])
    with pytest.raises(UsageError, match="is the prompts file"):
        prepare_output(src, source=src)
    with pytest.raises(UsageError, match="--overwrite needs an --output file"):
        prepare_output("-", overwrite=True)
    out = tmp_path / "out.jsonl"
    out.write_text("not json\n")
    with pytest.raises(InputError, match="line 1 of .* is not a JSON row"):
        prepare_output(out, resume=True, rows=read_rows(src))


# -- 13. a double Ctrl-C ---------------------------------------------------------------------------------------


def test_repeated_ctrl_c_exits_quietly_with_130_and_keeps_the_rows(chat_dir, tmp_path):
    src = prompts(tmp_path / "in.jsonl", [f"question number {i}" for i in range(200)])
    out = tmp_path / "out.jsonl"
    proc = subprocess.Popen([sys.executable, "-m", "llamacli", "generate", "--model", str(chat_dir),
                             "--prompts-file", str(src), "-o", str(out), "-n", "100", "--ignore-eos",
                             "--batch-size", "2"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    try:
        while not out.exists() or out.stat().st_size == 0:  # rows are being written
            assert proc.poll() is None, proc.communicate()
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        # Keep pressing Ctrl-C while it stops: each one lands somewhere in its cleanup or Python's exit.
        while proc.poll() is None:
            proc.send_signal(signal.SIGINT)
            time.sleep(0.002)
        _, stderr = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and "Exception ignored" not in stderr, stderr
    assert "interrupted: " in stderr and "--resume" in stderr
    rows = jsonl(out)  # every line is a complete row
    assert rows and all("text" in r for r in rows)

"""Every script in examples/ runs on the real SmolLM2 checkpoint and says what the API says."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from llamacli.generation import Engine, Request

pytestmark = pytest.mark.slow
EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def run(script: str, *args: str) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, str(EXAMPLES / script), *map(str, args)], capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return proc


@pytest.fixture(scope="module")
def engine(smollm2_dir):
    return Engine.load(smollm2_dir, dtype="float32", device="cpu")


def test_every_example_is_covered():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(
        ["batch_generate.py", "chat.py", "generate.py", "inspect_model.py"])


def test_generate_example_prints_the_greedy_reply(smollm2_dir, engine):
    out = run("generate.py", smollm2_dir, "What is the capital of France?", 24).stdout
    ids = engine.chat_ids([{"role": "user", "content": "What is the capital of France?"}])
    assert out == engine.generate(ids, Request(max_new_tokens=24)).text
    assert "Paris" in out


def test_chat_example_reuses_the_cache(smollm2_dir):
    out = run("chat.py", smollm2_dir, "Name a color.", "Name another one.").stdout
    assert "> Name a color." in out and "> Name another one." in out
    counts = [line.strip() for line in out.splitlines() if "prompt tokens prefilled" in line]
    assert len(counts) == 2
    first = counts[0].strip("[]").split()
    second = counts[1].strip("[]").split()
    assert first[0] == first[2]  # turn 1 prefills its whole prompt
    assert int(second[0]) < int(second[2])  # turn 2 only what is new


def test_inspect_example_shows_the_shape(smollm2_dir):
    out = run("inspect_model.py", smollm2_dir).stdout
    assert "30 layers" in out and "attention: 9 heads, 3 KV heads, head dim 64" in out


def test_batch_example_prints_one_row_per_prompt(smollm2_dir, engine):
    lines = run("batch_generate.py", smollm2_dir).stdout.splitlines()
    rows = [json.loads(line) for line in lines]
    assert [r["id"] for r in rows][1:3] == ["haiku", "chat"] and len(rows) == 4
    for row in rows:
        assert row["finish_reason"] in ("stop", "length") and row["token_ids"]
        assert row["text"] == engine.tokenizer.decode(
            [t for t in row["token_ids"] if t not in engine.eos_ids], skip_special_tokens=True)

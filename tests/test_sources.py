"""`--model` resolution: local folders, GGUF files (converted once), hub repo ids from an offline cache."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from llamacli.errors import InputError, UsageError
from llamacli.sources import HUB_PATTERNS, looks_like_repo_id, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"
OTHER_COMMIT = "fedcba9876543210fedcba9876543210fedcba98"


def lay_out_hub_cache(hf_home: Path, repo_id: str, folder: Path, commit: str = COMMIT,
                      refs: tuple[str, ...] = ("main",)) -> Path:
    """Write a hub cache entry as huggingface_hub does: blobs are plain copies here, refs name the commit."""
    org, name = repo_id.split("/")
    repo = hf_home / "hub" / f"models--{org}--{name}"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    for f in folder.iterdir():
        shutil.copyfile(f, snapshot / f.name)
    (repo / "refs").mkdir(exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).write_text(commit)
    return snapshot


@pytest.fixture
def offline_hub(tmp_path, monkeypatch, tiny_chat_dir):
    """HF_HOME with `acme/tiny` cached at main and tag v1, and HF_HUB_OFFLINE=1; yields HF_HOME."""
    hf_home = tmp_path / "hf"
    lay_out_hub_cache(hf_home, "acme/tiny", tiny_chat_dir, refs=("main", "v1"))
    monkeypatch.setenv("HF_HOME", str(hf_home))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return hf_home


def test_local_folder_is_returned_as_is(tiny_dir):
    assert resolve_model(str(tiny_dir)) == tiny_dir


def test_missing_path_is_an_input_error(tmp_path):
    with pytest.raises(InputError, match="model not found: .*nothing-here"):
        resolve_model(str(tmp_path / "nothing-here"))


def test_a_file_that_is_not_gguf_is_refused(tmp_path):
    f = tmp_path / "weights.bin"
    f.write_bytes(b"x")
    with pytest.raises(InputError, match="not a checkpoint folder or a .gguf file"):
        resolve_model(str(f))


def test_missing_gguf_file_is_named(tmp_path):
    with pytest.raises(InputError, match="GGUF file not found"):
        resolve_model(str(tmp_path / "model.gguf"))


def test_revision_with_a_local_path_is_a_usage_error(tiny_dir):
    with pytest.raises(UsageError, match="--revision applies to hub repo ids only"):
        resolve_model(str(tiny_dir), revision="main")


@pytest.mark.parametrize("spec, is_repo", [
    ("HuggingFaceTB/SmolLM2-135M-Instruct", True), ("meta-llama/Llama-3.2-1B", True), ("a/b", True),
    ("./a/b", False), ("/abs/path", False), ("a/b/c", False), ("plain", False), ("a/b.gguf", False),
    ("a--b/c", False), ("a/../b", False), ("~/x", False),
])
def test_repo_id_shape(spec, is_repo):
    assert looks_like_repo_id(spec) is is_repo


def test_gguf_file_goes_through_the_conversion_cache(tmp_path, monkeypatch):
    import llamacli.gguf

    calls = []
    target = tmp_path / "converted"

    def fake(src, dtype="bfloat16", cache_root=None, progress=None):
        calls.append((Path(src), dtype))
        return target

    monkeypatch.setattr(llamacli.gguf, "cached_conversion", fake)
    src = tmp_path / "m.gguf"
    src.write_bytes(b"GGUF")
    assert resolve_model(str(src)) == target
    assert resolve_model(str(src), dtype="float32") == target
    assert resolve_model(str(src), dtype="auto") == target
    assert calls == [(src, "bfloat16"), (src, "float32"), (src, "bfloat16")]


def test_real_gguf_converts_once_and_runs(tmp_path, monkeypatch):
    """A tiny llama GGUF (written like llama.cpp does) resolves to a converted folder, reused the second time."""
    from tests.test_gguf import bpe_vocab, byte_level_tokenizer, export_gguf, tiny_hf_model

    tok = byte_level_tokenizer("smollm")
    vocab = bpe_vocab(tok, "smollm")
    src = tmp_path / "tiny.gguf"
    export_gguf(src, tiny_hf_model(len(vocab["tokens"])), vocab)
    monkeypatch.setenv("LLAMACLI_CACHE", str(tmp_path / "cache"))
    first = resolve_model(str(src), dtype="float32")
    assert (first / "config.json").is_file() and list(first.glob("*.safetensors"))
    assert first.is_relative_to(tmp_path / "cache")
    mtime = (first / "config.json").stat().st_mtime_ns
    assert resolve_model(str(src), dtype="float32") == first
    assert (first / "config.json").stat().st_mtime_ns == mtime  # not converted again

    from llamacli.generation import Engine
    from llamacli.generation import Request

    engine = Engine.load(first, dtype="float32", device="cpu")
    out = engine.generate(engine.raw_ids("Hello world"), Request(max_new_tokens=3, ignore_eos=True))
    assert len(out.token_ids) == 3

    from typer.testing import CliRunner

    from llamacli.cli import app

    cli = CliRunner().invoke(app, ["generate", "--model", str(src), "--dtype", "float32", "--raw", "--prompt",
                                   "Hello world", "-n", "3", "--ignore-eos", "--json"])
    assert cli.exit_code == 0, cli.stderr
    assert json.loads(cli.stdout)["token_ids"] == out.token_ids
    inspected = CliRunner().invoke(app, ["inspect", "--model", str(src), "--dtype", "float32", "--json"])
    assert json.loads(inspected.stdout)["path"] == str(first)


def test_hub_repo_resolves_from_the_offline_cache(offline_hub):
    folder = resolve_model("acme/tiny")
    assert folder == offline_hub / "hub" / "models--acme--tiny" / "snapshots" / COMMIT
    assert (folder / "config.json").is_file()


def test_hub_revision_by_tag_and_by_commit(offline_hub, tiny_dir):
    lay_out_hub_cache(offline_hub, "acme/tiny", tiny_dir, commit=OTHER_COMMIT, refs=("v2",))
    assert resolve_model("acme/tiny", revision="v1").name == COMMIT
    assert resolve_model("acme/tiny", revision="v2").name == OTHER_COMMIT
    assert resolve_model("acme/tiny", revision=OTHER_COMMIT).name == OTHER_COMMIT


def test_hub_repo_not_in_the_offline_cache_is_a_clear_error(offline_hub):
    with pytest.raises(InputError, match=r"model not found: acme/other is not a local folder and not in the hub "
                                         r"cache \(HF_HUB_OFFLINE is set"):
        resolve_model("acme/other")
    with pytest.raises(InputError, match=r"acme/tiny \(revision nope\)"):
        resolve_model("acme/tiny", revision="nope")


def test_hf_hub_cache_wins_over_hf_home(offline_hub, monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_CACHE", str(offline_hub / "hub"))
    monkeypatch.setenv("HF_HOME", str(tmp_path / "elsewhere"))
    assert resolve_model("acme/tiny").name == COMMIT


def test_snapshot_download_is_limited_to_the_files_we_read(monkeypatch, tmp_path):
    import huggingface_hub

    seen = {}

    def fake(repo_id, **kwargs):
        seen.update(kwargs, repo_id=repo_id)
        return str(tmp_path)

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    assert resolve_model("org/name", revision="abc") == tmp_path
    assert seen["repo_id"] == "org/name" and seen["revision"] == "abc"
    assert seen["cache_dir"] == tmp_path / "home" / "hub" and seen["local_files_only"] is False
    assert sorted(seen["allow_patterns"]) == sorted(HUB_PATTERNS)
    for wanted in ("config.json", "generation_config.json", "tokenizer.json", "tokenizer.model",
                   "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json", "chat_template.jinja",
                   "*.safetensors", "model.safetensors.index.json"):
        assert wanted in seen["allow_patterns"]
    assert not any(p.endswith((".bin", ".pth", ".gguf")) for p in seen["allow_patterns"])


def test_cli_generate_from_an_offline_hub_cache_in_a_subprocess(tmp_path, tiny_chat_dir):
    """The real thing: HF_HOME + HF_HUB_OFFLINE in the environment of a fresh process."""
    hf_home = tmp_path / "hf"
    lay_out_hub_cache(hf_home, "acme/tiny", tiny_chat_dir)
    env = {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1"}
    env.pop("HF_HUB_CACHE", None)
    ok = subprocess.run([sys.executable, "-m", "llamacli", "generate", "--model", "acme/tiny", "--raw",
                         "--prompt", "Hello", "--max-new-tokens", "4", "--ignore-eos", "--json"],
                        capture_output=True, text=True, env=env, timeout=120)
    assert ok.returncode == 0, ok.stderr
    assert len(json.loads(ok.stdout)["token_ids"]) == 4
    missing = subprocess.run([sys.executable, "-m", "llamacli", "generate", "--model", "acme/absent",
                              "--prompt", "Hello"], capture_output=True, text=True, env=env, timeout=120)
    assert missing.returncode == 1 and missing.stdout == ""
    assert missing.stderr.startswith("error: model not found: acme/absent") and missing.stderr.count("\n") == 1

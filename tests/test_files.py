"""llamacli.files: atomic file replace, atomic folder creation/replacement, same-file checks."""

from __future__ import annotations

import os
import stat

import pytest

from llamacli import files
from llamacli.errors import InputError, UsageError


def debris(folder) -> list[str]:
    """Temporary files or folders the helpers left behind."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def test_replacing_writes_the_new_content_only_at_the_end(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old results\n")
    with files.replacing(target) as f:
        f.write("new ")
        assert target.read_text() == "old results\n"  # not touched while writing
        f.write("results\n")
    assert target.read_text() == "new results\n" and debris(tmp_path) == []


@pytest.mark.parametrize("error", [RuntimeError, KeyboardInterrupt])
def test_replacing_keeps_the_old_file_when_the_write_fails(tmp_path, error):
    target = tmp_path / "out.txt"
    target.write_text("old results\n")
    with pytest.raises(error):
        with files.replacing(target) as f:
            f.write("half of the new")
            raise error()
    assert target.read_text() == "old results\n" and debris(tmp_path) == []


def test_replacing_keeps_a_partial_file_when_asked(tmp_path):
    target = tmp_path / "out.txt"
    target.write_text("old\n")
    keep = lambda f: f.tell() > 0  # noqa: E731
    with pytest.raises(KeyboardInterrupt):
        with files.replacing(target, keep_on_error=keep) as f:
            f.write("row 1\n")
            raise KeyboardInterrupt
    assert target.read_text() == "row 1\n"
    with pytest.raises(KeyboardInterrupt):
        with files.replacing(target, keep_on_error=keep):
            raise KeyboardInterrupt  # nothing written: the old file stays
    assert target.read_text() == "row 1\n" and debris(tmp_path) == []


def test_replacing_through_a_symlink_changes_the_target_and_keeps_the_link_and_mode(tmp_path):
    real = tmp_path / "real.txt"
    real.write_text("old")
    real.chmod(0o640)
    link = tmp_path / "link.txt"
    link.symlink_to(real)
    files.write_text(link, "new")
    assert link.is_symlink() and real.read_text() == "new"
    assert stat.S_IMODE(real.stat().st_mode) == 0o640
    files.write_bytes(tmp_path / "fresh.bin", b"\x00\x01")
    assert stat.S_IMODE((tmp_path / "fresh.bin").stat().st_mode) == 0o666 & ~files.umask()  # not mkstemp's 0600


def test_same_file_sees_symlinks_hard_links_and_descriptors(tmp_path):
    a = tmp_path / "a.jsonl"
    a.write_text("x")
    (tmp_path / "sym").symlink_to(a)
    os.link(a, tmp_path / "hard")
    other = tmp_path / "b.jsonl"
    other.write_text("x")
    assert files.same_file(a, tmp_path / "sym") and files.same_file(a, tmp_path / "hard")
    assert not files.same_file(a, other) and not files.same_file(a, tmp_path / "missing")
    with open(a) as f:
        assert files.same_file(f.fileno(), tmp_path / "sym")


def test_check_writable_creates_nothing_and_names_the_problem(tmp_path):
    files.check_writable(tmp_path / "new.jsonl")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(InputError, match="is a directory"):
        files.check_writable(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        files.check_writable(tmp_path / "no" / "out.jsonl")


def test_new_folder_appears_whole_or_not_at_all(tmp_path):
    dest = tmp_path / "parent" / "ckpt"
    with pytest.raises(RuntimeError):
        with files.new_folder(dest) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError("conversion failed")
    assert not dest.exists() and debris(tmp_path / "parent") == []
    with files.new_folder(dest) as tmp:
        (tmp / "config.json").write_text("{}")
        assert not dest.exists()
    assert sorted(p.name for p in dest.iterdir()) == ["config.json"]
    assert stat.S_IMODE(dest.stat().st_mode) == 0o777 & ~files.umask()  # not mkdtemp's 0700
    empty = tmp_path / "empty"
    empty.mkdir()
    with files.new_folder(empty) as tmp:  # an empty folder is taken as new
        (tmp / "a").write_text("a")
    assert (empty / "a").is_file()


def test_new_folder_refuses_a_non_empty_one_and_replaces_it_whole_with_overwrite(tmp_path):
    dest = tmp_path / "ckpt"
    dest.mkdir()
    (dest / "old-shard.safetensors").write_text("old")
    with pytest.raises(files.NotEmptyError, match="exists and is not empty"):
        with files.new_folder(dest):
            pass
    assert isinstance(files.NotEmptyError("x"), UsageError)  # exit code 2: the user chooses
    with pytest.raises(RuntimeError):
        with files.new_folder(dest, overwrite=True) as tmp:
            (tmp / "config.json").write_text("{}")
            raise RuntimeError
    assert sorted(p.name for p in dest.iterdir()) == ["old-shard.safetensors"]  # a failure keeps the old one
    with files.new_folder(dest, overwrite=True) as tmp:
        (tmp / "config.json").write_text("{}")
    assert sorted(p.name for p in dest.iterdir()) == ["config.json"] and debris(tmp_path) == []
    (tmp_path / "file").write_text("x")
    with pytest.raises(InputError, match="not a folder"):
        with files.new_folder(tmp_path / "file", overwrite=True):
            pass

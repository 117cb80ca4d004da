"""Safe writes: every file and folder llamacli writes goes through here, so that no failure destroys what was there.

- `replacing(path)`: write a file beside its destination and rename it over the old one only when done
  (temporary file in the same folder, fsync, `os.replace`); on an error the old file stays as it was.
- `new_folder(dest)`: build a folder beside its destination and rename it into place when done; a non-empty
  destination is refused unless `overwrite`, and then replaced only once the new folder is complete.
- `same_file(a, b)`: whether two paths (or an open file) are one file: symlinks and hard links included.
- `check_writable(path)`: whether a file could be created or replaced here, without creating or changing anything.

Torch-free and dependency-free: the conversion, the batch output and anything later use the same helpers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import stat
import tempfile
from pathlib import Path
from typing import IO, Callable, Iterator

from llamacli.errors import InputError, UsageError


class NotEmptyError(UsageError):
    """The destination folder exists and holds files: choose another, or pass overwrite (exit 2)."""


def umask() -> int:
    """The process umask, read without changing it (Linux /proc), else the usual 022."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    return 0o022


def make_readable(path: str | Path, folder: bool = False) -> None:
    """Give a file made by mkstemp/mkdtemp or safetensors (0600/0700) the mode a plain open/mkdir gives."""
    os.chmod(path, (0o777 if folder else 0o666) & ~umask())


def same_file(a: str | Path | int, b: str | Path | int) -> bool:
    """Whether a and b (paths, or open file descriptors) are the same file; False if either does not exist."""
    try:
        sa = os.fstat(a) if isinstance(a, int) else os.stat(a)
        sb = os.fstat(b) if isinstance(b, int) else os.stat(b)
    except OSError:
        return False
    return (sa.st_dev, sa.st_ino) == (sb.st_dev, sb.st_ino)


def is_regular(path: str | Path) -> bool:
    """Whether path is a regular file (after symlinks): a device or a pipe is written in place, never replaced."""
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _target(path: str | Path) -> Path:
    """The file a write to `path` lands on: through symlinks, so that the link stays and its target changes."""
    return Path(os.path.realpath(path))


def check_writable(path: str | Path, what: str = "output") -> None:
    """InputError unless a file can be written at path (its folder exists and is writable); creates nothing."""
    p = Path(path)
    if p.is_dir():
        raise InputError(f"{what} path is a directory: {p}")
    target = _target(p)
    if not target.parent.is_dir():
        raise InputError(f"cannot write {what} {p}: folder {target.parent} does not exist")
    if target.exists() and not os.access(target, os.W_OK):
        raise InputError(f"cannot write {what} {p}: permission denied")
    if not os.access(target.parent, os.W_OK | os.X_OK):
        raise InputError(f"cannot write {what} {p}: folder {target.parent} is not writable")


def _fsync_folder(folder: Path) -> None:
    with contextlib.suppress(OSError):  # not every filesystem lets a folder be opened or synced
        fd = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


@contextlib.contextmanager
def replacing(path: str | Path, mode: str = "w", *, encoding: str | None = "utf-8",
              keep_on_error: Callable[[IO], bool] | None = None) -> Iterator[IO]:
    """`with replacing(path) as f:` writes f to a temporary file beside path and renames it over path at the end.

    On an exception (Ctrl-C included) the temporary file is removed and path is left as it was, unless
    `keep_on_error(f)` says the partial file is worth keeping: then it replaces path before the exception goes on.
    """
    target = _target(path)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    tmp_path = Path(tmp)
    committed = False
    try:
        with os.fdopen(fd, mode, encoding=None if "b" in mode else encoding) as f:
            try:
                yield f
            except BaseException:
                if keep_on_error is None or not keep_on_error(f):
                    raise
                _commit(f, tmp_path, target)
                committed = True
                raise
            _commit(f, tmp_path, target)
            committed = True
    finally:
        if not committed:
            with contextlib.suppress(OSError):
                tmp_path.unlink()


def _commit(f: IO, tmp: Path, target: Path) -> None:
    f.flush()
    os.fsync(f.fileno())
    try:
        os.chmod(tmp, stat.S_IMODE(os.stat(target).st_mode))  # a replaced file keeps its permissions
    except OSError:
        make_readable(tmp)
    os.replace(tmp, target)
    _fsync_folder(target.parent)


def write_text(path: str | Path, text: str) -> None:
    """Replace path's content with text (UTF-8), atomically."""
    with replacing(path, "w") as f:
        f.write(text)


def write_bytes(path: str | Path, data: bytes) -> None:
    """Replace path's content with data, atomically."""
    with replacing(path, "wb", encoding=None) as f:
        f.write(data)


def is_empty_folder(path: Path) -> bool:
    """Whether path is a folder with nothing in it."""
    return path.is_dir() and not any(path.iterdir())


def check_new_folder(dest: str | Path, overwrite: bool = False, what: str = "output folder") -> Path:
    """InputError unless a folder can be made at dest: not a file, empty unless overwrite; returns dest."""
    dest = Path(dest)
    if dest.exists() and not dest.is_dir():
        raise InputError(f"{what} exists and is not a folder: {dest}")
    if dest.is_dir() and not overwrite and not is_empty_folder(dest):
        raise NotEmptyError(f"{what} {dest} exists and is not empty: choose a new folder, or pass --overwrite "
                            "to replace it")
    return dest


@contextlib.contextmanager
def new_folder(dest: str | Path, overwrite: bool = False, what: str = "output folder") -> Iterator[Path]:
    """`with new_folder(dest) as tmp:` fill tmp (beside dest); at the end it becomes dest in one rename.

    A non-empty dest is refused (NotEmptyError) unless overwrite; then the old folder is moved aside, the new one
    moved in, and the old one deleted, so that a failure at any point leaves one complete folder at dest. On an
    exception the temporary folder is deleted and dest is untouched. Parent folders are created as needed.
    """
    dest = check_new_folder(dest, overwrite, what)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".tmp", dir=dest.parent))
    try:
        yield tmp
        make_readable(tmp, folder=True)
        _move_into_place(tmp, dest, overwrite, what)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _move_into_place(tmp: Path, dest: Path, overwrite: bool, what: str) -> None:
    try:
        os.rename(tmp, dest)  # also replaces an empty folder
        _fsync_folder(dest.parent)
        return
    except OSError:
        if not dest.is_dir() or is_empty_folder(dest):
            raise
        if not overwrite:  # filled by someone else while we worked
            raise NotEmptyError(f"{what} {dest} was filled while it was being written; nothing replaced") from None
    old = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", suffix=".old", dir=dest.parent))
    os.rename(dest, old / dest.name)
    try:
        os.rename(tmp, dest)
    except BaseException:
        os.rename(old / dest.name, dest)  # put the old folder back
        raise
    finally:
        _fsync_folder(dest.parent)
    shutil.rmtree(old, ignore_errors=True)

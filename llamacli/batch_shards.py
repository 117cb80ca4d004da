"""Data-parallel batch runs: each rank's share of the rows, its part file, and the merge into one output file.

Under torchrun without `--tensor-parallel`, every rank loads the whole model and runs every `world`-th row still
to do, writing its results to its own part file beside the output (`out.jsonl.rank1-of-2.part`), flushed row by
row as `batch.run_batch` writes them. When all ranks are done, rank 0 merges the output's earlier rows and every
part into the output, in input order, atomically (`files.write_bytes`), and removes the parts. A rank that fails
leaves its part file: the rows it finished are merged anyway, and again by the next `--resume` run, which merges
any leftover parts (of any world size) before deciding what is left to do.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from llamacli import files
from llamacli.batch_output import id_key
from llamacli.errors import InputError, UsageError


@dataclass
class Merged:
    """What a merge took from the part files."""

    ok: int = 0
    failed: int = 0
    generated_tokens: int = 0


def part_path(output: Path, rank: int, world: int) -> Path:
    """The part file rank `rank` of `world` writes its rows to, beside the output."""
    return output.with_name(f"{output.name}.rank{rank}-of-{world}.part")


def leftover_parts(output: Path) -> list[Path]:
    """Part files of earlier sharded runs of this output (any world size), in name order."""
    return sorted(output.parent.glob(f"{_glob_escape(output.name)}.rank*-of-*.part"))


def _glob_escape(name: str) -> str:
    return "".join(f"[{c}]" if c in "*?[" else c for c in name)


def share(rows: list, rank: int, world: int) -> list:
    """The rows rank `rank` runs: every `world`-th, so that long and short prompts spread evenly."""
    return rows[rank::world]


def check_parts(output: Path, resume: bool, overwrite: bool) -> list[Path]:
    """The leftover parts a run may use (with resume) or drop (with overwrite); UsageError otherwise."""
    parts = leftover_parts(output)
    if parts and not (resume or overwrite):
        raise UsageError(f"{parts[0]} holds rows of an unfinished sharded run of {output}: pass --resume to "
                         "continue it or --overwrite to start again")
    return parts


def _lines(path: Path) -> list[bytes]:
    """The complete JSON rows of a file (a last row cut short by a kill is dropped)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return []
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror or exc}") from None
    out = []
    for line in data.split(b"\n"):
        if not line.strip():
            continue
        try:
            json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # only a row being written when its rank died can be cut
        out.append(line)
    return out


def merge(output: Path, rows: list, parts: list[Path], keep_output: bool = True, remove: bool = True) -> Merged:
    """Write the output's rows (unless not `keep_output`) and the parts' into the output, in input order.

    An id's later row replaces its earlier one (a retried error row); rows of ids not in the input keep their
    place before the others. With `remove`, the parts are deleted once the output is written.
    """
    order = {id_key(row.id): i for i, row in enumerate(rows)}
    by_id: dict = {}
    others: list[bytes] = []
    merged = Merged()
    sources = ([output] if keep_output else []) + list(parts)
    for source in sources:
        for line in _lines(source):
            obj = json.loads(line)
            key = id_key(obj.get("id")) if isinstance(obj, dict) and isinstance(obj.get("id"), (str, int)) else None
            if source != output and isinstance(obj, dict):
                if "error" in obj:
                    merged.failed += 1
                else:
                    merged.ok += 1
                    merged.generated_tokens += len(obj.get("token_ids") or ())
            if key is None or key not in order:
                others.append(line)
            else:
                by_id[key] = line
    body = others + [by_id[k] for k in sorted(by_id, key=order.__getitem__)]
    files.write_bytes(output, b"".join(line + b"\n" for line in body))
    if remove:
        for part in parts:
            part.unlink(missing_ok=True)
    return merged

"""Turn a `--model` spec into a local Hugging Face checkpoint folder.

A spec is a local checkpoint folder, a llama GGUF file (converted once into a cache, see `llamacli.gguf`), or
a hub repo id `org/name`, fetched with `huggingface_hub.snapshot_download` limited to the files llamacli reads.
The hub path honours `HF_HOME` / `HF_HUB_CACHE` / `HF_HUB_OFFLINE` as huggingface_hub does, read when called
(not when huggingface_hub was imported), so an offline cache laid out by a test or a script is found.
No torch here; progress is huggingface_hub's own tqdm bar on stderr.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Callable

from llamacli.errors import InputError, UsageError
from llamacli.layout import RUN_DTYPES

# Everything llamacli reads from a checkpoint, and nothing else (no pickles, no GGUF/ONNX copies).
HUB_PATTERNS = [
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "chat_template.jinja",
    "*.safetensors",
    "model.safetensors.index.json",
]

# huggingface_hub's own rule for repo ids: letters, digits, '-', '_', '.'; no '--' or '..'; one '/'.
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}/[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")


def looks_like_repo_id(spec: str) -> bool:
    """True for `org/name` (and not a path-like spelling such as `./x`, `/x`, `~/x` or `a/b/c`)."""
    return bool(_REPO_ID.match(spec)) and "--" not in spec and ".." not in spec and not spec.endswith(".gguf")


def resolve_model(spec: str, revision: str | None = None, progress: bool | Callable = True,
                  dtype: str = "auto") -> Path:
    """Return a local checkpoint folder for a folder, a `.gguf` file or a hub repo id `org/name`.

    `dtype` only matters for GGUF files: the dtype their conversion is stored in ('auto' = bfloat16).
    `progress` shows huggingface_hub's download bar (True) or not (False); a callable is passed to the GGUF
    converter as its progress callback.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise UsageError("--model is empty: pass a checkpoint folder, a .gguf file or a hub repo id org/name")
    path = Path(spec).expanduser()
    if path.is_dir():
        _no_revision(revision, spec)
        return path
    if path.is_file():
        _no_revision(revision, spec)
        if path.suffix.lower() == ".gguf":
            from llamacli.gguf import cached_conversion

            stored = dtype if dtype in RUN_DTYPES else "bfloat16"  # GGUF conversions are stored in a run dtype
            return cached_conversion(path, dtype=stored, progress=progress if callable(progress) else None)
        raise InputError(f"{spec}: not a checkpoint folder or a .gguf file")
    if path.suffix.lower() == ".gguf":
        raise InputError(f"GGUF file not found: {spec}")
    if looks_like_repo_id(spec):
        return _from_hub(spec, revision, progress=bool(progress))
    raise InputError(f"model not found: {spec} (expected a checkpoint folder, a .gguf file or a hub repo id org/name)")


def _no_revision(revision: str | None, spec: str) -> None:
    if revision is not None:
        raise UsageError(f"--revision applies to hub repo ids only, and {spec} is a local path")


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def hub_cache_dir() -> Path | None:
    """The hub cache from the environment now (HF_HUB_CACHE, else HF_HOME/hub), or None for the default."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return None


def hub_offline() -> bool:
    """Whether HF_HUB_OFFLINE (or TRANSFORMERS_OFFLINE) is set now, or was when huggingface_hub was imported."""
    from huggingface_hub import constants

    return _truthy(os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE")) or bool(
        constants.HF_HUB_OFFLINE)


def _from_hub(repo_id: str, revision: str | None, progress: bool) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        HFValidationError,
        IncompleteSnapshotError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    offline = hub_offline()
    where = f"{repo_id}" + (f" (revision {revision})" if revision else "")
    kwargs = {}
    if not progress:
        kwargs["tqdm_class"] = _quiet_tqdm()
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS,
                                   cache_dir=hub_cache_dir(), local_files_only=offline, **kwargs)
    except RevisionNotFoundError:
        raise InputError(f"{where}: revision not found on the hub") from None
    except GatedRepoError:
        raise InputError(f"{where}: the repo is gated; accept its terms on the hub and log in "
                         "(huggingface-cli login or HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise InputError(f"model not found: {repo_id} is neither a local folder nor a hub repo you can access") from None
    except IncompleteSnapshotError as exc:
        first = str(exc).split(". ")[0]  # "The cached snapshot for ... is incomplete: N file(s) are missing (...)"
        raise InputError(f"{first}; reach the hub (without HF_HUB_OFFLINE) to finish the download") from None
    except LocalEntryNotFoundError:
        why = "HF_HUB_OFFLINE is set" if offline else "the hub could not be reached"
        raise InputError(f"model not found: {where} is not a local folder and not in the hub cache "
                         f"({why}; cache: {hub_cache_dir() or 'default'})") from None
    except HFValidationError as exc:
        raise InputError(f"{repo_id}: not a valid hub repo id ({exc})") from None
    except HfHubHTTPError as exc:
        raise InputError(f"{where}: hub request failed ({str(exc).splitlines()[0]})") from None
    except OSError as exc:  # disk errors
        raise InputError(f"{where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    return Path(folder)


def _quiet_tqdm():
    from tqdm.auto import tqdm

    class Quiet(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True
            super().__init__(*args, **kwargs)

    return Quiet

"""The real-model fixture: SmolLM2-135M-Instruct, converted by us from its GGUF into a float32 HF checkpoint.

Converted once into `tests.assets.cache_dir() / "smollm2-135m-instruct-f32"` and reused after; the folder
appears whole or not at all (converted into a temporary folder, then renamed). A stamp file records the
converter version, so a change to the converter redoes the conversion.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from tests.assets import cache_dir, smollm2_gguf

_STAMP = ".llamacli-converter-version"


def smollm2_checkpoint() -> Path:
    """Our float32 conversion of SmolLM2-135M-Instruct.Q4_1.gguf, as a Hugging Face checkpoint folder."""
    from llamacli.gguf import CONVERTER_VERSION, convert_gguf

    target = cache_dir() / "smollm2-135m-instruct-f32"
    stamp = target / _STAMP
    if stamp.is_file() and stamp.read_text().strip() == str(CONVERTER_VERSION):
        return target
    src = smollm2_gguf()
    tmp = Path(tempfile.mkdtemp(prefix=".smollm2-f32.", dir=cache_dir()))
    try:
        convert_gguf(src, tmp, dtype="float32")
        (tmp / _STAMP).write_text(f"{CONVERTER_VERSION}\n")
        if target.exists():  # an older converter's output: move it aside, then drop it
            stale = Path(tempfile.mkdtemp(prefix=".smollm2-f32-stale.", dir=cache_dir()))
            try:
                os.rename(target, stale / "old")
            except OSError:
                pass
            shutil.rmtree(stale, ignore_errors=True)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first
            if not (target / _STAMP).is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target

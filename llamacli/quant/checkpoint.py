"""Write a quantized safetensors checkpoint from a float one (`llamacli quantize`).

The folder holds the source's files (tokenizer, templates, generation config) with config.json gaining a
`quantization_config` (`quantization.Quantization.config_entry`), and one `model.safetensors` in the layout of
`llamacli.quant.quantize`: it loads again with no flag and no re-quantizing. Tensors are read one at a time
(the quantized model is held, never the float one) and the folder appears complete or not at all.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from llamacli import files, layout, quantization
from llamacli.config import load_config
from llamacli.errors import UsageError, WeightsError
from llamacli.quant.quantize import quantize_matrix

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pth", ".pt", ".ckpt")


def check_quantizable(folder: Path, quant: quantization.Quantization) -> tuple[dict, dict]:
    """(the checked tensors, the float table) of a float checkpoint that `quant` applies to; from the headers
    only, so a quantized source or a group size that does not divide a matrix fails before any work."""
    config = load_config(folder)
    if quantization.read_quantization(folder) is not None:
        raise UsageError(f"{folder} is already quantized; quantize its float checkpoint instead")
    used = layout.checkpoint_tensors(config, folder)
    float_table = layout.expected_tensors(config, lm_head="lm_head.weight" in used)
    layout.quantized_table(float_table, quant)
    return used, float_table


def quantize_tensors(folder: Path, quant: quantization.Quantization,
                     progress: Callable[[int, int, str], None] | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of a float checkpoint in the quantized layout (name -> tensor), read one at a time."""
    from safetensors import safe_open

    used, float_table = check_quantizable(folder, quant)
    out: dict[str, torch.Tensor] = {}
    handles = {}
    for done, (name, info) in enumerate(used.items()):
        if info.file not in handles:
            handles[info.file] = safe_open(str(info.file), framework="pt", device="cpu")
        try:
            tensor = handles[info.file].get_tensor(name)
        except Exception as exc:
            raise WeightsError(f"{info.file}: tensor '{name}' is truncated or corrupt ({exc})") from None
        if layout.is_quantized_matrix(name, float_table[name]):
            t = quantize_matrix(tensor, quantization.matrix_bits(name, quant), quant.group_size, name)
            out |= t.tensors(name.removesuffix(".weight"))
        else:
            out[name] = tensor.clone()  # norms and biases as stored
        if progress:
            progress(done + 1, len(used), name)
    return out


def write_quantized(src: Path, out_dir: Path, quant: quantization.Quantization, overwrite: bool = False,
                    progress: Callable[[int, int, str], None] | None = None) -> Path:
    """Quantize the float checkpoint `src` into the new folder `out_dir`; returns it."""
    from safetensors.torch import save_file

    src, out_dir = Path(src), Path(out_dir)
    files.check_new_folder(out_dir, overwrite)
    if out_dir.exists() and files.same_file(src, out_dir):
        raise UsageError(f"{out_dir} is the source checkpoint; choose a new folder")
    tensors = quantize_tensors(src, quant, progress)
    config = json.loads((src / "config.json").read_text(encoding="utf-8"))
    config["quantization_config"] = quant.config_entry()
    with files.new_folder(out_dir, overwrite) as tmp:
        for item in sorted(src.iterdir()):
            if item.is_file() and not item.name.endswith(WEIGHT_SUFFIXES) and item.name not in (
                    "config.json", layout.INDEX_NAME):
                shutil.copyfile(item, tmp / item.name)  # follows hub snapshot symlinks
        save_file(tensors, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    return out_dir

"""`llamacli convert`: a llama GGUF file into a Hugging Face checkpoint folder."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from llamacli.cli.app import app, errors, note, progress_bar


class ConvertDtype(str, Enum):
    """The dtypes `convert` can write (no `auto`: the file on disk needs one)."""

    bfloat16 = "bfloat16"
    float16 = "float16"
    float32 = "float32"


@app.command()
def convert(
    src: Annotated[Path, typer.Argument(help="The llama GGUF file to convert.", metavar="SRC.gguf",
                                         show_default=False)],
    out_dir: Annotated[Path, typer.Argument(
        help="Folder to write the Hugging Face checkpoint into: new or empty (see --overwrite). It appears "
             "complete at the end; a failed conversion leaves nothing there.", metavar="OUT_DIR",
        show_default=False)],
    dtype: Annotated[ConvertDtype, typer.Option("--dtype", help="Dtype of the written weights.")] = (
        ConvertDtype.bfloat16
    ),
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace a non-empty OUT_DIR as a whole (only once the new checkpoint is complete).",
    )] = False,
    keep_quantization: Annotated[bool, typer.Option(
        "--keep-quantization",
        help="Write a quantized GGUF's matrices in llamacli's int8/int4 layout (Q4_0/Q4_1/Q4_K exactly as int4 "
             "groups of 32, other types requantized to int8 per row), as `--model x.gguf` loads them, instead of "
             "dequantizing them to --dtype; the checkpoint loads again quantized, with no flag.",
    )] = False,
) -> None:
    """Convert a GGUF file (llama architecture) into a Hugging Face checkpoint folder."""
    from llamacli.errors import UsageError
    from llamacli.gguf import convert_gguf, quantized_types
    from llamacli.quantization import read_quantization

    with errors():
        if keep_quantization and src.is_file() and not quantized_types(src):
            raise UsageError(f"--keep-quantization: {src} holds no quantized matrices (F32/F16/BF16 only); "
                             "convert it with --dtype, or quantize it with `llamacli quantize`")
        with progress_bar("converting", show_item=True) as update:
            out = convert_gguf(src, out_dir, dtype=dtype.value, progress=update, overwrite=overwrite,
                               quantized=keep_quantization)
        what = read_quantization(out).describe() if keep_quantization else dtype.value
    note(f"wrote {out} ({what})")

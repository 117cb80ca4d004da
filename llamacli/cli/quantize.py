"""`llamacli quantize`: a float checkpoint into an int8 or int4 safetensors checkpoint."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from llamacli.cli.app import Dtype, GroupSizeOpt, RevisionOpt, app, errors, note, progress_bar, resolve
from llamacli.errors import UsageError


@app.command()
def quantize(
    src: Annotated[str, typer.Argument(help="The float checkpoint: a folder, a .gguf file or a hub repo id.",
                                       metavar="SRC", show_default=False)],
    out_dir: Annotated[Path, typer.Argument(
        help="Folder to write the quantized checkpoint into: new or empty (see --overwrite); it appears complete "
             "at the end.", metavar="OUT", show_default=False)],
    bits: Annotated[int, typer.Option("--bits", help="8 (per row) or 4 (per group of --group-size columns).")] = 8,
    group_size: GroupSizeOpt = None,
    revision: RevisionOpt = None,
    overwrite: Annotated[bool, typer.Option(
        "--overwrite", help="Replace a non-empty OUT as a whole (once the new checkpoint is complete).")] = False,
) -> None:
    """Write a quantized checkpoint (int8 or int4 weights + scales) that every command loads without a flag."""
    with errors():
        from llamacli.gguf import refuse_quantized
        from llamacli.quant.checkpoint import check_quantizable, write_quantized
        from llamacli.weights import check_quantize

        if bits not in (8, 4):
            raise UsageError(f"--bits must be 8 or 4, got {bits}")
        quant = check_quantize("int8" if bits == 8 else "int4", group_size)
        refuse_quantized(src, "quantize its float checkpoint instead")
        folder = resolve(src, revision, Dtype.auto)
        check_quantizable(folder, quant)  # before the progress bar: an error stays one line
        with progress_bar("quantizing", show_item=True) as update:
            out = write_quantized(folder, out_dir, quant, overwrite=overwrite, progress=update)
    note(f"wrote {out} ({quant.describe()})")

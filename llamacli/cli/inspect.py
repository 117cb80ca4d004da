"""`llamacli inspect`: describe a checkpoint without loading its weights, as JSON or as tables."""

from __future__ import annotations

import json
from typing import Annotated

import typer

from llamacli.cli.app import Dtype, ModelOpt, RevisionOpt, app, errors, resolve


@app.command("inspect")
def inspect_command(
    model: ModelOpt,
    revision: RevisionOpt = None,
    dtype: Annotated[Dtype, typer.Option(
        "--dtype", help="Dtype for the memory figures; auto = the checkpoint's own dtype.")] = Dtype.auto,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object for scripts.")] = False,
) -> None:
    """Describe a checkpoint from its config and safetensors headers, without loading any weights."""
    with errors():
        from llamacli.inspect import inspect_checkpoint

        info = inspect_checkpoint(resolve(model, revision, dtype), dtype=dtype.value)
    if as_json:
        print(json.dumps(info, ensure_ascii=False), flush=True)
        return
    print_inspect(info)


def format_size(n: float) -> str:
    """Bytes in the largest binary unit that keeps the number below 1024 (`1.50 MiB`)."""
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if n < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.2f} {unit}"
        n /= 1024
    return ""


def format_count(n: int) -> str:
    """A count with thousands separators and a short form (`135,000,000 (135.00M)`)."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n:,} ({n / scale:.2f}{unit})"
    return f"{n:,}"


def print_inspect(info: dict) -> None:
    """The `inspect_checkpoint` dict as a summary table and a per-layer table on stdout."""
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    console = Console(highlight=False)
    summary = Table(title=Text(info["path"]), title_justify="left", show_header=False, box=None)
    summary.add_column(style="bold")
    summary.add_column()
    rope = info["rope"]
    tok = info["tokenizer"]
    rows = [
        ("architecture", f"{info['architecture']} ({info['model_type']})"),
        ("parameters", format_count(info["parameters"])),
        *[(f"  {kind}", format_count(n)) for kind, n in info["parameters_by_kind"].items()],
        ("on disk", f"{format_size(info['disk']['bytes'])} in {len(info['disk']['files'])} file(s); "
                    + ", ".join(f"{d}: {format_count(n)}" for d, n in info["disk"]["dtypes"].items())),
        *([("quantization", f"{q['description']}: {q['bytes_per_weight']:.3f} bytes per weight "
                            f"(matrices {q['matrix_bytes_per_weight']:.3f}), {format_size(info['weights_bytes'])} "
                            f"of weights in memory")] if (q := info.get("quantization")) else []),
        ("layers", str(info["num_layers"])),
        ("hidden size", str(info["hidden_size"])),
        ("ffn dim", str(info["ffn_dim"])),
        ("vocab size", str(info["vocab_size"])),
        ("context length", str(info["context_length"])),
        ("rope", f"theta {rope['theta']:g}, {rope['type']}"
                 + (f" {rope['scaling']}" if rope["scaling"] else "")),
        ("tied embeddings", "yes" if info["tie_embeddings"] else "no"),
        (f"KV cache ({info['dtype']})", f"{format_size(info['kv_cache_bytes_per_token'])} per token, "
                                       f"{format_size(info['kv_cache_bytes_full_context'])} for the full context"),
        (f"memory ({info['dtype']})", f"~{format_size(info['memory_estimate_bytes'])} "
                                      "(weights + KV cache for the full context)"),
        ("tokenizer", f"{tok['kind']}, {tok['vocab_size']} tokens" if tok else "none found"),
        ("BOS / EOS ids", f"{info['bos_token_id']} / {', '.join(map(str, info['eos_token_ids'])) or '-'}"),
        ("chat template", "yes" if info["chat_template"] else "no"),
    ]
    for key, value in rows:
        summary.add_row(Text(key), Text(value))
    console.print(summary)
    layers = Table(title="per layer", title_justify="left")
    for col in ("layer", "heads", "KV heads", "head dim", "GQA group"):
        layers.add_column(col, justify="right")
    for layer in info["layers"]:
        layers.add_row(*(str(layer[k]) for k in ("index", "num_heads", "num_kv_heads", "head_dim",
                                                 "gqa_group_size")))
    console.print(layers)

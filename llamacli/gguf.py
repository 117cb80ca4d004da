"""GGUF import: turn a llama.cpp GGUF file into a Hugging Face Llama checkpoint folder.

The folder holds what the rest of llamacli reads: `config.json`, `generation_config.json`,
`model.safetensors` (sharded past a size limit), the tokenizer (`tokenizer.json` for byte-level BPE
vocabularies, `tokenizer.model` for SentencePiece ones) and `tokenizer_config.json`.

The config comes from the metadata (`gguf_config`), the tokenizer from the vocabulary (`gguf_vocab`). Three
things llama.cpp changes on the way in are undone here:
- tensor names (`blk.N.attn_q.weight` -> `model.layers.N.self_attn.q_proj.weight`);
- quantization: every tensor is dequantized with `gguf.quants` and cast to the chosen dtype, or (a quantized
  file through the cache, `--model x.gguf`) its matrices go into llamacli's int8 / int4 layout (`gguf_quant`);
- the q/k row order: llama.cpp interleaves each head's rotary halves for its own RoPE, and k is
  permuted with the KV-head count, so it is undone with that count too (llama.cpp #2376). It is a permutation
  of rows, so it applies to quantized rows (q, scales, biases) alike.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import numpy as np

from llamacli import files, gguf_quant, layout, quantization
from llamacli.config import LlamaConfig
from llamacli.errors import ConfigError, InputError, UsageError, WeightsError
from llamacli.gguf_config import build_config
from llamacli.gguf_vocab import write_tokenizer

# Bump when the output of a conversion changes, so cached conversions are redone.
CONVERTER_VERSION = 3

DTYPES = layout.RUN_DTYPES

# Shards of at most this many bytes keep memory bounded on large models.
SHARD_BYTES = 4 << 30

ProgressFn = Callable[[int, int, str], None]


_LAYER_NAMES = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
}
_GLOBAL_NAMES = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

# ---------------------------------------------------------------------------------------------
# Reading


def _open(src: Path):
    from gguf import GGUFReader

    if not src.is_file():
        raise InputError(f"GGUF file not found: {src}")
    try:
        return GGUFReader(src)
    except Exception as exc:  # the reader raises ValueError, struct errors, OSError, ...
        raise InputError(f"cannot read {src} as GGUF: {exc}") from exc


def _metadata(reader) -> dict[str, Any]:
    """Every key/value of the file as plain Python values."""
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


# ---------------------------------------------------------------------------------------------
# Weights


def _hf_name(name: str) -> str:
    if name in _GLOBAL_NAMES:
        return _GLOBAL_NAMES[name]
    parts = name.split(".")
    if len(parts) == 4 and parts[0] == "blk" and parts[1].isdigit() and parts[3] == "weight" and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.weight"
    raise WeightsError(f"unexpected tensor {name!r} in a llama GGUF file")


def unpermute_rope_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Undo llama.cpp's per-head interleaving of q/k rows (pass the KV-head count for k)."""
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise WeightsError(f"cannot split {rows} rows into {n_heads} heads of two rotary halves")
    half = rows // n_heads // 2
    # llama.cpp stored (n_heads, half, 2, ...) in the order of (n_heads, 2, half, ...): swap back.
    return weight.reshape(n_heads, half, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _shape(tensor) -> tuple[int, ...]:
    """A GGUF tensor's shape in numpy (row-major, HF) order: GGUF lists dimensions innermost first."""
    return tuple(int(n) for n in reversed(tensor.shape.tolist()))


def _is_quantized(tensor) -> bool:
    """Whether a GGUF tensor is a matrix in a quantized (not F32 / F16 / BF16) type."""
    return len(tensor.shape) == 2 and gguf_quant.type_name(tensor.tensor_type) not in gguf_quant.FLOAT_TYPES


def _unpermute(name: str, rows: np.ndarray, config: dict) -> np.ndarray:
    """Undo llama.cpp's q/k row order on any array whose rows are the matrix's rows (values, q, scales)."""
    if name.endswith("q_proj.weight"):
        return unpermute_rope_rows(rows, config["num_attention_heads"])
    if name.endswith("k_proj.weight"):
        return unpermute_rope_rows(rows, config["num_key_value_heads"])
    return rows


def _checked_tensors(reader, config: dict, progress: ProgressFn | None) -> Iterator[tuple[str, Any]]:
    """(HF name, GGUF tensor) of every weight, its name and shape checked against the table the loader checks
    (from the config written beside it); a missing tensor is named after the last one."""
    expected = {name: spec.shape for name, spec in layout.expected_tensors(
        LlamaConfig.from_hf(config, source="the config built from the GGUF metadata")).items()}
    tensors = [t for t in reader.tensors if t.name != "rope_freqs.weight"]
    seen: set[str] = set()
    for done, tensor in enumerate(tensors, 1):
        name = _hf_name(tensor.name)
        if name not in expected:
            raise WeightsError(f"tensor {tensor.name!r} ({name}) does not belong to a "
                               f"{config['num_hidden_layers']}-layer model")
        if _shape(tensor) != expected[name]:
            raise WeightsError(f"tensor {tensor.name!r} has shape {_shape(tensor)}, "
                               f"expected {expected[name]} from the metadata")
        yield name, tensor
        seen.add(name)
        if progress is not None:
            progress(done, len(tensors), tensor.name)
    missing = sorted(set(expected) - seen)
    if missing:
        raise WeightsError(f"GGUF file lacks {len(missing)} tensor(s) the model needs, e.g. {missing[0]!r}")


def _float_weights(reader, config: dict, dtype: str, progress: ProgressFn | None) -> Iterator[dict]:
    """Every tensor dequantized, unpermuted and cast to `dtype` (torch), one {name: tensor} at a time."""
    import torch

    torch_dtype = getattr(torch, dtype)
    for name, tensor in _checked_tensors(reader, config, progress):
        values = gguf_quant.dequantize(tensor.data, tensor.tensor_type, _shape(tensor), tensor.name)
        values = np.ascontiguousarray(_unpermute(name, values, config))
        yield {name: torch.from_numpy(values).to(torch_dtype).contiguous()}


def _quantized_weights(reader, config: dict, progress: ProgressFn | None) -> Iterator[dict]:
    """Every matrix in llamacli's quantized layout (`gguf_quant.map_matrix`), norms in float32 (numpy)."""
    for name, tensor in _checked_tensors(reader, config, progress):
        if len(tensor.shape) == 1:
            yield {name: gguf_quant.dequantize(tensor.data, tensor.tensor_type, _shape(tensor), tensor.name)}
            continue
        mapped = gguf_quant.map_matrix(tensor.data, tensor.tensor_type, _shape(tensor), tensor.name)
        yield mapped.map_rows(lambda rows: _unpermute(name, rows, config)).arrays(name.removesuffix(".weight"))


def _quantization_of(reader) -> quantization.Quantization:
    """The quantization a GGUF's matrices map onto: int4 (groups of 32) when any maps exactly, else int8; the
    matrices whose bits differ from that rule are listed, and the GGUF types are recorded as the source."""
    bits = {_hf_name(t.name): gguf_quant.bits_for(t.tensor_type) for t in reader.tensors if len(t.shape) == 2}
    int4 = 4 in bits.values()
    base = quantization.Quantization(4 if int4 else 8, gguf_quant.GROUP_SIZE if int4 else None)
    kinds = Counter(gguf_quant.type_name(t.tensor_type) for t in reader.tensors if len(t.shape) == 2)
    source = "GGUF " + ", ".join(
        f"{n} {kind} ({'int4, exact' if kind in gguf_quant.EXACT_TYPES else 'int8, requantized'})"
        for kind, n in kinds.most_common())
    overrides = {name: b for name, b in bits.items() if b != quantization.matrix_bits(name, base)}
    return quantization.Quantization(base.bits, base.group_size, overrides, source)


def _write_shards(parts: Iterable[dict], out: Path, save_file: Callable, max_shard_bytes: int) -> None:
    """Save {name: tensor} parts (torch or numpy) into safetensors shards of at most `max_shard_bytes` (one part
    past it opens the next), with an index when there are several."""
    shards: list[dict] = [{}]
    shard_bytes = 0
    for part in parts:
        size = sum(t.nbytes for t in part.values())
        if shard_bytes and shard_bytes + size > max_shard_bytes:
            shards.append({})
            shard_bytes = 0
        shards[-1] |= part
        shard_bytes += size
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / "model.safetensors"), metadata=metadata)
        files.make_readable(out / "model.safetensors")
        return
    weight_map, total_size = {}, 0
    for index, shard in enumerate(shards, 1):
        file = f"model-{index:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / file), metadata=metadata)
        files.make_readable(out / file)  # safetensors writes 0600
        for name, tensor in shard.items():
            weight_map[name] = file
            total_size += tensor.nbytes
    index_json = {"metadata": {"total_size": total_size}, "weight_map": weight_map}
    (out / "model.safetensors.index.json").write_text(json.dumps(index_json, indent=2) + "\n")


# ---------------------------------------------------------------------------------------------
# Public API


def convert_gguf(src: str | Path, out_dir: str | Path, dtype: str = "bfloat16",
                 progress: ProgressFn | None = None, overwrite: bool = False,
                 max_shard_bytes: int = SHARD_BYTES, quantized: bool = False) -> Path:
    """Convert a llama GGUF file into a Hugging Face checkpoint folder; returns the folder. Weights go into
    safetensors shards of at most `max_shard_bytes` (one tensor past it opens the next shard): dequantized to
    `dtype`, or with `quantized` in llamacli's int8 / int4 layout (`gguf_quant`; config.json then has a
    `quantization_config`, and `dtype` is only the config's `torch_dtype`).

    The folder is built beside `out_dir` and renamed into place when complete (`files.new_folder`): a failure
    leaves no half-written checkpoint, and an existing non-empty `out_dir` is refused unless `overwrite` (then
    replaced whole, never mixed with its old files). `progress(done, total, tensor_name)` is called per tensor.
    """
    if dtype not in DTYPES:
        raise UsageError(f"unsupported dtype {dtype!r} (choose one of {', '.join(DTYPES)})")
    src, out = Path(src), Path(out_dir)
    files.check_new_folder(out, overwrite)  # before the slow part
    if overwrite and out.is_dir() and Path(os.path.realpath(src)).is_relative_to(os.path.realpath(out)):
        raise UsageError(f"{src} is inside {out}: --overwrite would delete the file being converted")
    reader = _open(src)
    meta = _metadata(reader)
    arch = meta.get("general.architecture")
    if arch != "llama":
        raise ConfigError(f"unsupported GGUF architecture {arch!r}: llamacli converts only 'llama'")
    tensor_names = {t.name for t in reader.tensors}
    config, generation = build_config(meta, reader, tensor_names, dtype)
    if quantized:
        from safetensors.numpy import save_file

        config["quantization_config"] = _quantization_of(reader).config_entry()
        parts = _quantized_weights(reader, config, progress)
    else:
        from safetensors.torch import save_file

        parts = _float_weights(reader, config, dtype, progress)

    with files.new_folder(out, overwrite) as tmp:
        write_tokenizer(meta, tmp, config)
        _write_shards(parts, tmp, save_file, max_shard_bytes)
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    return out


def quantized_types(src: str | Path) -> list[str]:
    """The quantized (not F32 / F16 / BF16) types of a GGUF file's matrices, most common first; [] for a float
    file. Reads the header only."""
    counts = Counter(gguf_quant.type_name(t.tensor_type) for t in _open(Path(src).expanduser()).tensors
                     if _is_quantized(t))
    return [kind for kind, _ in counts.most_common()]


def refuse_quantized(spec: str | Path, hint: str) -> None:
    """UsageError, before any conversion, when a `--model` spec names a GGUF file whose matrices are quantized
    already (`hint`: what to do instead); nothing for any other spec."""
    if str(spec).lower().endswith(".gguf") and (types := quantized_types(spec)):
        raise UsageError(f"{spec} is already quantized ({', '.join(types)}): it loads as int8/int4 weights "
                         f"without a flag; {hint}")


def default_cache_root() -> Path:
    """Where `--model FILE.gguf` conversions are kept: $LLAMACLI_CACHE/gguf, else ~/.cache/llamacli/gguf."""
    root = os.environ.get("LLAMACLI_CACHE")
    return Path(root) / "gguf" if root else Path.home() / ".cache" / "llamacli" / "gguf"


def cached_conversion(src: str | Path, dtype: str = "bfloat16", cache_root: Path | None = None,
                      progress: ProgressFn | None = None) -> Path:
    """Convert a GGUF file once into a cache folder and reuse it after: a quantized file into llamacli's
    quantized layout (whatever `dtype`, which then only picks the activations' dtype at load), a float one into
    `dtype`. The folder is keyed by the file's path, size, mtime, ctime and inode (ctime cannot be set back, so
    a file replaced in place under its old mtime is converted again), the kind and the converter version."""
    if dtype not in DTYPES:
        raise UsageError(f"unsupported dtype {dtype!r} (choose one of {', '.join(DTYPES)})")
    path = Path(src).expanduser()
    if not path.is_file():
        raise InputError(f"GGUF file not found: {path}")
    path = path.resolve()
    stat = path.stat()
    quantized = bool(quantized_types(path))
    kind = "quantized" if quantized else dtype
    key = f"{path}|{stat.st_size}|{stat.st_mtime_ns}|{stat.st_ctime_ns}|{stat.st_ino}|{kind}|v{CONVERTER_VERSION}"
    digest = hashlib.sha256(key.encode()).hexdigest()[:16]
    root = Path(cache_root) if cache_root is not None else default_cache_root()
    target = root / f"{path.stem}-{kind}-{digest}"
    if (target / "config.json").is_file():
        return target
    # Conversions appear whole (files.new_folder); a folder without config.json is debris from an older llamacli.
    stale = target.is_dir() and not files.is_empty_folder(target)
    try:
        convert_gguf(path, target, dtype=dtype if not quantized else "bfloat16", progress=progress,
                     overwrite=stale, quantized=quantized)
    except files.NotEmptyError:
        if not (target / "config.json").is_file():  # not a concurrent conversion that finished first
            raise
    return target

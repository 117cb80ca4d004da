"""Describe a checkpoint from its config and safetensors headers, without reading a single tensor.

Only the safetensors headers are read (a 70B checkpoint inspects in a second), and they are checked against
the config by `llamacli.layout`, the same check `load_model` makes: inspect accepts exactly the checkpoints
that load, and tells a broken or truncated one apart from a good one. No torch here.
"""

from __future__ import annotations

import math
from pathlib import Path

from llamacli import layout
from llamacli.quantization import read_quantization
from llamacli.config import load_config
from llamacli.errors import UsageError


def inspect_checkpoint(folder: str | Path, dtype: str = "auto") -> dict:
    """Everything `llamacli inspect` reports, as plain JSON-ready data.

    `dtype` is the dtype the numbers for memory are given in; 'auto' is the checkpoint's own dtype
    (its config's torch_dtype, else the dtype most of its parameters are stored in).
    """
    from llamacli.chat_template import load_chat_template
    from llamacli.errors import LlamaCliError
    from llamacli.tokenizer import load_tokenizer

    folder = Path(folder)
    config = load_config(folder)
    files = layout.weight_files(folder)
    quant = read_quantization(folder)
    used = layout.check_tensors(config, layout.read_tensors(folder, files), folder, quant)
    # Bounded: the check above found every layer stored. Parameters count the float matrices a quantized
    # tensor stands for (its `.weight` keeps the float name), not its bytes or its scales.
    table = layout.expected_tensors(config, lm_head="lm_head.weight" in used)

    by_kind = dict.fromkeys(layout.KINDS, 0)
    stored: dict[str, int] = {}
    for t in used.values():
        if t.name in table:
            by_kind[table[t.name].kind] += math.prod(table[t.name].shape)
        name = layout.SAFETENSORS_DTYPES[t.dtype].name
        stored[name] = stored.get(name, 0) + t.numel
    total = sum(by_kind.values())

    if dtype == "auto":
        dtype = config.torch_dtype if config.torch_dtype in layout.RUN_DTYPES else max(stored, key=stored.get)
        if dtype not in layout.RUN_DTYPES:
            dtype = "float32"
    elif dtype not in layout.RUN_DTYPES:
        raise UsageError(f"unknown dtype '{dtype}' (choose auto, {', '.join(layout.RUN_DTYPES)})")
    per_token = layout.kv_bytes_per_token(config, dtype)
    kv_full = per_token * config.context_length
    weights_bytes = total * layout.dtype_bytes(dtype)
    quantization = None
    if quant is not None:
        qtable = layout.quantized_table(table, quant)
        packed = [t for t in used.values() if qtable[t.name].dtype is not None]  # int weights and their scales
        q_bytes = sum(t.numel * layout.SAFETENSORS_DTYPES[t.dtype].nbytes for t in packed)
        q_params = sum(math.prod(table[t.name].shape) for t in packed if t.name in table)
        weights_bytes = q_bytes + (total - q_params) * layout.dtype_bytes(dtype)  # norms, biases: in dtype
        quantization = {**quant.config_entry(), "description": quant.describe(),
                        "matrix_bytes_per_weight": q_bytes / max(q_params, 1),
                        "bytes_per_weight": weights_bytes / max(total, 1)}

    layers = []
    for i in range(config.n_layers):
        # From the tensors themselves (checked against the config above): rows / head_dim.
        q_rows = used[f"model.layers.{i}.self_attn.q_proj.weight"].shape[0]
        k_rows = used[f"model.layers.{i}.self_attn.k_proj.weight"].shape[0]
        heads, kv_heads = q_rows // config.head_dim, k_rows // config.head_dim
        layers.append({"index": i, "num_heads": heads, "num_kv_heads": kv_heads, "head_dim": config.head_dim,
                       "gqa_group_size": heads // kv_heads})

    try:
        tok = load_tokenizer(folder, extra_eos_ids=config.eos_token_ids)
        tokenizer = {"kind": tok.kind, "vocab_size": tok.vocab_size, "bos_id": tok.bos_id,
                     "eos_ids": list(tok.eos_ids)}
    except LlamaCliError:  # inspect reports a missing tokenizer instead of failing on it
        tokenizer = None
    try:
        has_template = load_chat_template(folder) is not None
    except LlamaCliError:
        has_template = False

    return {
        "path": str(folder),
        "architecture": config.architecture,
        "model_type": config.model_type,
        "num_layers": config.n_layers,
        "hidden_size": config.dim,
        "ffn_dim": config.ffn_dim,
        "vocab_size": config.vocab_size,
        "context_length": config.context_length,
        "max_position_embeddings": config.max_seq_len,
        "num_heads": config.n_heads,
        "num_kv_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "tie_embeddings": config.tie_embeddings,
        "rope": {"theta": config.rope_theta, "type": config.rope_type, "scaling": config.rope_scaling},
        "parameters": total,
        "parameters_by_kind": by_kind,
        "disk": {"files": [p.name for p in files], "bytes": sum(p.stat().st_size for p in files),
                 "dtypes": stored},
        "dtype": dtype,
        "quantization": quantization,
        "kv_cache_bytes_per_token": per_token,
        "kv_cache_bytes_full_context": kv_full,
        "weights_bytes": weights_bytes,
        "memory_estimate_bytes": weights_bytes + kv_full,
        "layers": layers,
        "tokenizer": tokenizer,
        "bos_token_id": tokenizer["bos_id"] if tokenizer else config.bos_token_id,
        "eos_token_ids": tokenizer["eos_ids"] if tokenizer else list(config.eos_token_ids),
        "chat_template": has_template,
    }

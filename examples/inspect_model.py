"""Describe a checkpoint without loading its weights (config + safetensors headers only).

    python examples/inspect_model.py MODEL_FOLDER
"""

import sys

from llamacli.inspect import inspect_checkpoint


def main() -> None:
    info = inspect_checkpoint(sys.argv[1])
    print(f"{info['architecture']}: {info['parameters']:,} parameters, {info['num_layers']} layers, "
          f"context {info['context_length']}")
    for kind, count in info["parameters_by_kind"].items():
        print(f"  {kind:<10} {count:>14,}")
    heads = {(layer["num_heads"], layer["num_kv_heads"], layer["head_dim"]) for layer in info["layers"]}
    for n_heads, n_kv, head_dim in sorted(heads):
        print(f"  attention: {n_heads} heads, {n_kv} KV heads, head dim {head_dim}")
    print(f"  KV cache: {info['kv_cache_bytes_per_token']:,} bytes per token ({info['dtype']})")
    print(f"  tokenizer: {(info['tokenizer'] or {}).get('kind', 'none')}, chat template: {info['chat_template']}")


if __name__ == "__main__":
    main()

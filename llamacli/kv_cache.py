"""The preallocated key/value cache: per layer, keys and values for `max_batch x max_seq_len` positions,
written at `start_pos`, read up to `start_pos + T`. Allocated once per generation; its size is known first.
"""

from __future__ import annotations

import torch

from llamacli.config import LlamaConfig
from llamacli.errors import ContextOverflowError


def cache_bytes(config: LlamaConfig, max_batch: int, max_seq_len: int, dtype: torch.dtype) -> int:
    """Bytes a cache of this size takes (keys and values, all layers)."""
    per_token = 2 * config.n_layers * config.n_kv_heads * config.head_dim * torch.empty((), dtype=dtype).element_size()
    return per_token * max_batch * max_seq_len


class KVCache:
    """Keys and values of every layer, shape (max_batch, n_kv_heads, max_seq_len, head_dim) each."""

    def __init__(self, config: LlamaConfig, max_batch: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 _storage: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None):
        if max_batch < 1 or max_seq_len < 1:
            raise ValueError(f"cache needs max_batch >= 1 and max_seq_len >= 1, got {max_batch}, {max_seq_len}")
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        if _storage is not None:
            self.keys, self.values = _storage
        else:
            shape = (max_batch, config.n_kv_heads, max_seq_len, config.head_dim)
            self.keys = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]
            self.values = [torch.zeros(shape, dtype=dtype, device=device) for _ in range(config.n_layers)]

    @classmethod
    def for_request(cls, config: LlamaConfig, prompt_len: int, max_new_tokens: int, max_batch: int = 1,
                    dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> "KVCache":
        """Size a cache for prompt + max_new_tokens, capped at the model's context (which it must fit)."""
        need = prompt_len + max_new_tokens
        if prompt_len > config.context_length:
            raise ContextOverflowError(
                f"the prompt has {prompt_len} tokens but the model's context is {config.context_length}"
            )
        return cls(config, max_batch, min(need, config.context_length), dtype, device)

    @property
    def nbytes(self) -> int:
        """Bytes held by this cache."""
        return sum(t.numel() * t.element_size() for t in self.keys + self.values)

    def rows(self, start: int, stop: int) -> "KVCache":
        """A view of batch rows [start, stop) sharing this cache's memory (e.g. to prefill one slot)."""
        view = KVCache.__new__(KVCache)
        view.max_batch = stop - start
        view.max_seq_len = self.max_seq_len
        view.keys = [k[start:stop] for k in self.keys]
        view.values = [v[start:stop] for v in self.values]
        return view

    def check(self, start_pos: int | torch.Tensor, n_tokens: int, batch: int) -> int:
        """Raise ContextOverflowError unless positions start_pos..start_pos+n_tokens fit; return the end."""
        if batch > self.max_batch:
            raise ContextOverflowError(f"batch of {batch} rows exceeds the cache's {self.max_batch} rows")
        first = int(start_pos.min()) if isinstance(start_pos, torch.Tensor) else start_pos
        end = (int(start_pos.max()) if isinstance(start_pos, torch.Tensor) else start_pos) + n_tokens
        if first < 0:
            raise ContextOverflowError(f"start_pos must be >= 0, got {first}")
        if end > self.max_seq_len:
            raise ContextOverflowError(
                f"writing {n_tokens} tokens at position {end - n_tokens} needs {end} positions, "
                f"but the KV cache holds {self.max_seq_len}"
            )
        return end

    def update(self, layer: int, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv_heads, T, head_dim) at start_pos; return keys/values for positions [0, end)."""
        B, _, T, _ = k.shape
        keys, values = self.keys[layer], self.values[layer]
        if isinstance(start_pos, int):
            keys[:B, :, start_pos:start_pos + T] = k
            values[:B, :, start_pos:start_pos + T] = v
        else:  # one position per row
            pos = start_pos[:, None] + torch.arange(T, device=k.device)  # (B, T)
            rows = torch.arange(B, device=k.device)[:, None].expand(B, T)
            keys[rows, :, pos] = k.transpose(1, 2)  # index (B, T) -> (B, T, n_kv_heads, head_dim)
            values[rows, :, pos] = v.transpose(1, 2)
        return keys[:B, :, :end], values[:B, :, :end]

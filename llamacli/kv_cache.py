"""The preallocated key/value cache: per layer, keys and values for `max_batch x max_seq_len` positions,
written at `start_pos`, read up to `start_pos + T`. Allocated once per generation; its size is known first.

Two layouts, picked by the number of rows. A one-row cache stores each layer's keys and values as
(1, n_kv_heads, max_seq_len, head_dim), which SDPA reads directly. A cache of several rows (batched decoding)
puts positions last, (max_batch, n_kv_heads, head_dim, max_seq_len): decoding then multiplies every kv head's
queries by its keys as one (head_dim, positions) matrix and its softmax weights by its values the same way
(`model.decode_attention`), which streams the cache faster than SDPA does. SmolLM2 shapes, 30 layers of
cache in DRAM, 2 threads, us per layer: 8 rows at 80..300 positions, 250 vs 353 for SDPA; 3 rows, 92 vs 140;
but 1 row, 51 vs 46, hence SDPA's layout there.
"""

from __future__ import annotations

import torch

from llamacli import layout
from llamacli.config import LlamaConfig
from llamacli.errors import ContextOverflowError


def cache_bytes(config: LlamaConfig, max_batch: int, max_seq_len: int, dtype: torch.dtype) -> int:
    """Bytes a cache of this size takes (keys and values, all layers)."""
    return layout.kv_bytes_per_token(config, str(dtype)) * max_batch * max_seq_len


class KVCache:
    """Keys and values of every layer: (max_batch, n_kv_heads, max_seq_len, head_dim) each, or with
    `positions_last` (the default from 2 rows) (max_batch, n_kv_heads, head_dim, max_seq_len).

    `update` and `row` give (.., positions, head_dim)-shaped views in either layout.
    """

    def __init__(self, config: LlamaConfig, max_batch: int, max_seq_len: int,
                 dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu",
                 positions_last: bool | None = None):
        if max_batch < 1 or max_seq_len < 1:
            raise ValueError(f"cache needs max_batch >= 1 and max_seq_len >= 1, got {max_batch}, {max_seq_len}")
        self.max_batch = max_batch
        self.max_seq_len = max_seq_len
        self.positions_last = max_batch > 1 if positions_last is None else positions_last
        self._index_memo = None
        if self.positions_last:
            shape = (max_batch, config.n_kv_heads, config.head_dim, max_seq_len)
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
        if start == 0 and stop == self.max_batch:
            return self
        view = KVCache.__new__(KVCache)
        view.max_batch = stop - start
        view.max_seq_len = self.max_seq_len
        view.positions_last = self.positions_last
        view.keys = [k[start:stop] for k in self.keys]
        view.values = [v[start:stop] for v in self.values]
        view._index_memo = None
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

    def _flat_index(self, start_pos: torch.Tensor, shape: torch.Size, B: int, T: int,
                    device: torch.device) -> torch.Tensor:
        """Flat indices of positions start_pos[b] + t in a layer of B rows, computed once per forward (every
        layer writes the same places): of (row, head, dim, t) elements with positions last, else of
        (row, head, t) head_dim-long rows."""
        memo = self._index_memo
        key = (B, T, tuple(start_pos.tolist()))  # by value: start_pos may be changed in place between calls
        if memo is not None and memo[0] == key:
            return memo[1]
        n_kv, S = shape[1], shape[3] if self.positions_last else shape[2]
        width = shape[2] if self.positions_last else 1  # head_dim lines of positions per head, or one
        base = torch.arange(B * n_kv * width, device=device).view(B, n_kv * width) * S
        pos = start_pos.to(device)[:, None] + torch.arange(T, device=device)  # (B, T)
        index = (base[:, :, None] + pos[:, None, :]).reshape(-1)
        self._index_memo = (key, index)
        return index

    def update(self, layer: int, start_pos: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k, v (B, n_kv_heads, T, head_dim) at start_pos; return this layer's keys and values for
        positions [0, end) as (B, n_kv_heads, end, head_dim) views (transposed ones with positions last)."""
        B, _, T, D = k.shape
        keys, values = self.keys[layer], self.values[layer]
        if B != keys.shape[0]:
            keys, values = keys[:B], values[:B]
        if self.positions_last:
            keys, values = keys.transpose(-1, -2), values.transpose(-1, -2)  # (B, n_kv, S, head_dim) views
        if isinstance(start_pos, int):
            keys.narrow(2, start_pos, T).copy_(k)  # narrow: one view op per write, this runs 2 x layers per token
            values.narrow(2, start_pos, T).copy_(v)
        else:  # one position per row: one flat write (advanced indexing is 2-4x slower)
            index = self._flat_index(start_pos, self.keys[layer].shape, B, T, k.device)
            k, v = k.to(keys.dtype), v.to(keys.dtype)  # half weights may compute in fp32 (many rows)
            if self.positions_last:
                keys.transpose(-1, -2).view(-1).put_(index, k.transpose(-1, -2).reshape(-1))  # a view for T=1
                values.transpose(-1, -2).view(-1).put_(index, v.transpose(-1, -2).reshape(-1))
            else:
                keys.view(-1, D).index_copy_(0, index, k.reshape(-1, D))  # rows of k in (B, n_kv, T) order
                values.view(-1, D).index_copy_(0, index, v.reshape(-1, D))
        return keys.narrow(2, 0, end), values.narrow(2, 0, end)

    def row(self, layer: int, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of one row of a layer as (n_kv_heads, max_seq_len, head_dim) views, in either layout."""
        keys, values = self.keys[layer][row], self.values[layer][row]
        if self.positions_last:
            return keys.transpose(-1, -2), values.transpose(-1, -2)
        return keys, values

    def copy_prefix(self, row: int, source: "KVCache", source_row: int, n_positions: int) -> None:
        """Copy positions [0, n_positions) of `source`'s row into this cache's `row` (every layer, any layouts)."""
        for layer in range(len(self.keys)):
            for dst, src in zip(self.row(layer, row), source.row(layer, source_row)):
                dst[:, :n_positions] = src[:, :n_positions]

    def move_row(self, src: int, dst: int, n_positions: int) -> None:
        """Copy row src's positions [0, n_positions) into row dst (every layer); row src is left as it was."""
        self.copy_prefix(dst, self, src, n_positions)

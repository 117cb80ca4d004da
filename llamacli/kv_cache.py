"""The preallocated key/value cache: per layer, keys and values for `max_batch x max_seq_len` positions,
written at `start_pos`, read up to `start_pos + T`. Allocated once per generation; its size is known first.

Two layouts, picked by the number of rows. A one-row cache stores each layer's keys and values as
(1, n_kv_heads, max_seq_len, head_dim), which SDPA reads directly. A cache of several rows (batched decoding)
puts positions last, (max_batch, n_kv_heads, head_dim, max_seq_len): decoding then multiplies every kv head's
queries by its keys as one (head_dim, positions) matrix and its softmax weights by its values the same way
(`decode_attention` below), which streams the cache faster than SDPA does. SmolLM2 shapes, 30 layers of
cache in DRAM, 2 threads, us per layer: 8 rows at 80..300 positions, 250 vs 353 for SDPA; 3 rows, 92 vs 140;
but 1 row, 51 vs 46, hence SDPA's layout there. The masks and the decode attention each layout needs live
here too, beside the layout they serve.
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

    def swap_rows(self, a: int, b: int, n_a: int, n_b: int) -> None:
        """Exchange rows a and b: row a's positions [0, n_a) go to row b, row b's [0, n_b) to row a."""
        for layer in range(len(self.keys)):
            for ta, tb in zip(self.row(layer, a), self.row(layer, b)):
                saved = ta[:, :n_a].clone()
                ta[:, :n_b] = tb[:, :n_b]
                tb[:, :n_a] = saved


def causal_mask(start_pos: int | torch.Tensor, T: int, end: int, device: torch.device) -> torch.Tensor | None:
    """Boolean mask (True = attend): query i at position start_pos + i sees keys at positions <= its own.

    Offset by start_pos (SDPA's is_causal is upper-left aligned, wrong when there are more keys than queries).
    Per-row positions give a (B, 1, T, end) mask that also hides a row's stale cache entries past its end.
    """
    keys = torch.arange(end, device=device)
    if isinstance(start_pos, int):
        if T == 1:
            return None  # one query at the last position sees every key in [0, end)
        queries = start_pos + torch.arange(T, device=device)
        return keys[None, :] <= queries[:, None]  # (T, end)
    queries = start_pos[:, None] + torch.arange(T, device=device)  # (B, T)
    return (keys[None, None, :] <= queries[:, :, None])[:, None]  # (B, 1, T, end)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one new token per row over the cache, grouped-query, in q's dtype: (B, n_heads * head_dim).

    q (B, n_heads, 1, head_dim); keys and values (B, n_kv_heads, head_dim, end) as the positions-last cache
    stores them; mask None (every row sees all `end` positions) or additive (B * n_kv_heads, group, end), 0 or
    -inf (see `decode_mask`). Each kv head's `group` query heads form one (group, head_dim) matrix, so every key
    and value is read once per row, as two batched products over (head_dim, positions) matrices. The softmax is
    taken in fp32, as transformers' eager attention does.
    """
    B, H, _, hd = q.shape
    KV, end = keys.shape[1], keys.shape[3]
    # Scaling q rather than the scores saves an op; 1/sqrt(head_dim) is a power of two for 64 and 256 (exact).
    q = (q * hd ** -0.5).reshape(B * KV, H // KV, hd)  # query heads h = kv * group + g, as HF repeats kv heads
    keys = keys.reshape(B * KV, hd, end)  # views: rows and heads merge
    values = values.reshape(B * KV, hd, end)
    scores = torch.bmm(q, keys) if mask is None else torch.baddbmm(mask, q, keys)  # (B * n_kv, group, end)
    p = torch.softmax(scores, dim=-1, dtype=torch.float32).to(q.dtype)
    out = torch.bmm(values, p.transpose(1, 2))  # (B * n_kv, head_dim, group): faster than p @ values^T here
    return out.transpose(1, 2).reshape(B, H * hd)


def decode_mask(start_pos: torch.Tensor, end: int, n_kv_heads: int, group: int,
                dtype: torch.dtype) -> torch.Tensor:
    """The additive mask of `decode_attention` for rows at positions start_pos (B,): row b sees [0, start_pos[b]]."""
    B = start_pos.shape[0]
    seen = torch.arange(end, device=start_pos.device)[None, :] <= start_pos[:, None]  # (B, end)
    mask = torch.zeros((B, end), dtype=dtype, device=start_pos.device).masked_fill_(~seen, float("-inf"))
    return mask[:, None, None].expand(B, n_kv_heads, group, end).reshape(B * n_kv_heads, group, end)


def one_query_mask(positions: int | torch.Tensor, end: int, positions_last: bool, n_kv_heads: int, group: int,
                   dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The mask for one query per row at `positions` over keys [0, end): None for one int position (it sees
    them all), else `decode_mask`'s additive form for a positions-last cache, SDPA's boolean one otherwise."""
    if isinstance(positions, int):
        return None
    positions = positions.to(device)
    if positions_last:
        return decode_mask(positions, end, n_kv_heads, group, dtype)
    return causal_mask(positions, 1, end, device)


def forward_end(cache: KVCache | None, start_pos: int | torch.Tensor, T: int, B: int) -> int:
    """The end of a forward's positions, start_pos + T: checked against the cache (ContextOverflowError), or,
    without a cache, a plain full forward that must start at position 0."""
    if cache is not None:
        return cache.check(start_pos, T, B)
    if not (isinstance(start_pos, int) and start_pos == 0):
        raise ValueError("a forward without a cache must start at position 0")
    return T

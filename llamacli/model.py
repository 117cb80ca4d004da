"""The Llama model, from scratch: RMSNorm, grouped-query attention with RoPE, SwiGLU MLP.

Parameter names are Hugging Face's, so the weight table is nearly the identity. The model does no I/O and
no sampling; the KV cache and the position are passed in: `Llama.forward(tokens, start_pos, cache)`.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamacli.config import LlamaConfig
from llamacli.kv_cache import KVCache
from llamacli.rope import apply_rope, rope_tables


class RMSNorm(nn.Module):
    """Root-mean-square norm computed in fp32 and cast back, as transformers does."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)


class Attention(nn.Module):
    """Grouped-query attention over the filled part of the cache; K/V are never repeated in memory."""

    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads = config.n_heads
        self.n_kv_heads = config.n_kv_heads
        self.head_dim = config.head_dim
        bias = config.attention_bias
        self.q_proj = nn.Linear(config.dim, config.n_heads * config.head_dim, bias=bias)
        self.k_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=bias)
        self.v_proj = nn.Linear(config.dim, config.n_kv_heads * config.head_dim, bias=bias)
        self.o_proj = nn.Linear(config.n_heads * config.head_dim, config.dim, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, start_pos: int | torch.Tensor,
                cache: KVCache | None, end: int, mask: torch.Tensor | None) -> torch.Tensor:
        B, T, _ = x.shape
        q = self.q_proj(x).view(B, T, self.n_heads, self.head_dim).transpose(1, 2)  # (B, n_heads, T, head_dim)
        k = self.k_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, head_dim)
        v = self.v_proj(x).view(B, T, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, n_kv, T, head_dim)
        q = apply_rope(q, cos, sin)
        k = apply_rope(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer, start_pos, k, v, end)  # (B, n_kv, end, head_dim)
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, enable_gqa=self.n_kv_heads != self.n_heads
        )  # (B, n_heads, T, head_dim)
        out = out.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim)  # (B, T, n_heads * head_dim)
        return self.o_proj(out)


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        bias = config.mlp_bias
        self.gate_proj = nn.Linear(config.dim, config.ffn_dim, bias=bias)
        self.up_proj = nn.Linear(config.dim, config.ffn_dim, bias=bias)
        self.down_proj = nn.Linear(config.ffn_dim, config.dim, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Block(nn.Module):
    """One pre-norm transformer layer."""

    def __init__(self, config: LlamaConfig, layer: int):
        super().__init__()
        self.input_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.self_attn = Attention(config, layer)
        self.post_attention_layernorm = RMSNorm(config.dim, config.norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cos, sin, start_pos, cache, end, mask):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, start_pos, cache, end, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Model(nn.Module):
    """The decoder stack (HF's `model.` prefix): embeddings, layers, final norm."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.dim)
        self.layers = nn.ModuleList(Block(config, i) for i in range(config.n_layers))
        self.norm = RMSNorm(config.dim, config.norm_eps)


class Llama(nn.Module):
    """A Llama causal language model: `forward(tokens, start_pos, cache) -> logits`."""

    def __init__(self, config: LlamaConfig):
        super().__init__()
        self.config = config
        self.model = Model(config)
        self.lm_head = nn.Linear(config.dim, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def _rope(self, positions: torch.Tensor | int, T: int, end: int, device: torch.device):
        """cos/sin for the tokens at `positions`, shaped to broadcast over (B, heads, T, head_dim)."""
        cfg = self.config
        if cfg.rope_type == "dynamic" and end > cfg.max_seq_len:
            # Dynamic NTK scaling depends on the current length: build a table for it (rare: past context).
            cos, sin = rope_tables(cfg, end, device, seq_len=end)
        else:
            if self._cos is None or self._cos.shape[0] < end or self._cos.device != device:
                n = max(end, 256)
                n = 1 << (n - 1).bit_length()  # grow by powers of two
                self._cos, self._sin = rope_tables(cfg, n, device)
            cos, sin = self._cos, self._sin
        if isinstance(positions, int):
            return cos[positions:positions + T][None, None], sin[positions:positions + T][None, None]
        idx = positions[:, None] + torch.arange(T, device=device)  # (B, T)
        return cos[idx][:, None], sin[idx][:, None]  # (B, 1, T, head_dim)

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens (B, T) at positions start_pos.. (int, or one per row as a (B,) tensor).

        With a cache, keys/values are written at start_pos and attention reads positions [0, start_pos + T).
        Without one, start_pos must be 0 (a plain full forward). `last_only` returns logits for the last
        position only (B, 1, vocab), which is all a prefill needs.
        """
        B, T = tokens.shape
        device = tokens.device
        if cache is not None:
            end = cache.check(start_pos, T, B)
        else:
            if not (isinstance(start_pos, int) and start_pos == 0):
                raise ValueError("a forward without a cache must start at position 0")
            end = T
        dtype = self.model.embed_tokens.weight.dtype
        cos, sin = self._rope(start_pos, T, end, device)
        cos, sin = cos.to(dtype), sin.to(dtype)
        mask = _causal_mask(start_pos, T, end, device)
        x = self.model.embed_tokens(tokens)  # (B, T, dim)
        for layer in self.model.layers:
            x = layer(x, cos, sin, start_pos, cache, end, mask)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))


def _causal_mask(start_pos: int | torch.Tensor, T: int, end: int, device: torch.device) -> torch.Tensor | None:
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

"""The reference Llama, from scratch: RMSNorm, grouped-query attention with RoPE, SwiGLU MLP.

This is the readable specification and the test oracle: Hugging Face parameter names (so the weight table is
nearly the identity), one module per part, no fusing, no fast path, no I/O and no sampling. The KV cache
and the position are passed in: `Llama.forward(tokens, start_pos, cache)`. What engines run is the
`Runtime` built from a loaded Llama (model/runtime.py), which must give the same logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from llamacli.config import LlamaConfig
from llamacli.kv_cache import KVCache, causal_mask, forward_end
from llamacli.rope import RopeCache, apply_rope


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
            if cache.positions_last:  # transposed views: SDPA wants head_dim contiguous
                k, v = k.contiguous(), v.contiguous()
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
        self.rope = RopeCache(config)

    @property
    def device(self) -> torch.device:
        """The device the weights are on."""
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in."""
        return self.model.embed_tokens.weight.dtype

    def weight_bytes_per_step(self) -> int:
        """Bytes of weights one decode step reads: every parameter once, not the embedding table (a row of
        it is looked up) unless it is tied to the lm_head, which reads it whole (then it counts once)."""
        params = {id(p): p for p in self.parameters()}
        total = sum(p.numel() * p.element_size() for p in params.values())
        embed = self.model.embed_tokens.weight
        if self.lm_head.weight is not embed:
            total -= embed.numel() * embed.element_size()
        return total

    def forward(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0, cache: KVCache | None = None,
                last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab) for tokens (B, T) at positions start_pos.. (int, or one per row as a (B,) tensor).

        With a cache, keys/values are written at start_pos and attention reads positions [0, start_pos + T).
        Without one, start_pos must be 0 (a plain full forward). `last_only` returns logits for the last
        position only (B, 1, vocab), which is all a prefill needs.
        """
        B, T = tokens.shape
        device = tokens.device
        end = forward_end(cache, start_pos, T, B)
        dtype = self.dtype
        cos, sin = self.rope.tables(start_pos, T, end, device)
        cos, sin = cos.to(dtype), sin.to(dtype)
        mask = causal_mask(start_pos, T, end, device)
        x = self.model.embed_tokens(tokens)  # (B, T, dim)
        for layer in self.model.layers:
            x = layer(x, cos, sin, start_pos, cache, end, mask)
        if last_only:
            x = x[:, -1:]
        return self.lm_head(self.model.norm(x))

    def forward_last(self, parts: list[tuple[torch.Tensor, int | torch.Tensor, KVCache]]) -> torch.Tensor:
        """Last-position logits (sum of B, vocab) of every row of several (tokens (B, T), start_pos, cache) parts.

        Each part keeps its own positions and cache (typically `cache.rows(...)` views); here each part is a
        separate forward (the runtime multiplies all parts' rows in one pass over the weights). Every part is
        checked against its cache before any is computed.
        """
        for tokens, start_pos, cache in parts:
            cache.check(start_pos, tokens.shape[1], tokens.shape[0])
        return torch.cat([self(tokens, start_pos, cache, last_only=True)[:, -1] for tokens, start_pos, cache in parts])

"""Rotary position embeddings: inverse frequencies for each scaling variant, fp32 cos/sin tables and the
cache a model keeps them in (`RopeCache`), and `apply_rope` in Hugging Face's half-rotation layout (the
layout HF checkpoints' q/k weights expect).

The formulas follow the published definitions (Su et al.; NTK-aware dynamic scaling; YaRN; Llama 3.1's
frequency smoothing), with the same defaults transformers applies, so logits match it.
"""

from __future__ import annotations

import math

import torch

from llamacli.config import LlamaConfig


def _base_inv_freq(base: float, dim: int) -> torch.Tensor:
    return 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))


def inv_freq(config: LlamaConfig, seq_len: int | None = None) -> tuple[torch.Tensor, float]:
    """Return (inverse frequencies in fp32, attention factor applied to cos/sin) for a sequence length.

    `seq_len` matters only for `dynamic` scaling, whose base grows once the sequence passes the context.
    """
    dim = config.head_dim
    base = config.rope_theta
    s = config.rope_scaling or {}
    kind = config.rope_type
    if kind == "default":
        return _base_inv_freq(base, dim), 1.0
    factor = float(s["factor"])
    if kind == "linear":
        return _base_inv_freq(base, dim) / factor, 1.0
    if kind == "dynamic":
        ctx = config.max_seq_len
        n = max(seq_len or ctx, ctx)
        base = base * ((factor * n / ctx) - (factor - 1)) ** (dim / (dim - 2))
        return _base_inv_freq(base, dim), 1.0
    if kind == "llama3":
        return _llama3_inv_freq(base, dim, factor, s), 1.0
    if kind == "yarn":
        return _yarn_inv_freq(base, dim, factor, s)
    raise ValueError(f"unknown rope type {kind!r}")  # config.py rejects these first


def _llama3_inv_freq(base: float, dim: int, factor: float, s: dict) -> torch.Tensor:
    freq = _base_inv_freq(base, dim)
    low, high = float(s["low_freq_factor"]), float(s["high_freq_factor"])
    old_ctx = float(s["original_max_position_embeddings"])
    low_wavelen, high_wavelen = old_ctx / low, old_ctx / high
    wavelen = 2 * math.pi / freq
    # Long wavelengths are slowed by `factor`, short ones kept, the band between blended smoothly.
    scaled = torch.where(wavelen > low_wavelen, freq / factor, freq)
    smooth = (old_ctx / wavelen - low) / (high - low)
    blended = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_wavelen) * ~(wavelen > low_wavelen)
    return torch.where(medium, blended, scaled)


def _yarn_inv_freq(base: float, dim: int, factor: float, s: dict) -> tuple[torch.Tensor, float]:
    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = s.get("attention_factor")
    if attention_factor is None:
        if s.get("mscale") and s.get("mscale_all_dim"):
            attention_factor = mscale(factor, s["mscale"]) / mscale(factor, s["mscale_all_dim"])
        else:
            attention_factor = mscale(factor)
    beta_fast = s.get("beta_fast") or 32
    beta_slow = s.get("beta_slow") or 1
    old_ctx = s["original_max_position_embeddings"]

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(old_ctx / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(beta_fast), correction_dim(beta_slow)
    if s.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # avoid a division by zero in the ramp
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    pos_freqs = base ** (torch.arange(0, dim, 2).float() / dim)
    extrapolation = 1.0 / pos_freqs
    interpolation = 1.0 / (factor * pos_freqs)
    keep = 1 - ramp  # 1 where frequencies are kept (high), 0 where interpolated (low)
    return interpolation * (1 - keep) + extrapolation * keep, float(attention_factor)


def rope_tables(config: LlamaConfig, n_positions: int, device: torch.device | str = "cpu",
                seq_len: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin, each (n_positions, head_dim) in fp32, for positions 0..n_positions-1."""
    freq, scale = inv_freq(config, seq_len)
    positions = torch.arange(n_positions, dtype=torch.int64, device=device).float()
    angles = positions[:, None] * freq.to(device)[None, :]  # (n_positions, head_dim / 2)
    emb = torch.cat((angles, angles), dim=-1)  # (n_positions, head_dim): HF's half layout
    return emb.cos() * scale, emb.sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x (B, n_heads, T, head_dim) by cos/sin broadcastable to it, with HF's half-rotation."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    rotated = torch.cat((-x2, x1), dim=-1)
    return x * cos + rotated * sin


class RopeCache:
    """cos/sin tables for a model, built in fp32 on first use and grown by powers of two as positions grow.

    Dynamic NTK scaling past the trained context depends on the current length, so there a table is built
    for each call instead, per row for rows at different positions (rare: only past the context).
    """

    def __init__(self, config: LlamaConfig):
        self.config = config
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None

    def tables(self, positions: int | torch.Tensor, T: int, end: int,
               device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """fp32 cos/sin for T tokens from `positions` (an int, or one per row as (B,)), shaped to broadcast
        over (B, heads, T, head_dim): (1, 1, T, head_dim) for an int, (B, 1, T, head_dim) per row."""
        cfg = self.config
        if cfg.rope_type == "dynamic" and end > cfg.max_seq_len and not isinstance(positions, int):
            # Dynamic NTK scales by each sequence's own length: rows at different positions (a batch) each get
            # their own table, so a row's tokens do not depend on its batch mates.
            rows = [self.tables(p, T, p + T, device) for p in positions.tolist()]
            return torch.cat([c for c, _ in rows]), torch.cat([s for _, s in rows])  # (B, 1, T, head_dim)
        if cfg.rope_type == "dynamic" and end > cfg.max_seq_len:
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

"""The runtime: the fast forward engines call, built once from a loaded reference `Llama` at load time.

Decoding one token reads every weight once, so its speed is memory bandwidth plus Python overhead per
operation. The runtime therefore multiplies one fused matrix for q/k/v and one for gate/up, rotates q and k
in one operation, uses one-kernel RMSNorm in fp32, and calls plain functions instead of nested modules. Its
matrices are weight-format objects (model/linear.py) chosen when it is built; the forward only calls
`w.mm(x)`, so it has no branch per format and never fuses again. All token rows of a step (a batch's decode
rows and a new prompt's prefill) go through each matrix in one product.

The runtime owns its tensors: moving, casting or replacing the Llama's parameters afterwards does not change
it, and it has no `to()`: load the checkpoint again for another dtype or device.
"""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from llamacli.config import LlamaConfig
from llamacli.kv_cache import KVCache, causal_mask, decode_attention, forward_end, one_query_mask
from llamacli.model.cpu import attention_dtype, compute_dtype
from llamacli.model.linear import Dense, LinearFormat, build_linear
from llamacli.model.llama import Llama
from llamacli.rope import RopeCache


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers computes it: in fp32, cast back, then scaled."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # one kernel, same bits as the steps below in fp32
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class RuntimeLayer:
    """One block's tensors: the two norm weights and the weight formats of its four products."""

    __slots__ = ("input_norm", "qkv", "o", "post_norm", "gate_up", "down")

    def __init__(self, input_norm: torch.Tensor, qkv: LinearFormat, o: LinearFormat, post_norm: torch.Tensor,
                 gate_up: LinearFormat, down: LinearFormat):
        self.input_norm, self.qkv, self.o = input_norm, qkv, o  # qkv: (n_heads + 2 * n_kv_heads) * head_dim out
        self.post_norm, self.gate_up, self.down = post_norm, gate_up, down  # gate_up: 2 * ffn_dim out


def _release(linear: nn.Linear) -> None:
    """Replace a reference layer's weight by a meta placeholder of its shape, so its memory can go."""
    w = linear.weight
    linear.weight = nn.Parameter(torch.empty(w.shape, dtype=w.dtype, device="meta"), requires_grad=False)


class Runtime:
    """The fast forward of a Llama: same call surface (`config`, `device`, `dtype`, `__call__`, `forward_last`)."""

    def __init__(self, config: LlamaConfig, layers: list[RuntimeLayer], norm: torch.Tensor, embed: torch.Tensor | None,
                 lm_head: LinearFormat, lookup: Callable[[torch.Tensor, torch.dtype], torch.Tensor] | None = None):
        self.config = config
        self.layers = layers
        self.norm = norm  # (dim,)
        self.embed = embed  # (vocab, dim); None when `lookup` reads a quantized table
        self.lm_head = lm_head  # dim -> vocab
        # ids (N,), dtype -> rows (N, dim): a plain table lookup, a quantized table's dequantized rows, or a
        # tensor-parallel rank's lookup of its vocabulary share (summed over the ranks)
        self.lookup = lookup or (lambda ids, dtype: F.embedding(ids, embed))
        self._dtype, self._device = norm.dtype, norm.device
        self._rope = RopeCache(config)

    @classmethod
    @torch.no_grad()
    def build(cls, llama: Llama, pack: bool = True, release: bool = False) -> "Runtime":
        """Fuse and lay out a Llama's weights for its dtype and device (`pack`: oneDNN-packed where it can).

        With `release`, each reference weight is replaced by a meta placeholder once its format is built, so
        memory peaks at one layer over the model (the Llama is unusable after: `load_model` passes it).
        """
        if any(p.is_meta for p in llama.parameters()):
            raise RuntimeError("this model's weights were released; load it again to build a runtime")
        layers = []
        for block in llama.model.layers:
            a, m = block.self_attn, block.mlp
            linears = {"qkv": [a.q_proj, a.k_proj, a.v_proj], "o": [a.o_proj],
                       "gate_up": [m.gate_proj, m.up_proj], "down": [m.down_proj]}
            formats = {}
            for name, mods in linears.items():
                formats[name] = build_linear([mod.weight for mod in mods], [mod.bias for mod in mods], pack)
                if release:
                    for mod in mods:
                        _release(mod)
            layers.append(RuntimeLayer(block.input_layernorm.weight.detach(), formats["qkv"], formats["o"],
                                       block.post_attention_layernorm.weight.detach(), formats["gate_up"],
                                       formats["down"]))
        embed = llama.model.embed_tokens.weight.detach()
        tied = llama.lm_head.weight is llama.model.embed_tokens.weight
        lm_head = build_linear([llama.lm_head.weight], None, pack)
        if tied and isinstance(lm_head, Dense):
            embed = lm_head.weight  # the table is kept once, in the layout the head multiplies fastest
        if release and not tied:
            _release(llama.lm_head)
        return cls(llama.config, layers, llama.model.norm.weight.detach(), embed, lm_head)

    @property
    def device(self) -> torch.device:
        """The device the weights are on."""
        return self._device

    @property
    def dtype(self) -> torch.dtype:
        """The dtype the weights are stored in (half weights may compute in fp32 for many rows on a CPU)."""
        return self._dtype

    def formats(self) -> dict[str, LinearFormat]:
        """Every weight-format object by a Hugging Face-style name (fused ones named for their parts)."""
        out = {}
        for i, L in enumerate(self.layers):
            out[f"model.layers.{i}.self_attn.qkv_proj"] = L.qkv
            out[f"model.layers.{i}.self_attn.o_proj"] = L.o
            out[f"model.layers.{i}.mlp.gate_up_proj"] = L.gate_up
            out[f"model.layers.{i}.mlp.down_proj"] = L.down
        out["lm_head"] = self.lm_head
        return out

    def weight_bytes_per_step(self) -> int:
        """Bytes of weights one decode step reads: every matrix and norm once, not the embedding table (a row
        of it is looked up) unless it is tied to the lm_head, which reads it whole (then it counts once)."""
        norms = [self.norm] + [w for L in self.layers for w in (L.input_norm, L.post_norm)]
        # The lm_head's format counts a tied table; an untied table is only looked up, so it is not counted.
        return sum(f.nbytes for f in self.formats().values()) + sum(w.numel() * w.element_size() for w in norms)

    def __call__(self, tokens: torch.Tensor, start_pos: int | torch.Tensor = 0, cache: KVCache | None = None,
                 last_only: bool = False) -> torch.Tensor:
        """Logits (B, T, vocab), or (B, 1, vocab) with `last_only`, as `Llama.forward`."""
        B, T = tokens.shape
        end = forward_end(cache, start_pos, T, B)
        return self._forward([(tokens, start_pos, cache, end)], last_only)

    def forward_last(self, parts: list[tuple[torch.Tensor, int | torch.Tensor, KVCache]]) -> torch.Tensor:
        """Last-position logits (sum of B, vocab) of every row of several (tokens (B, T), start_pos, cache) parts.

        All parts' rows go through each matrix in one pass over the weights, so a batch can prefill a new
        prompt and decode its other rows in the same step; each part keeps its own positions and cache
        (typically `cache.rows(...)` views). Row results equal separate forwards up to float32 summation
        order in the matrix products.
        """
        checked = []
        for tokens, start_pos, cache in parts:
            checked.append((tokens, start_pos, cache, cache.check(start_pos, tokens.shape[1], tokens.shape[0])))
        logits = self._forward(checked, last_only=True)
        return logits[:, -1] if len(parts) == 1 else logits

    def _forward(self, parts: list[tuple[torch.Tensor, int | torch.Tensor, KVCache | None, int]],
                 last_only: bool) -> torch.Tensor:
        """Logits for each part (tokens (B, T), start_pos, cache, end) in one pass over the weights.

        One part: (B, T | 1, vocab). Several: the last position of every row, parts in order (sum of B, vocab).
        Every matrix product runs once over all parts' rows; rotation, cache writes and attention per part.
        """
        cfg = self.config
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        eps = cfg.norm_eps
        dtype = self._dtype
        N = sum(t.numel() for t, _, _, _ in parts)
        compute = compute_dtype(dtype, self._device, N)
        gqa = KV != H

        views = []  # per part: (rows slice, B, T, cos, sin, mask, causal, start_pos, cache, end)
        offset = 0
        for tokens, start_pos, cache, end in parts:
            B, T = tokens.shape
            cos, sin = self._rope.tables(start_pos, T, end, tokens.device)  # (B | 1, 1, T, head_dim)
            sin = torch.cat((-sin[..., :hd // 2], sin[..., hd // 2:]), dim=-1)  # rotate_half's sign folded in
            cos = cos.transpose(1, 2).to(compute)  # (B | 1, T, 1, head_dim): broadcasts over heads
            sin = sin.transpose(1, 2).to(compute)
            if isinstance(start_pos, int) and start_pos == 0 and T == end:
                mask, causal = None, T > 1  # a square causal block: SDPA's own causal mask is right
            elif T == 1 and cache is not None:
                mask = one_query_mask(start_pos, end, cache.positions_last, KV, H // KV,
                                      attention_dtype(compute, T, self._device), tokens.device)
                causal = False
            else:
                mask, causal = causal_mask(start_pos, T, end, tokens.device), False
            rows = slice(offset, offset + B * T) if len(parts) > 1 else None
            views.append((rows, B, T, cos, sin, mask, causal, start_pos, cache, end))
            offset += B * T

        tokens = parts[0][0].reshape(N) if len(parts) == 1 else torch.cat([t.reshape(-1) for t, _, _, _ in parts])
        x = self.lookup(tokens, dtype).to(compute)  # (N, dim)
        for i, L in enumerate(self.layers):
            # With last_only, the last layer needs only each row's last position past its cache writes: that
            # query alone attends, and the output projection and MLP run on those rows (2.8% of a prefill).
            trim = last_only and i == len(self.layers) - 1
            h = _rms_norm(x, L.input_norm, eps)
            qkv_all = L.qkv.mm(h)  # (N, (n_heads + 2 * n_kv_heads) * head_dim)
            outs = []
            for rows, B, T, cos, sin, mask, causal, start_pos, cache, end in views:
                qkv = (qkv_all if rows is None else qkv_all[rows]).view(B, T, H + 2 * KV, hd)  # (B, T, heads, hd)
                qk = qkv[:, :, :H + KV]  # (B, T, n_heads + n_kv_heads, head_dim)
                qk = qk * cos + qk.roll(hd // 2, -1) * sin  # RoPE on q and k at once
                q = qk[:, :, :H].transpose(1, 2)  # (B, n_heads, T, head_dim)
                k = qk[:, :, H:].transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
                v = qkv[:, :, H + KV:].transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
                att = attention_dtype(compute, T, self._device)
                if trim and T > 1:  # the last query sees every key up to its own position
                    q, causal = q[:, :, -1:], False
                    mask = one_query_mask(start_pos if isinstance(start_pos, int) else start_pos + T - 1, end,
                                          cache is not None and cache.positions_last, KV, H // KV, att, q.device)
                Tq = q.shape[2]
                if cache is not None:
                    keys, values = cache.update(i, start_pos, k, v, end)  # (B, n_kv_heads, end, head_dim)
                    if not cache.positions_last:
                        k, v = keys, values
                    elif Tq == 1:
                        keys, values = keys.transpose(-1, -2).to(att), values.transpose(-1, -2).to(att)
                        out = decode_attention(q.to(att), keys, values, mask)
                        outs.append(out if out.dtype == compute else out.to(compute))
                        continue
                    elif not (isinstance(start_pos, int) and start_pos == 0):  # else all keys are in k, v
                        k, v = keys.contiguous(), values.contiguous()
                if q.dtype != att:
                    q = q.to(att)
                if k.dtype != att:
                    k, v = k.to(att), v.to(att)
                out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, enable_gqa=gqa)
                out = out.transpose(1, 2).reshape(B * Tq, H * hd)  # (B * Tq, n_heads * head_dim)
                outs.append(out if out.dtype == compute else out.to(compute))
            out = outs[0] if len(outs) == 1 else torch.cat(outs)
            if trim:  # keep each row's last position: (sum of B, dim), parts in order
                x = torch.cat([(x if rows is None else x[rows]).view(B, T, -1)[:, -1] for rows, B, T, *_ in views])
            # residual + mm, not one addmm: BLAS would add the residual inside the reduction, which changes the
            # rounding (6e-5 on SmolLM2's logits); added after, the runtime matches transformers bit for bit.
            x = x + L.o.mm(out)
            h = _rms_norm(x, L.post_norm, eps)
            gu = L.gate_up.mm(h)  # (N, 2 * ffn_dim)
            f = gu.shape[1] // 2
            x = x + L.down.mm(F.silu(gu[:, :f]) * gu[:, f:])
        if last_only:  # x holds each row's last position already
            logits = self._head(x)  # (sum of B, vocab)
            return logits.view(views[0][1], 1, -1) if len(parts) == 1 else logits
        if len(parts) > 1:
            raise ValueError("several parts give last-position logits only (last_only=True)")
        B, T = views[0][1], views[0][2]
        return self._head(x).view(B, T, -1)

    def _head(self, x: torch.Tensor) -> torch.Tensor:
        """Final norm and lm_head for rows x (n, dim), in the compute dtype of n rows (a prefill's last
        position multiplies half weights in half rather than upcasting the whole vocabulary matrix)."""
        h = _rms_norm(x, self.norm, self.config.norm_eps)
        h = h.to(compute_dtype(self._dtype, self._device, h.shape[0]))
        return self.lm_head.mm(h).to(self._dtype)

"""The Llama model, from scratch: RMSNorm, grouped-query attention with RoPE, SwiGLU MLP.

Parameter names are Hugging Face's, so the weight table is nearly the identity. The model does no I/O and
no sampling; the KV cache and the position are passed in: `Llama.forward(tokens, start_pos, cache)`.
"""

from __future__ import annotations

import functools

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
        self._cos: torch.Tensor | None = None
        self._sin: torch.Tensor | None = None
        self._fused: _Fused | None = None

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return self.model.embed_tokens.weight.device

    @property
    def dtype(self) -> torch.dtype:
        """The weights' dtype."""
        return self.model.embed_tokens.weight.dtype

    def fuse_projections(self, pack: bool = True) -> "Llama":
        """Fuse q/k/v and gate/up into one matrix each, in the layout the device multiplies fastest.

        The HF-named parameters (`q_proj.weight`, ...) stay, as views into the fused storage, so names,
        shapes, values and the tied embedding are unchanged and no memory is duplicated. Call it after
        the model has its final dtype and device (`load_model` does); moving the model afterwards makes
        the forward fuse again. `unfuse_projections()` goes back to the module-by-module reference path.

        With `pack` (fp32, or bf16 where the CPU has native bf16, on a CPU with oneDNN), the fused matrices are reordered into oneDNN's blocked
        layout instead, and the plain layer weights are released (the HF-named parameters become meta
        placeholders with their shapes): about twice the speed for decode, batches and prefill, at the
        price of float32 summation order (logits within ~3e-6 relative of the reference path). A packed
        model cannot be unfused, moved or cast: load it again for that.
        """
        self._fused = _Fused.build(self, pack=pack)
        return self

    def unfuse_projections(self) -> "Llama":
        """Use the module-by-module reference forward again (parameters keep their values)."""
        if self._fused is not None and self._fused.packed:
            raise RuntimeError("this model's weights were packed for oneDNN; load it with pack=False to unfuse")
        self._fused = None
        return self

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
        if self._fused is not None:
            if not self._fused.matches(self):  # moved or cast since fusing: fuse the new weights again
                self.fuse_projections()
            return self._fused.forward(self, [(tokens, start_pos, cache, end)], last_only)
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

    def forward_last(self, parts: list[tuple[torch.Tensor, int | torch.Tensor, KVCache]]) -> torch.Tensor:
        """Last-position logits (sum of B, vocab) of every row of several (tokens (B, T), start_pos, cache) parts.

        The fast path multiplies all parts' rows in one pass over the weights, so a batch can prefill a new
        prompt and decode its other rows in the same step; each part keeps its own positions and cache
        (typically `cache.rows(...)` views). Row results equal separate forwards up to float32 summation
        order in the matrix products.
        """
        checked = []
        for tokens, start_pos, cache in parts:
            checked.append((tokens, start_pos, cache, cache.check(start_pos, tokens.shape[1], tokens.shape[0])))
        if self._fused is not None and len(parts) > 1:
            if not self._fused.matches(self):
                self.fuse_projections()
            return self._fused.forward(self, checked, last_only=True)
        return torch.cat([self(tokens, start_pos, cache, last_only=True)[:, -1] for tokens, start_pos, cache in parts])


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


# -- the fast path --------------------------------------------------------------------------------------
#
# Decoding one token reads every weight once, so its speed is memory bandwidth plus Python overhead per
# operation. The fast path therefore multiplies one fused matrix for q/k/v and one for gate/up, rotates q
# and k in one operation, uses one-kernel RMSNorm in fp32, and calls plain functions instead of nested
# modules. fp32 weights on a CPU are stored transposed, (in, out): MKL reads them about 1.4x faster for a
# single row that way (x @ W rather than x @ W.T) and as fast for many rows.
#
# Half-precision weights on a CPU: one row reads half the bytes, so decode multiplies in half precision.
# Many rows (prefill, big batches) are slow in half precision on CPUs without native support for it, so
# above HALF_ROWS_MAX rows the forward computes in fp32, upcasting each weight as it is used. Measured on
# an AVX512-BF16 EPYC, 2 threads, all SmolLM2 layer weights: fp16 one row 5.6 ms vs 12 ms upcast, 8 rows
# 38 ms vs 27 ms, 128 rows 586 ms vs 185 ms; bf16 there is native (128 rows 41 ms vs 166 ms upcast), so
# it stays bf16 whatever the rows. The residual stream keeps the model dtype in decode, as transformers.

HALF_ROWS_MAX = 4  # on CPU, half-precision weights without native support compute in half up to this many rows


@functools.cache
def cpu_has_native_bf16() -> bool:
    """Whether this CPU multiplies bfloat16 natively (x86 AVX512-BF16 / AMX, or Arm's BF16 extension)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8", errors="replace") as f:
            for line in f:
                if line.startswith(("flags", "Features")):
                    flags = set(line.split(":", 1)[1].split())
                    return bool(flags & {"avx512_bf16", "amx_bf16", "bf16"})
    except OSError:
        pass
    return False


def compute_dtype(dtype: torch.dtype, device: torch.device, rows: int) -> torch.dtype:
    """The dtype a forward over `rows` token rows computes in, for weights stored in `dtype` on `device`."""
    if dtype not in (torch.float16, torch.bfloat16) or device.type != "cpu" or rows <= HALF_ROWS_MAX:
        return dtype
    if dtype == torch.bfloat16 and cpu_has_native_bf16():
        return dtype
    return torch.float32


def _attention_dtype(compute: torch.dtype, T: int, device: torch.device) -> torch.dtype:
    """The dtype attention runs in. CPU attention in half precision is far slower than upcasting q, k, v to
    fp32 (SmolLM2 shapes, 2 threads: fp16 decode 182 vs 25 us per layer at 128 keys, 815 vs 80 at 600; fp16
    prefill of 128, 990 vs 372 us; bf16 decode 114 vs 30 us), except bf16 prefill where the CPU has native
    bf16 (465 vs 511 us). The result goes back to the compute dtype."""
    if device.type != "cpu" or compute not in (torch.float16, torch.bfloat16):
        return compute
    if compute == torch.bfloat16 and T > 1 and cpu_has_native_bf16():
        return compute
    return torch.float32


# oneDNN picks the packed layout for an expected number of rows. 8 streams best at every size measured
# (SmolLM2 fp32, 2 threads, all weights): hint 1 -> 15.5 ms at 1 row, 25 ms at 8; hint 8 -> 10.7 / 14.0 ms.
PACK_ROWS_HINT = 8


class _Packed:
    """An fp32 (or native bf16) weight (out, in) reordered once into oneDNN's blocked layout for x @ W.T.

    MKL's sgemm repacks the weight on every call, which for a few rows costs about as much as the product;
    oneDNN's prepacked kernel streams it once. Measured on SmolLM2 (EPYC, 2 threads): decode step 31 -> 19 ms
    at one row, 64 -> 38 ms at eight rows, prefill 128 tokens 540 -> 1050 tok/s.
    """

    __slots__ = ("weight", "dtype", "shape")

    def __init__(self, weight: torch.Tensor):
        self.weight = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), PACK_ROWS_HINT)
        self.dtype = weight.dtype
        self.shape = (weight.shape[1], weight.shape[0])  # (in, out), as the plain fast-path matrices


def model_will_pack(dtype: torch.dtype) -> bool:
    """Whether CPU weights of `dtype` get oneDNN-packed by `fuse_projections(pack=True)`.

    oneDNN packs fp32, and bf16 where the CPU multiplies it natively (there bf16 computes in bf16 for any
    number of rows, so inputs always match the packed dtype).
    """
    return _onednn_available(dtype) and (
        dtype == torch.float32 or (dtype == torch.bfloat16 and cpu_has_native_bf16()))


@functools.cache
def _onednn_available(dtype: torch.dtype = torch.float32) -> bool:
    """Whether this torch build can prepack linear weights of `dtype` with oneDNN (and gets the right answer)."""
    try:
        if not torch.backends.mkldnn.is_available():
            return False
        w = (torch.arange(12, dtype=torch.float32).view(3, 4) / 7).to(dtype)
        x = (torch.arange(8, dtype=torch.float32).view(2, 4) / 5).to(dtype)
        got = torch.ops.mkldnn._linear_pointwise(x, _Packed(w).weight, None, "none", [], "")
        return bool(torch.allclose(got.float(), x.float() @ w.float().t(), atol=1e-2))
    except (RuntimeError, AttributeError, NotImplementedError):
        return False


# Half weights upcast for many rows (prefill) are also worth packing for oneDNN on the spot: the pack costs
# about one more pass over the weight, the packed product saves more from here on. All SmolLM2 weights, fp16
# on an AVX512 EPYC without native fp16, 2 threads: 64 rows 170 ms upcast vs 184 ms upcast+pack, 96 rows
# 204 vs 184, 128 rows 249-347 vs 218-230, 512 rows 941 vs 520.
HALF_PACK_ROWS_MIN = 96


def _mm(x: torch.Tensor, w_t: torch.Tensor | _Packed, bias: torch.Tensor | None) -> torch.Tensor:
    """x (N, in) @ w_t (in, out) [+ bias], upcasting half weights when x is fp32."""
    if type(w_t) is _Packed:
        return torch.ops.mkldnn._linear_pointwise(x, w_t.weight, bias, "none", [], "")
    if w_t.dtype != x.dtype:
        bias = bias.to(x.dtype) if bias is not None else None
        if x.shape[0] >= HALF_PACK_ROWS_MIN and x.dtype == torch.float32 and x.device.type == "cpu" \
                and _onednn_available(torch.float32):
            packed = torch.ops.mkldnn._reorder_linear_weight(w_t.t().to(x.dtype).contiguous(), x.shape[0])
            return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
        w_t = w_t.to(x.dtype)
    if bias is None:
        return torch.mm(x, w_t)
    return torch.addmm(bias, x, w_t)


def _mm_add(residual: torch.Tensor, x: torch.Tensor, w_t: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """residual + (x @ w_t [+ bias]).

    Not folded into one addmm: BLAS then adds the residual inside the reduction, which changes the
    rounding (6e-5 on SmolLM2's logits); added after, the fast path matches transformers bit for bit.
    """
    return residual + _mm(x, w_t, bias)


def decode_attention(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor,
                     mask: torch.Tensor | None) -> torch.Tensor:
    """Attention of one new token per row over the cache, grouped-query, in q's dtype: (B, n_heads * head_dim).

    q (B, n_heads, 1, head_dim); keys and values (B, n_kv_heads, head_dim, end) as the cache stores them; mask
    None (every row sees all `end` positions) or additive (B * n_kv_heads, group, end), 0 or -inf (see
    `decode_mask`). Each kv head's `group` query heads form one (group, head_dim) matrix, so every key and
    value is read once per row, as two batched products over (head_dim, positions) matrices. The softmax is
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


def _one_query_mask(positions: int | torch.Tensor, end: int, positions_last: bool, n_kv_heads: int, group: int,
                    dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """The mask for one query per row at `positions` over keys [0, end): None for one int position (it sees
    them all), else `decode_mask`'s additive form for a positions-last cache, SDPA's boolean one otherwise."""
    if isinstance(positions, int):
        return None
    positions = positions.to(device)
    if positions_last:
        return decode_mask(positions, end, n_kv_heads, group, dtype)
    return _causal_mask(positions, 1, end, device)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as transformers computes it: in fp32, cast back, then scaled."""
    if x.dtype == torch.float32 and weight.dtype == torch.float32:
        return F.rms_norm(x, weight.shape, weight, eps)  # one kernel, same bits as the steps below in fp32
    dtype = x.dtype
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(dtype)


class _Layer:
    """One block's tensors for the fast path; weights are (in, out) views or contiguous tensors."""

    __slots__ = ("ln1", "qkv", "qkv_b", "o", "o_b", "ln2", "gate_up", "gate_up_b", "down", "down_b")

    def __init__(self, **kw):
        for k, v in kw.items():
            setattr(self, k, v)


class _Fused:
    """Fused weights of a Llama and the forward that uses them."""

    def __init__(self, layers: list[_Layer], lm_head: torch.Tensor, embed: torch.Tensor, dtype: torch.dtype,
                 device: torch.device, packed: bool = False):
        self.packed = packed
        self.layers = layers
        self.lm_head = lm_head  # (dim, vocab)
        self.embed = embed  # the parameter itself, to notice a later move or cast
        self.dtype = dtype
        self.device = device

    def matches(self, model: "Llama") -> bool:
        """Whether the model's parameters are still the ones fused (not moved or cast since)."""
        w = model.model.embed_tokens.weight
        # Module.to() swaps each parameter's .data in place: the same object, but no longer our views.
        return w is self.embed and w.dtype == self.dtype and w.device == self.device

    @staticmethod
    def build(model: "Llama", pack: bool = True) -> "_Fused":
        """Fuse the model's projections in place (parameters become views) and collect the fast-path tensors."""
        emb = model.model.embed_tokens.weight
        dtype, device = emb.dtype, emb.device
        if any(p.is_meta for p in model.parameters()):
            raise RuntimeError("this model's weights were packed for oneDNN and released; load it again to "
                               "change its dtype or device")
        transposed = device.type == "cpu" and dtype == torch.float32
        pack = pack and device.type == "cpu" and model_will_pack(dtype)

        def fuse(mods: list[nn.Linear], keep: bool = False) -> tuple[torch.Tensor, torch.Tensor | None]:
            """One (in, out) matrix for several Linear layers sharing their input; re-point their weights.

            When packing, the matrix is oneDNN-packed instead and the plain weights are released (unless
            `keep`: the tied lm_head is also the embedding table).
            """
            with torch.no_grad():
                if pack:
                    plain = torch.cat([m.weight.detach() for m in mods], 0)  # (sum of out, in)
                    packed = _Packed(plain)
                    bias = torch.cat([m.bias.detach() for m in mods], 0) if mods[0].bias is not None else None
                    if not keep:
                        for m in mods:
                            m.weight = nn.Parameter(torch.empty(m.weight.shape, dtype=m.weight.dtype, device="meta"),
                                                 requires_grad=False)
                    return packed, bias
                if len(mods) == 1 and not transposed:
                    w = mods[0].weight.detach()
                else:
                    w = torch.cat([m.weight.detach() for m in mods], 0)  # (sum of out, in)
                if transposed:
                    w = w.t().contiguous().t()  # same values, stored (in, out)
                start = 0
                for m in mods:
                    n = m.weight.shape[0]
                    m.weight = nn.Parameter(w[start:start + n], requires_grad=False)
                    start += n
                bias = None
                if mods[0].bias is not None:
                    bias = torch.cat([m.bias.detach() for m in mods], 0)
            return w.t(), bias  # (in, out)

        layers = []
        for block in model.model.layers:
            a, m = block.self_attn, block.mlp
            qkv, qkv_b = fuse([a.q_proj, a.k_proj, a.v_proj])
            o, o_b = fuse([a.o_proj])
            gate_up, gate_up_b = fuse([m.gate_proj, m.up_proj])
            down, down_b = fuse([m.down_proj])
            layers.append(_Layer(ln1=block.input_layernorm.weight.detach(), qkv=qkv, qkv_b=qkv_b, o=o, o_b=o_b,
                                 ln2=block.post_attention_layernorm.weight.detach(), gate_up=gate_up,
                                 gate_up_b=gate_up_b, down=down, down_b=down_b))
        tied = model.lm_head.weight is model.model.embed_tokens.weight
        lm_head, _ = fuse([model.lm_head], keep=tied)
        if tied:
            model.model.embed_tokens.weight = model.lm_head.weight
        return _Fused(layers, lm_head, model.model.embed_tokens.weight, dtype, device, packed=pack)

    def forward(self, model: "Llama", parts: list[tuple[torch.Tensor, int | torch.Tensor, KVCache | None, int]],
                last_only: bool) -> torch.Tensor:
        """Logits for each part (tokens (B, T), start_pos, cache, end) in one pass over the weights.

        One part: (B, T | 1, vocab). Several: the last position of every row, parts in order (sum of B, vocab).
        Every matrix product runs once over all parts' rows; rotation, cache writes and attention per part.
        """
        cfg = model.config
        H, KV, hd = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        eps = cfg.norm_eps
        dtype = self.dtype
        N = sum(t.numel() for t, _, _, _ in parts)
        compute = compute_dtype(dtype, self.device, N)
        gqa = KV != H

        views = []  # per part: (rows slice, B, T, cos, sin, mask, causal, start_pos, cache, end)
        offset = 0
        for tokens, start_pos, cache, end in parts:
            B, T = tokens.shape
            cos, sin = model._rope(start_pos, T, end, tokens.device)  # (B | 1, 1, T, head_dim)
            sin = torch.cat((-sin[..., :hd // 2], sin[..., hd // 2:]), dim=-1)  # rotate_half's sign folded in
            cos = cos.transpose(1, 2).to(compute)  # (B | 1, T, 1, head_dim): broadcasts over heads
            sin = sin.transpose(1, 2).to(compute)
            if isinstance(start_pos, int) and start_pos == 0 and T == end:
                mask, causal = None, T > 1  # a square causal block: SDPA's own causal mask is right
            elif T == 1 and cache is not None:
                mask = _one_query_mask(start_pos, end, cache.positions_last, KV, H // KV,
                                       _attention_dtype(compute, T, self.device), tokens.device)
                causal = False
            else:
                mask, causal = _causal_mask(start_pos, T, end, tokens.device), False
            rows = slice(offset, offset + B * T) if len(parts) > 1 else None
            views.append((rows, B, T, cos, sin, mask, causal, start_pos, cache, end))
            offset += B * T

        tokens = parts[0][0].reshape(N) if len(parts) == 1 else torch.cat([t.reshape(-1) for t, _, _, _ in parts])
        x = F.embedding(tokens, self.embed).to(compute)  # (N, dim)
        for i, L in enumerate(self.layers):
            # With last_only, the last layer needs only each row's last position past its cache writes: that
            # query alone attends, and the output projection and MLP run on those rows (2.8% of a prefill).
            trim = last_only and i == len(self.layers) - 1
            h = _rms_norm(x, L.ln1, eps)
            qkv_all = _mm(h, L.qkv, L.qkv_b)  # (N, (n_heads + 2 * n_kv_heads) * head_dim)
            outs = []
            for rows, B, T, cos, sin, mask, causal, start_pos, cache, end in views:
                qkv = (qkv_all if rows is None else qkv_all[rows]).view(B, T, H + 2 * KV, hd)  # (B, T, heads, hd)
                qk = qkv[:, :, :H + KV]  # (B, T, n_heads + n_kv_heads, head_dim)
                qk = qk * cos + qk.roll(hd // 2, -1) * sin  # RoPE on q and k at once
                q = qk[:, :, :H].transpose(1, 2)  # (B, n_heads, T, head_dim)
                k = qk[:, :, H:].transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
                v = qkv[:, :, H + KV:].transpose(1, 2)  # (B, n_kv_heads, T, head_dim)
                att = _attention_dtype(compute, T, self.device)
                if trim and T > 1:  # the last query sees every key up to its own position
                    q, causal = q[:, :, -1:], False
                    mask = _one_query_mask(start_pos if isinstance(start_pos, int) else start_pos + T - 1, end,
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
            x = _mm_add(x, out, L.o, L.o_b)
            h = _rms_norm(x, L.ln2, eps)
            gu = _mm(h, L.gate_up, L.gate_up_b)  # (N, 2 * ffn_dim)
            f = gu.shape[1] // 2
            x = _mm_add(x, F.silu(gu[:, :f]) * gu[:, f:], L.down, L.down_b)
        if last_only:  # x holds each row's last position already
            logits = self._head(model, x, eps)  # (sum of B, vocab)
            return logits.view(views[0][1], 1, -1) if len(parts) == 1 else logits
        if len(parts) > 1:
            raise ValueError("several parts give last-position logits only (last_only=True)")
        B, T = views[0][1], views[0][2]
        return self._head(model, x, eps).view(B, T, -1)

    def _head(self, model: "Llama", x: torch.Tensor, eps: float) -> torch.Tensor:
        """Final norm and lm_head for rows x (n, dim), in the compute dtype of n rows (a prefill's last
        position multiplies half weights in half rather than upcasting the whole vocabulary matrix)."""
        h = _rms_norm(x, model.model.norm.weight.detach(), eps)
        h = h.to(compute_dtype(self.dtype, self.device, h.shape[0]))
        return _mm(h, self.lm_head, None).to(self.dtype)

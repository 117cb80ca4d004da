"""The KV cache: sizing, overflow before compute, per-row writes; the masks and the decode attention of its layouts."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from llamacli.config import LlamaConfig
from llamacli.errors import ContextOverflowError
from llamacli.kv_cache import KVCache, cache_bytes, causal_mask, decode_attention, decode_mask, one_query_mask

CFG = LlamaConfig(dim=64, n_layers=3, n_heads=4, n_kv_heads=2, head_dim=16, ffn_dim=128, vocab_size=100,
                  max_seq_len=32)


def test_size_is_known_before_allocation():
    expected = cache_bytes(CFG, 2, 20, torch.float32)
    assert expected == 2 * 3 * 2 * 16 * 4 * 2 * 20
    assert KVCache(CFG, 2, 20).nbytes == expected


def test_for_request_caps_at_context_and_refuses_long_prompts():
    assert KVCache.for_request(CFG, 10, 100).max_seq_len == 32
    assert KVCache.for_request(CFG, 10, 5).max_seq_len == 15
    with pytest.raises(ContextOverflowError, match="the prompt has 40 tokens but the model's context is 32"):
        KVCache.for_request(CFG, 40, 1)


def test_overflow_names_the_numbers():
    cache = KVCache(CFG, 1, 8)
    with pytest.raises(ContextOverflowError, match="writing 3 tokens at position 6 needs 9 positions, but the KV cache holds 8"):
        cache.check(6, 3, 1)


def test_overflow_is_raised_before_any_compute(tiny_dir):
    from llamacli.weights import load_model

    model = load_model(tiny_dir, device="cpu")
    cache = KVCache(model.config, 1, 4)
    with pytest.raises(ContextOverflowError):
        model(torch.tensor([[1, 2, 3, 4, 5]]), 0, cache)
    assert all(float(k.abs().sum()) == 0 for k in cache.keys)  # nothing was written


@pytest.mark.parametrize("positions_last", [False, True])
def test_per_row_update_writes_each_row_at_its_position(positions_last):
    cache = KVCache(CFG, 2, 8, positions_last=positions_last)
    k = torch.randn(2, 2, 1, 16)
    keys, _ = cache.update(0, torch.tensor([3, 5]), k, k, end=6)
    assert keys.shape == (2, 2, 6, 16)
    assert torch.equal(keys[0, :, 3], k[0, :, 0]) and torch.equal(keys[1, :, 5], k[1, :, 0])
    row0, row1 = cache.row(0, 0)[0], cache.row(0, 1)[0]  # (n_kv_heads, max_seq_len, head_dim)
    assert torch.equal(row0[:, 3], k[0, :, 0]) and torch.equal(row1[:, 5], k[1, :, 0])
    assert not row0[:, [0, 1, 2, 4, 5, 6, 7]].any() and not row1[:, :5].any()
    shape = (2, 2, 16, 8) if positions_last else (2, 2, 8, 16)
    assert cache.keys[0].shape == shape


def test_layout_follows_the_number_of_rows():
    assert not KVCache(CFG, 1, 8).positions_last
    assert KVCache(CFG, 2, 8).positions_last
    assert KVCache(CFG, 4, 8).rows(1, 2).positions_last


@pytest.mark.parametrize("positions_last", [False, True])
def test_per_row_update_matches_indexing_for_several_tokens_and_a_row_view(positions_last):
    """The flat write equals writing each row's slice by hand, for T > 1 and a rows() view."""
    cfg = CFG
    cache = KVCache(cfg, 4, 16, positions_last=positions_last)
    view = cache.rows(1, 4)
    start = torch.tensor([0, 7, 3])
    k = torch.randn(3, cfg.n_kv_heads, 5, cfg.head_dim)
    v = torch.randn(3, cfg.n_kv_heads, 5, cfg.head_dim)
    for layer in range(cfg.n_layers):
        view.update(layer, start, k, v, end=12)
    for layer in range(cfg.n_layers):
        for b, p in enumerate(start.tolist()):
            keys, values = cache.row(layer, 1 + b)
            assert torch.equal(keys[:, p:p + 5], k[b]) and torch.equal(values[:, p:p + 5], v[b])
            outside = torch.ones(keys.shape[1], dtype=torch.bool)
            outside[p:p + 5] = False
            assert not keys[:, outside].any() and not values[:, outside].any()  # nothing else written
        assert not cache.keys[layer][0].any()  # row 0 is outside the view


@pytest.mark.parametrize("positions_last", [False, True])
def test_per_row_update_notices_start_pos_changed_in_place(positions_last):
    cfg = CFG
    cache = KVCache(cfg, 2, 8, positions_last=positions_last)
    start = torch.tensor([1, 2])
    one = torch.ones(2, cfg.n_kv_heads, 1, cfg.head_dim)
    cache.update(0, start, one, one, end=3)
    start += 2
    cache.update(0, start, 2 * one, 2 * one, end=5)
    assert torch.equal(cache.row(0, 0)[0][:, 3], 2 * one[0, :, 0])
    assert torch.equal(cache.row(0, 1)[0][:, 4], 2 * one[1, :, 0])


@pytest.mark.parametrize("source_last, dest_last", [(False, True), (True, True), (True, False), (False, False)])
def test_copy_prefix_and_move_row_copy_positions_of_every_layer(source_last, dest_last):
    source = KVCache(CFG, 1, 8, positions_last=source_last)
    for layer in range(CFG.n_layers):
        source.keys[layer].normal_()
        source.values[layer].normal_()
    cache = KVCache(CFG, 3, 10, positions_last=dest_last)
    cache.copy_prefix(2, source, 0, 5)
    for layer in range(CFG.n_layers):
        (k, v), (sk, sv) = cache.row(layer, 2), source.row(layer, 0)
        assert torch.equal(k[:, :5], sk[:, :5]) and torch.equal(v[:, :5], sv[:, :5])
        assert not k[:, 5:].any() and not cache.keys[layer][:2].any()
    cache.move_row(2, 0, 4)
    for layer in range(CFG.n_layers):
        (k, v), (sk, sv) = cache.row(layer, 0), source.row(layer, 0)
        assert torch.equal(k[:, :4], sk[:, :4]) and torch.equal(v[:, :4], sv[:, :4])
        assert not k[:, 4:].any()


@pytest.mark.parametrize("positions_last", [False, True])
def test_swap_rows_exchanges_their_positions_in_every_layer(positions_last):
    cache = KVCache(CFG, 3, 10, positions_last=positions_last)
    for layer in range(CFG.n_layers):
        cache.keys[layer].normal_()
        cache.values[layer].normal_()
    before = [[t.clone() for t in cache.row(layer, r)] for layer in range(CFG.n_layers) for r in (0, 2)]
    cache.swap_rows(0, 2, 6, 3)  # row 0 holds 6 positions, row 2 holds 3
    for layer in range(CFG.n_layers):
        (k0, v0), (k2, v2) = before[2 * layer], before[2 * layer + 1]
        (n0, w0), (n2, w2) = cache.row(layer, 0), cache.row(layer, 2)
        assert torch.equal(n2[:, :6], k0[:, :6]) and torch.equal(w2[:, :6], v0[:, :6])
        assert torch.equal(n0[:, :3], k2[:, :3]) and torch.equal(w0[:, :3], v2[:, :3])


def test_causal_mask_is_offset_by_start_pos():
    """Queries at positions 2..4 over keys 0..4 see their own position and before (not SDPA's upper-left
    alignment); per-row positions give one mask per row; one query at an int position needs none."""
    want = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.equal(causal_mask(2, 3, 5, torch.device("cpu")), want)
    per_row = causal_mask(torch.tensor([2, 0]), 3, 5, torch.device("cpu"))
    assert per_row.shape == (2, 1, 3, 5)
    assert torch.equal(per_row[0, 0], want) and torch.equal(per_row[1, 0], torch.ones(3, 5).tril().bool())
    assert causal_mask(4, 1, 5, torch.device("cpu")) is None


def test_one_query_mask_follows_the_layout():
    cpu = torch.device("cpu")
    assert one_query_mask(7, 8, True, 2, 3, torch.float32, cpu) is None
    positions = torch.tensor([1, 4])
    additive = one_query_mask(positions, 5, True, 2, 3, torch.float32, cpu)
    assert torch.equal(additive, decode_mask(positions, 5, 2, 3, torch.float32))
    assert additive.shape == (2 * 2, 3, 5) and torch.isinf(additive[0, :, 2:]).all() and not additive[2:].any()
    boolean = one_query_mask(positions, 5, False, 2, 3, torch.float32, cpu)
    assert torch.equal(boolean, causal_mask(positions, 1, 5, cpu))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_decode_attention_equals_sdpa_with_per_row_lengths(dtype):
    """The decode attention over the positions-last cache equals SDPA over (positions, head_dim) keys, with
    grouped-query heads and rows that see different numbers of positions."""
    torch.manual_seed(0)
    B, H, KV, hd, end = 4, 6, 2, 16, 11
    q = torch.randn(B, H, 1, hd, dtype=dtype)
    k = torch.randn(B, KV, end, hd, dtype=dtype)
    v = torch.randn(B, KV, end, hd, dtype=dtype)
    start_pos = torch.tensor([10, 0, 4, 7])
    seen = (torch.arange(end)[None, :] <= start_pos[:, None])[:, None, None]  # (B, 1, 1, end)
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=seen, enable_gqa=True)
    got = decode_attention(q, k.transpose(-1, -2), v.transpose(-1, -2), decode_mask(start_pos, end, KV, H // KV, dtype))
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=2e-2)
    torch.testing.assert_close(got.float(), want.transpose(1, 2).reshape(B, H * hd), **tol)
    # Without a mask every row sees all positions.
    full = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), enable_gqa=True)
    got = decode_attention(q, k.transpose(-1, -2), v.transpose(-1, -2), None)
    torch.testing.assert_close(got.float(), full.transpose(1, 2).reshape(B, H * hd), **tol)

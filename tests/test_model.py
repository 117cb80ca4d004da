"""Our model against transformers on tiny random checkpoints of every supported shape, on every path (the
reference modules, the packed runtime, the unpacked runtime), and its own equivalences: cache vs full
forward, chunked vs one-shot prefill, batch rows vs single rows."""

from __future__ import annotations

import pytest
import torch

from llamacli.kv_cache import KVCache
from llamacli.weights import load_model

pytestmark = pytest.mark.parity

FIXTURES = {
    "gqa": {},
    "mha": dict(num_key_value_heads=4),
    "mqa": dict(num_key_value_heads=1),
    "tied": dict(tie_word_embeddings=True),
    "untied-mha": dict(tie_word_embeddings=False, num_key_value_heads=4),
    "bias": dict(attention_bias=True, mlp_bias=True),
    "head-dim": dict(head_dim=32),
    "theta": dict(rope_theta=500000.0),
    "linear": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "linear-legacy": dict(rope_scaling={"rope_type": "linear", "factor": 2.0}, layout="legacy"),
    "dynamic": dict(rope_scaling={"rope_type": "dynamic", "factor": 2.0}, max_position_embeddings=16),
    "llama3": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                 "high_freq_factor": 4.0, "original_max_position_embeddings": 16}),
    "llama3-legacy": dict(rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                        "high_freq_factor": 4.0, "original_max_position_embeddings": 16},
                          layout="legacy"),
    "yarn": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}),
    "yarn-legacy": dict(rope_scaling={"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16,
                                      "beta_fast": 16, "beta_slow": 2}, layout="legacy"),
    "sharded": dict(shard=True),
    "bf16": dict(store_dtype="bfloat16"),
    "fp16": dict(store_dtype="float16"),
    "padded-vocab": dict(vocab_size=136),  # embeddings padded past the ids used (PROMPT's are all < 128)
}
# How the model is loaded: the reference modules, and the runtime with and without oneDNN packing.
PATHS = {"reference": dict(runtime=False), "packed": dict(pack=True), "unpacked": dict(pack=False)}
PROMPT = [1, 17, 43, 99, 5, 64, 23, 77, 12, 8, 101, 33, 56, 90, 7, 3, 120, 45, 66, 14, 2, 9, 88, 31]


def hf_model(path):
    import transformers

    return transformers.LlamaForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def greedy(model, ids: list[int], n: int, eos: set[int]) -> list[int]:
    """Prefill then one-token steps through a cache, argmax each time."""
    cache = KVCache(model.config, 1, len(ids) + n)
    logits = model(torch.tensor([ids]), 0, cache, last_only=True)
    out, pos = [], len(ids)
    for _ in range(n):
        token = int(logits[0, -1].argmax())
        out.append(token)
        if token in eos:
            break
        logits = model(torch.tensor([[token]]), pos, cache)
        pos += 1
    return out



@pytest.fixture(scope="module", params=sorted(FIXTURES), ids=sorted(FIXTURES))
def checkpoint(request, tmp_path_factory):
    """(fixture name, checkpoint folder, the transformers model of it)."""
    from tests.conftest import write_tiny_checkpoint

    path = write_tiny_checkpoint(tmp_path_factory.mktemp(request.param) / "ckpt", **FIXTURES[request.param])
    return request.param, path, hf_model(path)


@pytest.fixture(scope="module", params=sorted(PATHS), ids=sorted(PATHS))
def pair(request, checkpoint):
    """(fixture name, our model loaded along one path, the transformers model)."""
    name, path, ref = checkpoint
    return name, load_model(path, dtype="float32", device="cpu", **PATHS[request.param]), ref


@torch.no_grad()
def test_logits_match_transformers(pair):
    name, ours, ref = pair
    ids = torch.tensor([PROMPT])
    expected = ref(ids).logits
    got = ours(ids)
    diff = (got - expected).abs().max().item()
    print(f"\n{name}: max |logit diff| vs transformers = {diff:.2e}")
    assert got.shape == expected.shape
    assert diff < 1e-4


@torch.no_grad()
def test_prefill_then_steps_equal_full_forward(pair):
    name, ours, _ = pair
    ids = PROMPT[:14] if name == "dynamic" else PROMPT  # dynamic NTK changes frequencies past its context
    full = ours(torch.tensor([ids]))
    cache = KVCache(ours.config, 1, len(ids))
    split = 6
    pieces = [ours(torch.tensor([ids[:split]]), 0, cache)]
    for pos in range(split, len(ids)):
        pieces.append(ours(torch.tensor([[ids[pos]]]), pos, cache))
    stepped = torch.cat(pieces, dim=1)
    torch.testing.assert_close(stepped, full, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_batched_decode_rows_match_transformers(pair):
    """Two rows at different positions decoding through a several-row (positions-last) cache give, at every
    step, transformers' logits for each row's own sequence: every attention shape, head_dim and rope variant."""
    name, ours, ref = pair
    seqs = [PROMPT[:11], PROMPT[5:20]]  # within the dynamic fixture's 16 positions
    prompt_lens = [6, 10]
    cache = KVCache(ours.config, 2, 16)
    assert cache.positions_last
    got = [[ours(torch.tensor([s[:n]]), 0, cache.rows(b, b + 1))[0, -1]]
           for b, (s, n) in enumerate(zip(seqs, prompt_lens))]
    for step in range(5):
        pos = torch.tensor([n + step for n in prompt_lens])
        tokens = torch.tensor([[s[n + step]] for s, n in zip(seqs, prompt_lens)])
        logits = ours(tokens, pos, cache)
        for b in range(2):
            got[b].append(logits[b, -1])
    for b, (s, n) in enumerate(zip(seqs, prompt_lens)):
        want = ref(torch.tensor([s[:n + 5]])).logits[0, n - 1:]
        torch.testing.assert_close(torch.stack(got[b]), want, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_chunked_prefill_equals_one_shot(pair):
    name, ours, _ = pair
    ids = PROMPT[:14] if name == "dynamic" else PROMPT
    cache = KVCache(ours.config, 1, len(ids))
    one_shot = ours(torch.tensor([ids]), 0, cache)
    cache2 = KVCache(ours.config, 1, len(ids))
    chunks = [ours(torch.tensor([ids[i:i + 5]]), i, cache2) for i in range(0, len(ids), 5)]
    torch.testing.assert_close(torch.cat(chunks, dim=1), one_shot, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(torch.stack(cache2.keys), torch.stack(cache.keys), atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_greedy_equals_transformers_generate(pair):
    name, ours, ref = pair
    prompt = PROMPT[:12]
    n = 12
    expected = ref.generate(
        torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
        max_new_tokens=n, do_sample=False, pad_token_id=0, eos_token_id=2,
    )[0, len(prompt):].tolist()
    assert greedy(ours, prompt, n, {2}) == expected


@pytest.mark.parametrize("path", sorted(PATHS))
@torch.no_grad()
def test_per_row_positions_equal_single_rows(tiny_dir, path):
    """Rows at different positions in one batch give each row's own single-row logits."""
    model = load_model(tiny_dir, dtype="float32", device="cpu", **PATHS[path])
    a, b = PROMPT[:9], PROMPT[5:20]
    cache = KVCache(model.config, 2, 32)
    model(torch.tensor([a]), 0, cache.rows(0, 1))
    model(torch.tensor([b]), 0, cache.rows(1, 2))
    step = model(torch.tensor([[11], [12]]), torch.tensor([len(a), len(b)]), cache)
    for row, (ids, tok) in enumerate(((a, 11), (b, 12))):
        single = model(torch.tensor([ids + [tok]]))[:, -1]
        torch.testing.assert_close(step[row:row + 1, -1], single, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", sorted(PATHS))
@torch.no_grad()
def test_multi_token_step_with_per_row_positions(tiny_dir, path):
    model = load_model(tiny_dir, dtype="float32", device="cpu", **PATHS[path])
    a, b = PROMPT[:7], PROMPT[3:13]
    cache = KVCache(model.config, 2, 32)
    model(torch.tensor([a]), 0, cache.rows(0, 1))
    model(torch.tensor([b]), 0, cache.rows(1, 2))
    out = model(torch.tensor([[4, 5, 6], [7, 8, 9]]), torch.tensor([len(a), len(b)]), cache)
    torch.testing.assert_close(out[0], model(torch.tensor([a + [4, 5, 6]]))[0, -3:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[1], model(torch.tensor([b + [7, 8, 9]]))[0, -3:], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("path", sorted(PATHS))
@torch.no_grad()
def test_forward_last_of_several_parts_equals_separate_forwards(tiny_dir, path):
    """Decoding rows and a new prompt's prefill in one pass give each row's separate last-position logits,
    and write the same keys/values into the cache."""
    model = load_model(tiny_dir, dtype="float32", device="cpu", **PATHS[path])
    a, b, c, new = PROMPT[:9], PROMPT[5:20], PROMPT[2:6], PROMPT[1:12]
    together, apart = KVCache(model.config, 4, 32), KVCache(model.config, 4, 32)
    for cache in (together, apart):
        for slot, ids in enumerate((a, b, c)):
            if slot != 2:
                model(torch.tensor([ids]), 0, cache.rows(slot, slot + 1))
    # Rows 0 and 1 decode (per-row positions), row 2 prefills `new`, row 3 prefills c.
    parts = [(torch.tensor([[11], [12]]), torch.tensor([len(a), len(b)]), together.rows(0, 2)),
             (torch.tensor([new]), 0, together.rows(2, 3)),
             (torch.tensor([c]), 0, together.rows(3, 4))]
    got = model.forward_last(parts)
    expected = torch.cat([model(torch.tensor([[11], [12]]), torch.tensor([len(a), len(b)]), apart.rows(0, 2))[:, -1],
                          model(torch.tensor([new]), 0, apart.rows(2, 3))[:, -1],
                          model(torch.tensor([c]), 0, apart.rows(3, 4))[:, -1]])
    assert got.shape == (4, model.config.vocab_size)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-6)
    for k_t, k_a, v_t, v_a in zip(together.keys, apart.keys, together.values, apart.values):
        torch.testing.assert_close(k_t, k_a, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(v_t, v_a, atol=1e-6, rtol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("path", sorted(PATHS))
def test_cache_layouts_give_the_same_logits(tiny_dir, path):
    """Prefill then decode steps through a positions-last cache (several rows' layout, decode_attention)
    equal the same through a one-row layout cache (SDPA), on every path."""
    model = load_model(tiny_dir, dtype="float32", device="cpu", **PATHS[path])
    outs = []
    for positions_last in (False, True):
        cache = KVCache(model.config, 1, 32, positions_last=positions_last)
        logits = [model(torch.tensor([PROMPT[:10]]), 0, cache)[:, -1]]
        for i, tok in enumerate(PROMPT[10:16]):
            logits.append(model(torch.tensor([[tok]]), 10 + i, cache)[:, -1])
        outs.append(torch.cat(logits))
    torch.testing.assert_close(outs[1], outs[0], atol=1e-5, rtol=1e-5)


@torch.no_grad()
@pytest.mark.parametrize("rows", [1, 2])
@pytest.mark.parametrize("path", sorted(PATHS))
def test_last_only_equals_the_last_position_of_the_full_forward(tiny_dir, rows, path):
    """last_only (the last layer runs for the last positions only) gives the full forward's last logits:
    without a cache, from position 0, after a cached prefix, and for rows at different positions."""
    model = load_model(tiny_dir, dtype="float32", device="cpu", **PATHS[path])
    tokens = torch.tensor([PROMPT[:7], PROMPT[3:10]][:rows])
    torch.testing.assert_close(model(tokens, last_only=True)[:, -1], model(tokens)[:, -1], atol=1e-5, rtol=1e-5)
    for start in (0, 5, torch.tensor([5])) if rows == 1 else (torch.tensor([5, 2]),):
        full, last = (KVCache(model.config, rows, 20) for _ in range(2))
        if not isinstance(start, int) or start:
            prefix = torch.tensor([PROMPT[10:15], PROMPT[11:16]][:rows])
            for cache in (full, last):
                model(prefix, 0, cache)
        want = model(tokens, start, full)[:, -1]
        got = model(tokens, start, last, last_only=True)
        assert got.shape == (rows, 1, model.config.vocab_size)
        torch.testing.assert_close(got[:, -1], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(torch.stack(last.keys), torch.stack(full.keys))  # every layer's keys written

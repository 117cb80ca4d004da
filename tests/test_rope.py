"""RoPE inverse frequencies and tables against transformers' own functions, for each scaling type."""

from __future__ import annotations

import pytest
import torch

from llamacli.config import LlamaConfig
from llamacli.rope import apply_rope, inv_freq, rope_tables

pytestmark = pytest.mark.parity

SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192},
    "yarn": {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
    "yarn-mscale": {"rope_type": "yarn", "factor": 40.0, "original_max_position_embeddings": 4096, "mscale": 1.0,
                    "mscale_all_dim": 0.707, "beta_fast": 32, "beta_slow": 1},
}


@pytest.mark.parametrize("name", sorted(SCALINGS))
@pytest.mark.parametrize("seq_len", [None, 40000])
def test_inv_freq_and_attention_factor_match_transformers(name, seq_len):
    import transformers
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    scaling = SCALINGS[name]
    hf = dict(hidden_size=512, num_attention_heads=4, num_hidden_layers=1, intermediate_size=8, vocab_size=8,
              max_position_embeddings=16384)
    rope = {"rope_theta": 500000.0, **(scaling or {"rope_type": "default"})}
    ref_cfg = transformers.LlamaConfig(rope_parameters=dict(rope), **hf)
    ours = LlamaConfig.from_hf({**hf, "architectures": ["LlamaForCausalLM"], "rope_parameters": dict(rope)})
    if name == "default":
        expected = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding.compute_default_rope_parameters(ref_cfg)
    else:
        expected = ROPE_INIT_FUNCTIONS[rope["rope_type"]](ref_cfg, "cpu", seq_len=seq_len)
    got = inv_freq(ours, seq_len)
    torch.testing.assert_close(got[0], expected[0], rtol=0, atol=0)
    assert got[1] == pytest.approx(expected[1])


def test_tables_are_fp32_and_rotation_preserves_norm():
    cfg = LlamaConfig(dim=64, n_layers=1, n_heads=4, n_kv_heads=4, head_dim=16, ffn_dim=8, vocab_size=8)
    cos, sin = rope_tables(cfg, 10)
    assert cos.dtype == sin.dtype == torch.float32 and cos.shape == (10, 16)
    x = torch.randn(1, 4, 10, 16)
    y = apply_rope(x, cos, sin)
    torch.testing.assert_close(y.norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(y[:, :, 0], x[:, :, 0])  # position 0 is not rotated

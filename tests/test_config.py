"""config.json in every spelling real checkpoints use, and clear errors for what is rejected."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llamacli.config import LlamaConfig, load_config
from llamacli.errors import ConfigError, InputError

BASE = dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64, intermediate_size=128,
            num_hidden_layers=2, num_attention_heads=4, vocab_size=100)


def cfg(**kw) -> LlamaConfig:
    return LlamaConfig.from_hf({**BASE, **kw})


def test_defaults_and_mha_when_kv_heads_absent():
    c = cfg()
    assert (c.n_heads, c.n_kv_heads, c.head_dim, c.rope_type, c.tie_embeddings) == (4, 4, 16, "default", False)


def test_explicit_head_dim_is_respected():
    assert cfg(head_dim=32).head_dim == 32


def test_legacy_rope_scaling_with_type_key():
    c = cfg(rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 4.0})
    assert c.rope_theta == 500000.0 and c.rope_scaling == {"rope_type": "linear", "factor": 4.0}


def test_transformers5_rope_parameters():
    c = cfg(rope_parameters={"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
                             "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    assert c.rope_type == "llama3" and c.rope_theta == 500000.0 and c.rope_scaling["factor"] == 8.0


def test_dtype_spellings():
    assert cfg(torch_dtype="bfloat16").torch_dtype == "bfloat16"
    assert cfg(dtype="float16").torch_dtype == "float16"


def test_eos_ids_merge_with_generation_config():
    c = LlamaConfig.from_hf({**BASE, "eos_token_id": 128001}, {"eos_token_id": [128001, 128008, 128009]})
    assert c.eos_token_ids == (128001, 128008, 128009)
    assert cfg(eos_token_id=[2, 5]).eos_token_ids == (2, 5)


def test_mistral_without_short_sliding_window_is_accepted():
    c = cfg(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=None)
    assert c.architecture == "MistralForCausalLM"


@pytest.mark.parametrize("overrides, message", [
    (dict(architectures=["GPT2LMHeadModel"], model_type="gpt2"), "unsupported architecture 'GPT2LMHeadModel'"),
    (dict(model_type="falcon"), "unsupported model_type 'falcon'"),
    (dict(rope_scaling={"type": "longrope", "factor": 2.0}), "unsupported rope type 'longrope'"),
    (dict(hidden_act="gelu"), "unsupported hidden_act 'gelu'"),
    (dict(num_key_value_heads=3), "num_attention_heads (4) is not a multiple of num_key_value_heads (3)"),
    (dict(rope_scaling={"rope_type": "llama3", "factor": 8.0}), "needs field 'low_freq_factor'"),
    (dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window=16, max_position_embeddings=64),
     "sliding_window 16 is shorter than max_position_embeddings 64"),
    (dict(hidden_size=None), "missing required field 'hidden_size'"),
])
def test_rejections_name_the_field_and_value(overrides, message):
    with pytest.raises(ConfigError) as err:
        cfg(**overrides)
    assert message in str(err.value)


def test_load_config_errors(tmp_path):
    with pytest.raises(InputError, match="no such file or directory"):
        load_config(tmp_path / "nope")
    with pytest.raises(ConfigError, match="no config.json"):
        load_config(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ConfigError, match=r"config.json: malformed JSON at line 1 column 2"):
        load_config(tmp_path)


def test_generation_config_is_read(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [2, 7], "temperature": 0.6}))
    c = load_config(tmp_path)
    assert c.eos_token_ids == (2, 7) and c.generation["temperature"] == 0.6


def test_importing_config_does_not_import_torch():
    code = "import sys, llamacli.config, llamacli.errors; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"

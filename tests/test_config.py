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
    c = LlamaConfig.from_hf({**BASE, "vocab_size": 128256, "eos_token_id": 128001},
                            {"eos_token_id": [128001, 128008, 128009]})
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


def test_architectures_null_falls_back_to_model_type():
    assert cfg(architectures=None).architecture == "LlamaForCausalLM"
    assert cfg(architectures=None, model_type="mistral").model_type == "mistral"


LLAMA3_ROPE = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 8192}


@pytest.mark.parametrize("overrides, message", [
    (dict(rope_theta=float("inf")), "field 'rope_theta' must be a finite number, got inf"),
    (dict(rope_theta=float("nan")), "field 'rope_theta' must be a finite number, got nan"),
    (dict(rope_theta="big"), "field 'rope_theta' must be a finite number, got 'big'"),
    (dict(rope_theta=-1), "field 'rope_theta' must be a positive number, got -1"),
    (dict(rms_norm_eps=float("inf")), "field 'rms_norm_eps' must be a finite number"),
    (dict(rms_norm_eps=0), "field 'rms_norm_eps' must be a positive number, got 0"),
    (dict(rms_norm_eps=1e300), "field 'rms_norm_eps' must be a number within float32's range, got 1e+300"),
    (dict(rms_norm_eps=2.0), "field 'rms_norm_eps' must be a number in (0, 1.0], got 2.0"),
    (dict(rope_scaling={"type": "dynamic", "factor": 1e300}), "field 'factor' must be a number within float32's"),
    (dict(rope_scaling={"type": "linear", "factor": float("nan")}), "field 'factor' must be a finite number"),
    (dict(rope_scaling={"type": "dynamic", "factor": "2"}), "field 'factor' must be a finite number, got '2'"),
    (dict(rope_scaling={**LLAMA3_ROPE, "low_freq_factor": "1"}), "field 'low_freq_factor' must be a finite number"),
    (dict(rope_scaling={**LLAMA3_ROPE, "high_freq_factor": 1.0}),
     "'high_freq_factor' (1.0) must be greater than 'low_freq_factor' (1.0)"),
    (dict(rope_scaling={**LLAMA3_ROPE, "original_max_position_embeddings": 0}),
     "field 'original_max_position_embeddings' must be a positive integer, got 0"),
    (dict(rope_scaling={"type": "yarn", "factor": 4.0, "beta_fast": float("inf")}),
     "field 'beta_fast' must be a finite number"),
    (dict(rope_scaling={"type": ["linear"], "factor": 2.0}), "unsupported rope type ['linear']"),
    (dict(max_position_embeddings=0), "field 'max_position_embeddings' must be a positive integer, got 0"),
    (dict(max_position_embeddings=2048.0), "field 'max_position_embeddings' must be a positive integer"),
    (dict(vocab_size=True), "field 'vocab_size' must be a positive integer, got True"),
    (dict(tie_word_embeddings="false"), "field 'tie_word_embeddings' must be true or false, got 'false'"),
    (dict(attention_bias=1), "field 'attention_bias' must be true or false, got 1"),
    (dict(eos_token_id=100), "field 'eos_token_id' has token id 100, outside the model's vocabulary of 100"),
    (dict(bos_token_id=["1"]), "field 'bos_token_id' must be a token id or a list of ids"),
    (dict(hidden_act=["silu"]), "field 'hidden_act' must be a string"),
    (dict(model_type=3), "field 'model_type' must be a string, got 3"),
    (dict(architectures=[None]), "field 'architectures' must be a non-empty list of names"),
    (dict(architectures=["MistralForCausalLM"], model_type="mistral", sliding_window="4096"),
     "field 'sliding_window' must be a positive integer"),
    (dict(torch_dtype=16), "field 'torch_dtype' must be a string, got 16"),
])
def test_every_value_is_checked_with_its_field_named(overrides, message):
    with pytest.raises(ConfigError) as err:
        LlamaConfig.from_hf({**BASE, **overrides}, source="x/config.json")
    assert str(err.value).startswith("x/config.json") and message in str(err.value), str(err.value)


def test_old_negative_pad_id_means_none():
    assert cfg(pad_token_id=-1).pad_token_id is None and cfg(pad_token_id=0).pad_token_id == 0


@pytest.mark.parametrize("generation, message", [
    ({"temperature": "hot"}, "field 'temperature' must be a finite number, got 'hot'"),
    ({"temperature": -1}, "field 'temperature' must be a number in [0.0, inf], got -1"),
    ({"top_p": 2}, "field 'top_p' must be a number in [0.0, 1.0], got 2"),
    ({"top_p": 0}, "field 'top_p' must be in (0, 1], got 0"),
    ({"top_k": 2.5}, "field 'top_k' must be an integer >= 0, got 2.5"),
    ({"repetition_penalty": 0}, "field 'repetition_penalty' must be a positive number"),
    ({"do_sample": "yes"}, "field 'do_sample' must be true or false"),
    ({"max_new_tokens": 0}, "field 'max_new_tokens' must be a positive integer"),
    ({"eos_token_id": [2, "3"]}, "field 'eos_token_id' must be a token id or a list of ids"),
    ([1, 2], "expected a JSON object, got list"),
])
def test_generation_config_errors_name_the_file(tmp_path, generation, message):
    (tmp_path / "config.json").write_text(json.dumps({**BASE, "eos_token_id": 2}))
    (tmp_path / "generation_config.json").write_text(json.dumps(generation))
    with pytest.raises(ConfigError) as err:
        load_config(tmp_path)
    assert str(err.value).startswith(f"{tmp_path / 'generation_config.json'}: ") and message in str(err.value)


def test_a_broken_config_is_one_line_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from llamacli.cli import app

    (tmp_path / "config.json").write_text(json.dumps({**BASE, "architectures": None, "rope_theta": "x"}))
    result = CliRunner().invoke(app, ["generate", "--model", str(tmp_path), "--prompt", "hi"])
    assert result.exit_code == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith(f"error: {tmp_path / 'config.json'}: field 'rope_theta' must be a finite number")

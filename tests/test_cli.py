"""The CLI: generate, chat, inspect, perplexity through Typer's CliRunner and through real subprocesses.

Model text goes to stdout untouched, everything else to stderr; errors are one line with exit code 2 (usage)
or 1 (runtime); Ctrl-C exits 130 after printing what was produced. Equivalences rather than golden strings:
the CLI's tokens equal the engine's (and transformers') for the same prompt and options.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llamacli.cli import app
from llamacli.generation import Engine, Request
from llamacli.sampling import SamplingParams

PROMPT = "Hello world! How are you today?"
runner = CliRunner()


def invoke(*args, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def run(*args, input: str | None = None, env: dict | None = None, timeout: int = 120):
    """llamacli in a fresh process (python -m llamacli)."""
    return subprocess.run([sys.executable, "-m", "llamacli", *map(str, args)], capture_output=True, text=True,
                          input=input, env={**os.environ, **(env or {})}, timeout=timeout)


def gen_json(model, *args, input=None) -> dict:
    result = invoke("generate", "--model", model, "--json", *args, input=input)
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def one_error_line(result, code: int, *fragments: str) -> str:
    """Assert the result is one `error: ...` line on stderr, nothing on stdout, and the exit code."""
    stderr = result.stderr
    assert result.exit_code == code if hasattr(result, "exit_code") else result.returncode == code, stderr
    assert result.stdout == ""
    assert stderr.startswith("error: ") and stderr.count("\n") == 1, stderr
    assert "Traceback" not in stderr
    for fragment in fragments:
        assert fragment in stderr, stderr
    return stderr


@pytest.fixture(scope="module")
def engine(tiny_chat_dir):
    return Engine.load(tiny_chat_dir, dtype="float32", device="cpu")


def user(text, system=None):
    return ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": text}]


def copy_checkpoint(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


# ---------------------------------------------------------------------------------------------------------
# generate


def test_generate_json_is_the_engines_greedy_output_on_the_chat_prompt(tiny_chat_dir, engine):
    out = gen_json(tiny_chat_dir, "--prompt", PROMPT, "--max-new-tokens", "12")
    ids = engine.chat_ids(user(PROMPT))
    expected = engine.generate(ids, Request(max_new_tokens=12))
    assert out["prompt_token_ids"] == ids
    assert out["token_ids"] == expected.token_ids and out["text"] == expected.text
    assert out["finish_reason"] == expected.reason and out["finish_reason"] in ("stop", "length")
    assert set(out) == {"text", "token_ids", "prompt_token_ids", "finish_reason", "stats"}
    stats = out["stats"]
    assert stats["prompt_tokens"] == len(ids) and stats["generated_tokens"] == len(out["token_ids"])
    for key in ("load_s", "ttft_s", "prefill_tokens_per_s", "decode_tokens_per_s", "prefill_s", "decode_s"):
        assert stats[key] >= 0


@pytest.mark.parity
def test_generate_greedy_equals_transformers_on_the_same_chat_prompt(tiny_chat_dir):
    import transformers

    tok = transformers.AutoTokenizer.from_pretrained(tiny_chat_dir)
    ids = tok.apply_chat_template(user(PROMPT), add_generation_prompt=True, tokenize=True, return_dict=False)
    ref = transformers.LlamaForCausalLM.from_pretrained(tiny_chat_dir, dtype=torch.float32).eval()
    expected = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=15, do_sample=False, pad_token_id=0)[0, len(ids):].tolist()
    out = gen_json(tiny_chat_dir, "--prompt", PROMPT, "--max-new-tokens", "15", "--temperature", "0")
    assert out["prompt_token_ids"] == ids
    assert out["token_ids"] == expected


def test_generate_streams_exactly_the_json_text_to_stdout(tiny_chat_dir):
    out = gen_json(tiny_chat_dir, "--prompt", PROMPT, "-n", "10")
    plain = invoke("generate", "--model", tiny_chat_dir, "--prompt", PROMPT, "-n", "10")
    assert plain.exit_code == 0
    assert plain.stdout == out["text"] + "\n"
    assert plain.stderr == ""


def test_raw_prompt_is_encoded_as_is_with_bos(tiny_chat_dir, engine):
    out = gen_json(tiny_chat_dir, "--raw", "--prompt", PROMPT, "-n", "3")
    assert out["prompt_token_ids"] == engine.tokenizer.encode(PROMPT, add_special_tokens=True)
    assert out["prompt_token_ids"][0] == engine.tokenizer.bos_id


def test_system_message_goes_through_the_template(tiny_chat_dir, engine):
    out = gen_json(tiny_chat_dir, "--system", "Be brief.", "--prompt", PROMPT, "-n", "3")
    assert out["prompt_token_ids"] == engine.chat_ids(user(PROMPT, system="Be brief."))
    bad = invoke("generate", "--model", tiny_chat_dir, "--raw", "--system", "x", "--prompt", PROMPT)
    one_error_line(bad, 2, "--system")
    # An empty system message is no system message (the rule of llamacli.prompts), raw or templated.
    empty = gen_json(tiny_chat_dir, "--system", "", "--prompt", PROMPT, "-n", "3")
    assert empty["prompt_token_ids"] == engine.chat_ids(user(PROMPT))
    raw = gen_json(tiny_chat_dir, "--raw", "--system", "", "--prompt", PROMPT, "-n", "3")
    assert raw["prompt_token_ids"] == engine.raw_ids(PROMPT)
    batch = invoke("generate", "--model", tiny_chat_dir, "--prompts-file", "-", "--raw", "--system", "", "-n", "2",
                   input=PROMPT + "\n")
    assert batch.exit_code == 0, batch.stderr
    assert json.loads(batch.stdout)["prompt_tokens"] == len(engine.raw_ids(PROMPT))


def test_prompt_from_file_and_from_stdin(tiny_chat_dir, tmp_path):
    base = gen_json(tiny_chat_dir, "--prompt", PROMPT, "-n", "4")
    f = tmp_path / "prompt.txt"
    f.write_text(PROMPT + "\n")  # one trailing newline is dropped, as from `echo`
    assert gen_json(tiny_chat_dir, "--prompt-file", f, "-n", "4")["prompt_token_ids"] == base["prompt_token_ids"]
    from_stdin = gen_json(tiny_chat_dir, "--prompt", "-", "-n", "4", input=PROMPT + "\n")
    assert from_stdin["prompt_token_ids"] == base["prompt_token_ids"]
    assert from_stdin["token_ids"] == base["token_ids"]


@pytest.mark.parametrize("args, fragment", [
    ([], "pass --prompt TEXT, --prompt-file FILE"),
    (["--prompt", "a", "--prompt-file", "x.txt"], "not both"),
    (["--prompt", "a", "--logprobs"], "--logprobs needs --json"),
    (["--prompt", "a", "--output", "out.jsonl"], "--prompts-file"),
    (["--prompts-file", "in.jsonl", "--prompt", "a"], "not both"),
])
def test_prompt_option_mistakes_are_usage_errors(tiny_chat_dir, args, fragment):
    one_error_line(invoke("generate", "--model", tiny_chat_dir, *args), 2, fragment)


def test_missing_prompt_file_is_a_runtime_error(tiny_chat_dir, tmp_path):
    one_error_line(invoke("generate", "--model", tiny_chat_dir, "--prompt-file", tmp_path / "none.txt"), 1,
                   "none.txt: no such file")


def test_batch_mode_runs_every_row_with_the_generate_options(tiny_chat_dir, tmp_path, engine, monkeypatch):
    """--prompts-file hands the loaded engine, the batch size and the Request the options make to batch mode:
    each row written equals a single run of its prompt with that Request; --resume skips the rows done."""
    batch_sizes = []
    real = Engine.stream_batch

    def stream_batch(self, items, batch_size=8):
        batch_sizes.append(batch_size)
        return real(self, items, batch_size)

    monkeypatch.setattr(Engine, "stream_batch", stream_batch)
    texts = {"a": "hi", "b": "Hello world", "c": "How are you today?"}
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps({"id": k, "prompt": v}) + "\n" for k, v in texts.items()))
    out = tmp_path / "o"
    from llamacli.batch import prompt_hash, read_rows

    done = {"id": "a", "text": "", "token_ids": [], "prompt_hash": prompt_hash(read_rows(prompts)[0])}
    out.write_text(json.dumps(done) + "\n")  # already done (same id, same prompt): --resume skips it
    result = invoke("generate", "--model", tiny_chat_dir, "--prompts-file", prompts, "--output", out,
                    "--batch-size", "3", "--resume", "--temperature", "0.5", "--seed", "7", "--stop", "x",
                    "-n", "5", "--raw")
    assert result.exit_code == 0, result.stderr
    assert result.stdout == "" and "(2 ok, 0 failed), 1 skipped" in result.stderr
    assert batch_sizes == [3]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["id"] for r in rows[:1]] == ["a"] and sorted(r["id"] for r in rows[1:]) == ["b", "c"]
    request = Request(max_new_tokens=5, sampling=SamplingParams(temperature=0.5), seed=7, stop=("x",))
    for row in rows[1:]:
        single = engine.generate(engine.raw_ids(texts[row["id"]]), request)
        assert row["token_ids"] == single.token_ids and row["text"] == single.text
    assert invoke("generate", "--model", tiny_chat_dir, "--prompts-file", prompts,
                  "--batch-size", "0").exit_code == 2


def test_max_new_tokens_and_ignore_eos(tiny_chat_dir):
    out = gen_json(tiny_chat_dir, "--prompt", PROMPT, "--max-new-tokens", "7", "--ignore-eos")
    assert len(out["token_ids"]) == 7 and out["finish_reason"] == "length"


@pytest.fixture(scope="module")
def eos_dir(tiny_chat_dir, engine, tmp_path_factory):
    """The tiny checkpoint whose generation_config lists a second eos id: the 3rd greedy token of PROMPT."""
    free = engine.generate(engine.chat_ids(user(PROMPT)), Request(max_new_tokens=8, ignore_eos=True)).token_ids
    stop_at = next(i for i, t in enumerate(free) if t not in free[:i])  # first position of a new id
    stop_at = max(stop_at, 2) if free[2] not in free[:2] else stop_at
    folder = copy_checkpoint(tiny_chat_dir, tmp_path_factory.mktemp("eos") / "ckpt")
    gen = json.loads((folder / "generation_config.json").read_text())
    gen["eos_token_id"] = [engine.tokenizer.eos_id, free[stop_at]]
    (folder / "generation_config.json").write_text(json.dumps(gen))
    return folder, free, stop_at


def test_generation_stops_on_every_eos_id_unless_ignore_eos(eos_dir):
    folder, free, stop_at = eos_dir
    stopped = gen_json(folder, "--prompt", PROMPT, "-n", "8")
    assert stopped["token_ids"] == free[:stop_at + 1] and stopped["finish_reason"] == "stop"
    ignored = gen_json(folder, "--prompt", PROMPT, "-n", "8", "--ignore-eos")
    assert ignored["token_ids"] == free and ignored["finish_reason"] == "length"


def test_stop_string_ends_generation_and_is_not_printed(tiny_chat_dir):
    free = gen_json(tiny_chat_dir, "--prompt", PROMPT, "-n", "20", "--ignore-eos")["text"]
    stop = next(free[i:i + 2] for i in range(3, len(free) - 1) if free[i:i + 2].strip() and
                free.find(free[i:i + 2]) == i)
    out = gen_json(tiny_chat_dir, "--prompt", PROMPT, "-n", "20", "--ignore-eos", "--stop", stop,
                   "--stop", "never-there")
    assert out["text"] == free[:free.index(stop)] and out["finish_reason"] == "stop"
    plain = invoke("generate", "--model", tiny_chat_dir, "--prompt", PROMPT, "-n", "20", "--ignore-eos",
                   "--stop", stop)
    assert plain.stdout == free[:free.index(stop)] + "\n"


def test_same_seed_same_output_and_sampling_options_reach_the_sampler(tiny_chat_dir, engine):
    args = ("--prompt", PROMPT, "-n", "16", "--ignore-eos", "--temperature", "1.3")
    a = gen_json(tiny_chat_dir, *args, "--seed", "11")["token_ids"]
    b = gen_json(tiny_chat_dir, *args, "--seed", "11")["token_ids"]
    c = gen_json(tiny_chat_dir, *args, "--seed", "12")["token_ids"]
    assert a == b and a != c
    ids = engine.chat_ids(user(PROMPT))
    params = SamplingParams(temperature=0.9, top_k=20, top_p=0.8, min_p=0.05, repetition_penalty=1.3)
    expected = engine.generate(ids, Request(max_new_tokens=16, sampling=params, seed=5, ignore_eos=True))
    out = gen_json(tiny_chat_dir, "--prompt", PROMPT, "-n", "16", "--ignore-eos", "--temperature", "0.9",
                   "--top-k", "20", "--top-p", "0.8", "--min-p", "0.05", "--repetition-penalty", "1.3",
                   "--seed", "5")
    assert out["token_ids"] == expected.token_ids


@pytest.mark.parametrize("option", [["--top-k", "1"], ["--top-p", "1e-9"], ["--min-p", "1"]])
def test_filters_that_keep_one_token_equal_greedy(tiny_chat_dir, option):
    greedy = gen_json(tiny_chat_dir, "--prompt", PROMPT, "-n", "10", "--ignore-eos")["token_ids"]
    out = gen_json(tiny_chat_dir, "--prompt", PROMPT, "-n", "10", "--ignore-eos", "--temperature", "2",
                   "--seed", "3", *option)
    assert out["token_ids"] == greedy


def test_sampling_defaults_come_from_generation_config_when_it_samples(tiny_chat_dir, tmp_path, engine):
    folder = copy_checkpoint(tiny_chat_dir, tmp_path / "ckpt")
    gen = json.loads((folder / "generation_config.json").read_text())
    gen.update(do_sample=True, temperature=1.7, top_k=30)
    (folder / "generation_config.json").write_text(json.dumps(gen))
    out = gen_json(folder, "--prompt", PROMPT, "-n", "12", "--ignore-eos", "--seed", "9")
    ids = engine.chat_ids(user(PROMPT))
    sampled = engine.generate(ids, Request(max_new_tokens=12, ignore_eos=True, seed=9,
                                           sampling=SamplingParams(temperature=1.7, top_k=30)))
    assert out["token_ids"] == sampled.token_ids
    greedy = gen_json(folder, "--prompt", PROMPT, "-n", "12", "--ignore-eos", "--temperature", "0")
    assert greedy["token_ids"] == engine.generate(ids, Request(max_new_tokens=12, ignore_eos=True)).token_ids


def test_logprobs_one_per_generated_token(tiny_chat_dir, engine):
    out = gen_json(tiny_chat_dir, "--prompt", PROMPT, "-n", "6", "--ignore-eos", "--logprobs")
    expected = engine.generate(engine.chat_ids(user(PROMPT)), Request(max_new_tokens=6, ignore_eos=True,
                                                                      logprobs=True))
    assert len(out["logprobs"]) == len(out["token_ids"]) == 6
    assert out["logprobs"] == pytest.approx(expected.logprobs, abs=1e-6)
    assert all(lp <= 0 for lp in out["logprobs"])


def test_stats_go_to_stderr(tiny_chat_dir):
    plain = invoke("generate", "--model", tiny_chat_dir, "--prompt", PROMPT, "-n", "5", "--ignore-eos")
    with_stats = invoke("generate", "--model", tiny_chat_dir, "--prompt", PROMPT, "-n", "5", "--ignore-eos",
                        "--stats")
    assert with_stats.exit_code == 0 and with_stats.stdout == plain.stdout
    err = with_stats.stderr
    for fragment in ("prompt ", "generated 5", "load ", "first token ", "prefill ", "decode ", "tok/s"):
        assert fragment in err


def test_dtype_and_device_options(tiny_chat_dir):
    base = gen_json(tiny_chat_dir, "--prompt", PROMPT, "-n", "4", "--ignore-eos", "--device", "cpu",
                    "--dtype", "float32")
    for dtype in ("bfloat16", "float16", "auto"):
        out = gen_json(tiny_chat_dir, "--prompt", PROMPT, "-n", "4", "--ignore-eos", "--dtype", dtype)
        assert out["prompt_token_ids"] == base["prompt_token_ids"] and len(out["token_ids"]) == 4
    bad = invoke("generate", "--model", tiny_chat_dir, "--prompt", PROMPT, "--dtype", "int8")
    assert bad.exit_code == 2
    if not torch.cuda.is_available():
        one_error_line(invoke("generate", "--model", tiny_chat_dir, "--prompt", PROMPT, "--device", "cuda"), 2,
                       "no CUDA GPU")


def test_chat_template_and_tokenizer_overrides(tiny_chat_dir, tiny_dir, tmp_path, engine):
    template = tmp_path / "plain.jinja"
    template.write_text("{% for m in messages %}{{ m['content'] }}{% endfor %}")
    out = gen_json(tiny_chat_dir, "--chat-template", template, "--prompt", PROMPT, "-n", "2")
    assert out["prompt_token_ids"] == engine.tokenizer.encode(PROMPT, add_special_tokens=False)
    # A checkpoint without tokenizer files runs with --tokenizer pointing at one (same vocabulary size needed).
    model_only = tmp_path / "model-only"
    model_only.mkdir()
    for f in ("config.json", "generation_config.json", "model.safetensors"):
        shutil.copyfile(tiny_chat_dir / f, model_only / f)
    one_error_line(invoke("generate", "--model", model_only, "--raw", "--prompt", PROMPT), 1,
                   "no tokenizer.json or tokenizer.model")
    out2 = gen_json(model_only, "--tokenizer", tiny_chat_dir / "tokenizer.json", "--raw", "--prompt", PROMPT,
                    "-n", "3", "--ignore-eos")
    base = gen_json(tiny_chat_dir, "--raw", "--prompt", PROMPT, "-n", "3", "--ignore-eos")
    assert out2["token_ids"] == base["token_ids"]


def test_model_without_a_chat_template_needs_raw(tiny_chat_dir, tmp_path):
    folder = copy_checkpoint(tiny_chat_dir, tmp_path / "ckpt")
    conf = json.loads((folder / "tokenizer_config.json").read_text())
    del conf["chat_template"]
    (folder / "tokenizer_config.json").write_text(json.dumps(conf))
    one_error_line(invoke("generate", "--model", folder, "--prompt", PROMPT), 1, "no chat template", "--raw")
    assert gen_json(folder, "--raw", "--prompt", PROMPT, "-n", "2")["token_ids"]
    one_error_line(invoke("chat", "--model", folder, input="hi\n"), 1, "no chat template")


def test_prompt_plus_max_new_tokens_beyond_the_context_names_both_numbers(tiny_chat_dir, engine):
    n_prompt = len(engine.chat_ids(user(PROMPT)))
    err = one_error_line(invoke("generate", "--model", tiny_chat_dir, "--prompt", PROMPT,
                                "--max-new-tokens", "250"), 1)
    assert f"prompt ({n_prompt} tokens)" in err and "max-new-tokens (250)" in err and "256" in err
    # Without --max-new-tokens the default is capped to what is left of the context.
    out = gen_json(tiny_chat_dir, "--prompt", PROMPT, "--ignore-eos")
    assert len(out["token_ids"]) == 256 - n_prompt


# ---------------------------------------------------------------------------------------------------------
# errors, for every command


def _save(folder: Path, tensors: dict) -> None:
    from safetensors.torch import save_file

    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})


def _tensors(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(folder / "model.safetensors"))


def break_checkpoint(kind: str, src: Path, tmp_path: Path) -> tuple[Path, tuple[str, ...]]:
    """A broken copy of a checkpoint, and fragments the error message must contain."""
    folder = copy_checkpoint(src, tmp_path / kind)
    if kind == "missing-path":
        shutil.rmtree(folder)
        return folder, ("model not found", str(folder))
    if kind == "no-config":
        (folder / "config.json").unlink()
        return folder, ("no config.json",)
    if kind == "malformed-json":
        (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
        return folder, ("config.json", "malformed JSON")
    if kind == "unsupported-arch":
        conf = json.loads((folder / "config.json").read_text())
        conf["architectures"], conf["model_type"] = ["GPT2LMHeadModel"], "gpt2"
        (folder / "config.json").write_text(json.dumps(conf))
        return folder, ("unsupported architecture 'GPT2LMHeadModel'",)
    if kind == "truncated":
        f = folder / "model.safetensors"
        data = f.read_bytes()
        f.write_bytes(data[: len(data) - 1000])
        return folder, ("model.safetensors",)
    if kind == "corrupt-header":
        f = folder / "model.safetensors"
        data = bytearray(f.read_bytes())
        data[8:40] = b"\x00garbage!" * 3 + b"\x00" * 5
        f.write_bytes(bytes(data))
        return folder, ("model.safetensors",)
    if kind == "missing-tensor":
        tensors = _tensors(folder)
        del tensors["model.layers.1.mlp.up_proj.weight"]
        _save(folder, tensors)
        return folder, ("missing tensor 'model.layers.1.mlp.up_proj.weight'",)
    if kind == "misshaped-tensor":
        tensors = _tensors(folder)
        tensors["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(16, 64)
        _save(folder, tensors)
        return folder, ("'model.layers.0.self_attn.k_proj.weight'", "[16, 64]", "[32, 64]")
    if kind == "pickle-only":
        (folder / "model.safetensors").unlink()
        (folder / "pytorch_model.bin").write_bytes(b"not really a pickle")
        return folder, ("pickle", "pytorch_model.bin")
    if kind == "missing-tokenizer":
        (folder / "tokenizer.json").unlink()
        return folder, ("no tokenizer.json or tokenizer.model",)
    raise ValueError(kind)


BROKEN = ["missing-path", "no-config", "malformed-json", "unsupported-arch", "truncated", "corrupt-header",
          "missing-tensor", "misshaped-tensor", "pickle-only", "missing-tokenizer"]


@pytest.mark.parametrize("kind", BROKEN)
def test_generate_reports_a_broken_checkpoint_in_one_line(kind, tiny_chat_dir, tmp_path):
    folder, fragments = break_checkpoint(kind, tiny_chat_dir, tmp_path)
    one_error_line(invoke("generate", "--model", folder, "--prompt", PROMPT, "-n", "2"), 1, *fragments)


@pytest.mark.parametrize("command", ["chat", "perplexity", "inspect"])
@pytest.mark.parametrize("kind", ["missing-path", "malformed-json", "truncated", "missing-tensor", "pickle-only"])
def test_other_commands_report_broken_checkpoints_too(command, kind, tiny_chat_dir, tmp_path):
    folder, fragments = break_checkpoint(kind, tiny_chat_dir, tmp_path)
    extra = {"perplexity": ["--text", PROMPT], "chat": [], "inspect": []}[command]
    one_error_line(invoke(command, "--model", folder, *extra, input="hi\n"), 1, *fragments)


@pytest.mark.parametrize("args, fragment", [
    (["--temperature", "-0.5"], "temperature must be >= 0"),
    (["--top-p", "0"], "top-p must be in (0, 1]"),
    (["--top-p", "1.5"], "top-p must be in (0, 1]"),
    (["--top-k", "-1"], "top-k must be an integer >= 0"),
    (["--min-p", "2"], "min-p must be in [0, 1]"),
    (["--repetition-penalty", "0"], "repetition-penalty must be > 0"),
])
@pytest.mark.parametrize("command", ["generate", "chat"])
def test_bad_sampling_values_are_usage_errors_before_loading(command, args, fragment, tmp_path):
    # The model path does not exist: the sampling check must come first (exit 2, not the missing model's 1).
    extra = ["--prompt", "x"] if command == "generate" else []
    one_error_line(invoke(command, "--model", tmp_path / "absent", *extra, *args), 2, fragment)


def test_debug_shows_the_traceback(tmp_path):
    from llamacli.errors import InputError

    quiet = invoke("generate", "--model", tmp_path / "absent", "--prompt", "x")
    assert quiet.exit_code == 1 and quiet.exception is None or isinstance(quiet.exception, SystemExit)
    loud = invoke("--debug", "generate", "--model", tmp_path / "absent", "--prompt", "x")
    assert isinstance(loud.exception, InputError)
    proc = run("--debug", "generate", "--model", tmp_path / "absent", "--prompt", "x")
    assert proc.returncode == 1 and "Traceback" in proc.stderr and "InputError" in proc.stderr


# ---------------------------------------------------------------------------------------------------------
# Ctrl-C


def _interrupt_after(monkeypatch, n_events: int, times: int = 1):
    """Make Engine.stream raise KeyboardInterrupt after n_events events (the next `times` calls)."""
    real = Engine.stream
    left = {"n": times}

    def stream(self, *args, **kwargs):
        gen = real(self, *args, **kwargs)
        if left["n"] <= 0:
            yield from gen
            return
        left["n"] -= 1
        for i, event in enumerate(gen):
            if i == n_events:
                gen.close()
                raise KeyboardInterrupt
            yield event

    monkeypatch.setattr(Engine, "stream", stream)


def test_ctrl_c_in_generate_prints_what_was_produced_and_exits_130(tiny_chat_dir, monkeypatch):
    full = gen_json(tiny_chat_dir, "--prompt", PROMPT, "-n", "12", "--ignore-eos")
    _interrupt_after(monkeypatch, 5)
    plain = invoke("generate", "--model", tiny_chat_dir, "--prompt", PROMPT, "-n", "12", "--ignore-eos")
    assert plain.exit_code == 130
    assert full["text"].startswith(plain.stdout[:-1]) and plain.stdout.endswith("\n")
    assert "interrupted after 5 tokens" in plain.stderr
    _interrupt_after(monkeypatch, 5)
    js = invoke("generate", "--model", tiny_chat_dir, "--prompt", PROMPT, "-n", "12", "--ignore-eos", "--json")
    assert js.exit_code == 130
    partial = json.loads(js.stdout)
    assert partial["token_ids"] == full["token_ids"][:5] and partial["finish_reason"] == "interrupted"


def test_sigint_to_a_real_generate_process_exits_130_with_the_text_so_far(tmp_path):
    """A long generation (big context, --ignore-eos) interrupted with SIGINT once text has started flowing."""
    from tests.conftest import write_tiny_chat_checkpoint

    folder = write_tiny_chat_checkpoint(tmp_path / "long", max_position_embeddings=200_000)
    proc = subprocess.Popen([sys.executable, "-m", "llamacli", "generate", "--model", str(folder), "--raw",
                             "--prompt", PROMPT, "--max-new-tokens", "150000", "--ignore-eos"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        first = b""
        while not first.strip():  # wait for visible text: generation is under way
            chunk = os.read(proc.stdout.fileno(), 64)
            assert chunk, proc.stderr.read().decode()
            first += chunk
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err.decode()
    out = first + rest
    assert out.endswith(b"\n") and out.strip()  # the text so far, ended with a newline
    assert b"interrupted after" in err and b"Traceback" not in err


# ---------------------------------------------------------------------------------------------------------
# chat


def chat_json(model, lines: list[str], *args) -> tuple[list[dict], object]:
    result = invoke("chat", "--model", model, "--json", *args, input="".join(line + "\n" for line in lines))
    objs = [json.loads(line) for line in result.stdout.splitlines()]
    return objs, result


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def test_chat_turn_two_equals_a_fresh_run_and_prefills_only_new_tokens(tiny_chat_dir, engine):
    turns, result = chat_json(tiny_chat_dir, ["What is a fox?", "And a dog?"], "-n", "10")
    assert result.exit_code == 0, result.stderr
    assert result.stderr == ""
    first, second = turns
    assert set(first) == {"role", "content", "token_ids", "prompt_token_ids", "prefill_tokens", "finish_reason"}
    assert first["role"] == "assistant"
    assert first["prompt_token_ids"] == engine.chat_ids(user("What is a fox?"))
    assert first["prefill_tokens"] == len(first["prompt_token_ids"])
    history = [{"role": "user", "content": "What is a fox?"}, {"role": "assistant", "content": first["content"]},
               {"role": "user", "content": "And a dog?"}]
    ids = engine.chat_ids(history)
    fresh = engine.generate(ids, Request(max_new_tokens=10))
    assert second["prompt_token_ids"] == ids
    assert second["token_ids"] == fresh.token_ids and second["content"] == fresh.text
    cached = first["prompt_token_ids"] + first["token_ids"][:-1]
    assert second["prefill_tokens"] == len(ids) - common_prefix(cached, ids)
    assert second["prefill_tokens"] < len(ids) - len(first["prompt_token_ids"]) // 2


def test_piped_chat_prints_only_the_replies_one_per_line(tiny_chat_dir):
    lines = ["What is a fox?", "", "And a dog?", "/stats", "Thanks!"]
    turns, _ = chat_json(tiny_chat_dir, lines, "-n", "6")
    assert len(turns) == 3  # the empty line and the command are not turns
    plain = invoke("chat", "--model", tiny_chat_dir, "-n", "6", input="\n".join(lines) + "\n")
    assert plain.exit_code == 0
    assert plain.stdout == "".join(t["content"] + "\n" for t in turns)
    assert "stats:" in plain.stderr and "turns 2" in plain.stderr


def test_chat_commands_reset_system_help_exit(tiny_chat_dir, engine):
    lines = ["What is a fox?", "/reset", "What is a fox?", "/system Be brief.", "And a dog?", "/system",
             "/help", "/nonsense", "/exit", "never read"]
    turns, result = chat_json(tiny_chat_dir, lines, "-n", "5")
    assert result.exit_code == 0 and len(turns) == 3
    a, b, c = turns
    assert b["prompt_token_ids"] == a["prompt_token_ids"] and b["token_ids"] == a["token_ids"]
    history = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is a fox?"},
               {"role": "assistant", "content": b["content"]}, {"role": "user", "content": "And a dog?"}]
    assert c["prompt_token_ids"] == engine.chat_ids(history)
    for fragment in ("conversation cleared", "system message set", "system message removed", "/reset",
                     "unknown command /nonsense"):
        assert fragment in result.stderr


def test_chat_system_option(tiny_chat_dir, engine):
    turns, _ = chat_json(tiny_chat_dir, ["hi"], "--system", "You are terse.", "-n", "3")
    assert turns[0]["prompt_token_ids"] == engine.chat_ids(user("hi", system="You are terse."))


def test_chat_sampling_options_and_stats(tiny_chat_dir, engine):
    turns, result = chat_json(tiny_chat_dir, ["hi"], "-n", "8", "--temperature", "1.1", "--top-k", "40",
                              "--top-p", "0.9", "--min-p", "0.01", "--repetition-penalty", "1.2", "--seed", "4",
                              "--stats")
    params = SamplingParams(temperature=1.1, top_k=40, top_p=0.9, min_p=0.01, repetition_penalty=1.2)
    expected = engine.generate(engine.chat_ids(user("hi")), Request(max_new_tokens=8, sampling=params, seed=4))
    assert turns[0]["token_ids"] == expected.token_ids
    assert "stats: prompt" in result.stderr


def test_chat_stop_string(tiny_chat_dir):
    free, _ = chat_json(tiny_chat_dir, ["What is a fox?"], "-n", "20")
    text = free[0]["content"]
    stop = next(text[i:i + 2] for i in range(2, len(text) - 1) if text[i:i + 2].strip() and text.find(text[i:i + 2]) == i)
    stopped, _ = chat_json(tiny_chat_dir, ["What is a fox?"], "-n", "20", "--stop", stop)
    assert stopped[0]["content"] == text[:text.index(stop)] and stopped[0]["finish_reason"] == "stop"


def test_full_context_drops_the_oldest_turn_with_a_notice(tiny_chat_dir, engine):
    n1 = len(engine.chat_ids(user("What is a fox?")))
    turns, result = chat_json(tiny_chat_dir, ["What is a fox?", "And a dog?"], "-n", "8",
                              "--max-context", str(n1 + 20))
    assert result.exit_code == 0
    assert "context full: dropped the oldest turn" in result.stderr and "/reset" in result.stderr
    assert turns[1]["prompt_token_ids"] == engine.chat_ids(user("And a dog?"))


def test_a_message_longer_than_the_context_fails_that_turn_only(tiny_chat_dir):
    lines = ["hi", "word " * 200, "hi"]
    turns, result = chat_json(tiny_chat_dir, lines, "-n", "4", "--max-context", "64")
    assert result.exit_code == 1
    assert [t["finish_reason"] for t in turns][1] == "error" and len(turns) == 3
    assert turns[2]["token_ids"] and "exceeds the conversation's context of 64 tokens" in turns[1]["error"]
    assert "error: " in result.stderr and "Traceback" not in result.stderr
    plain = invoke("chat", "--model", tiny_chat_dir, "-n", "4", "--max-context", "64",
                   input="\n".join(lines) + "\n")
    assert plain.stdout.split("\n")[1] == ""  # an empty line keeps replies in step with input lines


def test_ctrl_c_stops_a_reply_and_keeps_the_session(tiny_chat_dir, engine, monkeypatch):
    _interrupt_after(monkeypatch, 2)
    turns, result = chat_json(tiny_chat_dir, ["What is a fox?", "And a dog?"], "-n", "6")
    assert result.exit_code == 0
    assert "reply stopped" in result.stderr
    assert len(turns) == 1  # the stopped reply printed nothing as JSON and is not in the history
    assert turns[0]["prompt_token_ids"] == engine.chat_ids(user("And a dog?"))


def test_piped_chat_in_a_subprocess(tiny_chat_dir):
    lines = "What is a fox?\nAnd a dog?\n"
    js = run("chat", "--model", tiny_chat_dir, "--json", "-n", "6", input=lines)
    assert js.returncode == 0 and js.stderr == ""
    turns = [json.loads(line) for line in js.stdout.splitlines()]
    assert len(turns) == 2 and turns[1]["prefill_tokens"] < len(turns[1]["prompt_token_ids"])
    plain = run("chat", "--model", tiny_chat_dir, "-n", "6", input=lines)
    assert plain.returncode == 0 and plain.stderr == ""
    assert plain.stdout == "".join(t["content"] + "\n" for t in turns)


def test_interactive_chat_on_a_terminal(tiny_chat_dir):
    """stdin a pty: the prompt and notices go to stderr, the reply to stdout; /exit quits."""
    import pty

    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "llamacli", "chat", "--model", str(tiny_chat_dir), "-n", "5"],
                            stdin=slave, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    os.close(slave)
    try:
        os.write(master, b"What is a fox?\n/exit\n")
        out, err = proc.communicate(timeout=120)
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err.decode()
    expected, _ = chat_json(tiny_chat_dir, ["What is a fox?"], "-n", "5")
    assert out.decode() == expected[0]["content"] + "\n"
    assert b">>> " in err and b"/help for commands" in err


# ---------------------------------------------------------------------------------------------------------
# inspect and perplexity through the CLI (their logic is tested in test_inspect.py / test_perplexity.py)


def test_inspect_json_and_table(tiny_chat_dir):
    from llamacli.inspect import inspect_checkpoint

    js = invoke("inspect", "--model", tiny_chat_dir, "--json")
    assert js.exit_code == 0 and js.stderr == ""
    assert json.loads(js.stdout) == inspect_checkpoint(tiny_chat_dir)
    bf16 = json.loads(invoke("inspect", "--model", tiny_chat_dir, "--json", "--dtype", "bfloat16").stdout)
    assert bf16["kv_cache_bytes_per_token"] * 2 == json.loads(js.stdout)["kv_cache_bytes_per_token"]
    table = invoke("inspect", "--model", tiny_chat_dir)
    assert table.exit_code == 0
    for fragment in ("LlamaForCausalLM", "parameters", "per layer", "KV heads", "GQA group", "chat template",
                     "tokenizers", "context length", "256"):
        assert fragment in table.stdout


def test_perplexity_cli_text_sources_and_json(tiny_chat_dir, tmp_path, engine):
    text = "The quick brown fox jumps over the lazy dog. Hello world! Hello again, world."
    js = invoke("perplexity", "--model", tiny_chat_dir, "--text", text, "--context", "12", "--stride", "5",
                "--json")
    assert js.exit_code == 0, js.stderr
    out = json.loads(js.stdout)
    assert out["token_ids"] == engine.raw_ids(text)
    assert len(out["logprobs"]) == len(out["token_ids"]) - 1
    assert out["perplexity"] == pytest.approx(float(torch.tensor(out["logprobs"]).neg().mean().exp()), rel=1e-6)
    assert (out["context"], out["stride"]) == (12, 5)
    f = tmp_path / "t.txt"
    f.write_text(text + "\n")
    plain = invoke("perplexity", "--model", tiny_chat_dir, "--text-file", f, "--context", "12", "--stride", "5")
    assert plain.exit_code == 0 and plain.stdout == f"{out['perplexity']:.4f}\n"
    assert "perplexity" in plain.stderr
    piped = invoke("perplexity", "--model", tiny_chat_dir, "--text", "-", "--context", "12", "--stride", "5",
                   "--json", input=text)
    assert json.loads(piped.stdout)["logprobs"] == out["logprobs"]
    default = json.loads(invoke("perplexity", "--model", tiny_chat_dir, "--text", text, "--json").stdout)
    assert (default["context"], default["stride"]) == (256, 128)


@pytest.mark.parametrize("args, fragment", [
    ([], "pass --text TEXT"),
    (["--text", "a", "--context", "8", "--stride", "8"], "--stride must be"),
    (["--text", "a", "--context", "1", "--stride", "1"], "--context must be at least 2"),
    (["--text", "The quick brown fox", "--context", "999"], "exceeds the model's context of 256"),
    (["--text", ""], "at least 2 tokens"),
])
def test_perplexity_usage_errors(tiny_chat_dir, args, fragment):
    one_error_line(invoke("perplexity", "--model", tiny_chat_dir, *args), 2, fragment)


# ---------------------------------------------------------------------------------------------------------
# subprocess: exit codes and the stdout/stderr split, help without torch


def test_generate_in_a_subprocess_splits_stdout_and_stderr(tiny_chat_dir):
    js = run("generate", "--model", tiny_chat_dir, "--prompt", PROMPT, "-n", "6", "--json")
    assert js.returncode == 0 and js.stderr == ""
    out = json.loads(js.stdout)
    plain = run("generate", "--model", tiny_chat_dir, "--prompt", PROMPT, "-n", "6", "--stats")
    assert plain.returncode == 0 and plain.stdout == out["text"] + "\n"
    assert plain.stderr.startswith("stats: ") and plain.stderr.count("\n") == 1


def test_a_closed_stdout_ends_generate_quietly(tmp_path):
    """`llamacli generate ... | head -c 3`: no traceback and no error line when the reader goes away."""
    from tests.conftest import write_tiny_chat_checkpoint

    folder = write_tiny_chat_checkpoint(tmp_path / "long", max_position_embeddings=4096)
    proc = subprocess.Popen([sys.executable, "-m", "llamacli", "generate", "--model", str(folder), "--raw",
                             "--prompt", PROMPT, "-n", "4000", "--ignore-eos"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert os.read(proc.stdout.fileno(), 3)
        proc.stdout.close()
        err = proc.stderr.read()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 1 and err == b""


@pytest.mark.parametrize("args, code, fragment", [
    (["generate", "--model", "{bad}", "--prompt", "x"], 1, "no config.json"),
    (["generate", "--model", "{model}", "--prompt", "x", "--top-p", "2"], 2, "top-p must be in (0, 1]"),
    (["generate", "--model", "{model}", "--prompt", "x", "--bogus"], 2, "No such option: --bogus"),
    (["generate", "--prompt", "x"], 2, "Missing option '--model'"),
    (["generate", "--model", "{model}", "--prompt", "x", "--temperature", "hot"], 2, "--temperature"),
    (["inspect", "--model", "{bad}"], 1, "no config.json"),
    (["perplexity", "--model", "{model}", "--text", "x y z", "--stride", "0", "--context", "4"], 2, "--stride"),
])
def test_errors_in_a_subprocess_are_one_line_with_the_exit_code(args, code, fragment, tiny_chat_dir, tmp_path):
    (tmp_path / "bad").mkdir()
    args = [a.format(model=tiny_chat_dir, bad=tmp_path / "bad") for a in args]
    one_error_line(run(*args), code, fragment)


HELP_PROBE = """
import runpy, sys
sys.argv = ["llamacli", *sys.argv[1:]]
try:
    runpy.run_module("llamacli", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print("TORCH-IMPORTED" if "torch" in sys.modules else "NO-TORCH", code, file=sys.stderr)
"""


@pytest.mark.parametrize("args", [["--help"], ["generate", "--help"], ["chat", "--help"], ["inspect", "--help"],
                                  ["perplexity", "--help"], ["tokenize", "--help"], ["convert", "--help"],
                                  ["bench", "--help"]])
def test_help_does_not_import_torch(args):
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE, *args], capture_output=True, text=True, timeout=60)
    assert proc.stderr.strip().endswith("NO-TORCH 0"), proc.stderr
    assert "Usage" in proc.stdout


def test_inspect_command_does_not_import_torch(tiny_chat_dir):
    proc = subprocess.run([sys.executable, "-c", HELP_PROBE, "inspect", "--model", str(tiny_chat_dir), "--json"],
                          capture_output=True, text=True, timeout=60)
    assert proc.stderr.strip().endswith("NO-TORCH 0"), proc.stderr
    assert json.loads(proc.stdout)["num_layers"] == 2


def test_python_m_llamacli_help_lists_every_command():
    proc = run("--help")
    assert proc.returncode == 0
    for command in ("generate", "chat", "inspect", "perplexity"):
        assert command in proc.stdout
    importtime = subprocess.run([sys.executable, "-X", "importtime", "-m", "llamacli", "--help"],
                                capture_output=True, text=True, timeout=60)
    imported = {line.split("|")[-1].strip() for line in importtime.stderr.splitlines() if "|" in line}
    assert "typer" in imported and "torch" not in imported


# ---------------------------------------------------------------------------------------------------------
# the real model


@pytest.mark.slow
@pytest.mark.parity
def test_smollm2_generate_json_greedy_equals_transformers(smollm2_dir):
    import transformers

    messages = [{"role": "user", "content": "What is the capital of France?"}]
    tok = transformers.AutoTokenizer.from_pretrained(smollm2_dir)
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    ref = transformers.LlamaForCausalLM.from_pretrained(smollm2_dir, dtype=torch.float32).eval()
    expected = ref.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                            max_new_tokens=24, do_sample=False, eos_token_id=tok.eos_token_id,
                            pad_token_id=tok.eos_token_id)[0, len(ids):].tolist()
    out = gen_json(smollm2_dir, "--prompt", messages[0]["content"], "--max-new-tokens", "24",
                   "--temperature", "0")
    assert out["prompt_token_ids"] == ids
    if expected[-1] == tok.eos_token_id:  # transformers keeps the eos token; so do we
        assert out["finish_reason"] == "stop"
    assert out["token_ids"] == expected
    assert "Paris" in out["text"]


# ---------------------------------------------------------------------------------------------------------
# hostile text and files (issue 15: items 5, 6, 8, 9, 13)


def run_bytes(*args, stdin: bytes, timeout: int = 120):
    """llamacli in a fresh process, with raw bytes on stdin; stdout/stderr decoded leniently."""
    proc = subprocess.run([sys.executable, "-m", "llamacli", *map(str, args)], input=stdin, capture_output=True,
                          timeout=timeout)
    return subprocess.CompletedProcess(proc.args, proc.returncode, proc.stdout.decode("utf-8", "replace"),
                                       proc.stderr.decode("utf-8", "replace"))


def test_piped_chat_reports_a_line_that_is_not_utf8_and_goes_on(tiny_chat_dir):
    proc = run_bytes("chat", "--model", tiny_chat_dir, "-n", "3", "--json", stdin=b"hello\n\xff\xfe oops\nbye\n")
    assert proc.returncode == 1, proc.stderr
    replies = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [r["finish_reason"] for r in replies] == ["length", "error", "length"]
    assert replies[1]["error"] == "line 2 of standard input is not UTF-8 (invalid start byte at byte 0)"
    assert "error: line 2 of standard input is not UTF-8" in proc.stderr and "Traceback" not in proc.stderr
    alone = run_bytes("chat", "--model", tiny_chat_dir, "-n", "3", "--json", stdin=b"hello\nbye\n")
    assert [r["content"] for r in map(json.loads, alone.stdout.splitlines())] == \
        [replies[0]["content"], replies[2]["content"]]  # the bad line left no turn in the conversation


@pytest.mark.parametrize("command", [["generate", "--prompt", "-"], ["tokenize", "--text", "-"]])
def test_stdin_that_is_not_utf8_is_one_line_naming_the_byte(command, tiny_chat_dir):
    proc = run_bytes(*command, "--model", tiny_chat_dir, stdin=b"ab\xff\n")
    one_error_line(proc, 1, f"standard input ({command[1]} -) is not UTF-8 (invalid start byte at byte 2)")


def test_a_prompt_file_that_is_not_utf8_names_the_file_and_byte(tiny_chat_dir, tmp_path):
    bad = tmp_path / "p.txt"
    bad.write_bytes(b"hello \xc3\x28")
    one_error_line(invoke("generate", "--model", tiny_chat_dir, "--prompt-file", bad), 1,
                   f"--prompt-file {bad} is not UTF-8 (invalid continuation byte at byte 6)")
    one_error_line(invoke("generate", "--model", tiny_chat_dir, "--prompt-file", tmp_path), 1, "is a directory")


@pytest.mark.parametrize("option", ["--prompt", "--system", "--stop"])
def test_undecodable_bytes_in_arguments_are_usage_errors_before_loading(option, tmp_path):
    args = ["generate", "--model", tmp_path / "absent", "--prompt", "hi"]
    args = [*args[:3], option, b"a\xff".decode("utf-8", "surrogateescape")] + ([] if option == "--prompt" else args[3:])
    one_error_line(run(*args), 2, f"{option} is not valid text (a lone surrogate '\\udcff' at character 1)")


def test_a_big_seed_is_a_usage_error_before_loading(tmp_path):
    for command in ("generate", "chat"):
        one_error_line(invoke(command, "--model", tmp_path / "absent", "--prompt", "hi", "--seed", 2**64)
                       if command == "generate" else invoke(command, "--model", tmp_path / "absent", "--seed", 2**64),
                       2, "seed must be an integer in [0, 2**63)")


def test_a_prompt_too_long_for_the_context_is_refused_before_tokenizing(tiny_chat_dir, tmp_path, monkeypatch):
    from llamacli import tokenizer as tokenizer_module

    big = tmp_path / "big.txt"
    big.write_text("hello world " * 2000)  # 24,000 bytes; the model's 256 positions hold at most 256 x 64
    encoded = []
    monkeypatch.setattr(tokenizer_module._HFTokenizer, "encode", lambda self, text, **kw: encoded.append(text) or [1])
    for extra in ([], ["--raw"]):
        one_error_line(invoke("generate", "--model", tiny_chat_dir, "--prompt-file", big, *extra), 1,
                       "is 24,000 bytes, more than the model's context of 256 tokens can hold (at most 16,384 bytes")
    assert encoded == []


def test_a_tokenizer_larger_than_the_models_vocabulary_is_one_line(tiny_chat_dir, tiny_checkpoint):
    small = tiny_checkpoint(vocab_size=64, max_position_embeddings=256)  # the chat tokenizer has hundreds of ids
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(tiny_chat_dir / name, small / name)
    one_error_line(invoke("generate", "--model", small, "--prompt", "hello world"), 1,
                   "beyond the model's vocabulary of 64 (config.json vocab_size)")
    rows = small / "rows.jsonl"
    rows.write_text('{"prompt": "hello world"}\n{"prompt": "a", "max_new_tokens": 2}\n')
    result = invoke("generate", "--model", small, "--prompts-file", rows, "--raw")
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    assert "line 1: the tokenizer encoded the prompt with token id" in result.stdout


@pytest.mark.parametrize("where", ["--chat-template", "tokenizer_config.json"])
@pytest.mark.parametrize("command", ["generate", "chat", "batch"])
def test_a_chat_template_that_would_hang_fails_naming_its_source(where, command, tiny_chat_dir, tmp_path):
    bomb = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    model = copy_checkpoint(tiny_chat_dir, tmp_path / "m")
    extra = []
    if where == "--chat-template":
        (tmp_path / "t.jinja").write_text(bomb)
        extra, source = ["--chat-template", tmp_path / "t.jinja"], f"chat template {tmp_path / 't.jinja'}"
    else:
        conf = json.loads((model / "tokenizer_config.json").read_text())
        (model / "tokenizer_config.json").write_text(json.dumps({**conf, "chat_template": bomb}))
        source = f"chat template in {model / 'tokenizer_config.json'}"
    if command == "generate":
        result = invoke("generate", "--model", model, "--prompt", "hi", *extra)
        one_error_line(result, 1, f"error: {source}", "was stopped: it did more work than allowed")
    elif command == "chat":
        result = invoke("chat", "--model", model, *extra, input="hi\n")
        assert result.exit_code == 1 and result.stdout == "\n"
        assert result.stderr.startswith(f"error: {source}") and "was stopped" in result.stderr
    else:
        result = invoke("generate", "--model", model, "--prompts-file", "-", *extra, input='{"prompt": "hi"}\n')
        assert result.exit_code == 1 and f"line 1: {source}" in json.loads(result.stdout)["error"]

"""Tensor parallelism and sharded batch runs on torch.distributed: 2 processes with gloo on 127.0.0.1.

Each group of checks starts its processes once: the tensor-parallel forward over every fixture shape in one
spawn, the dead-rank check in another, and the CLI under torchrun (tensor-parallel generate, data-parallel batch).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from llamacli import batch_shards, parallel
from llamacli.config import load_config
from llamacli.errors import UsageError
from llamacli.parallel import ShardPlan
from llamacli.weights import load_model

ROOT = Path(__file__).resolve().parents[1]
WORLD = 2
PROMPT = [[1, 5, 9, 17, 33, 65, 3, 7, 11]]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _join(rank: int, port: int, timeout_s: float = 60) -> None:
    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_RANK=str(rank), **{parallel.TIMEOUT_ENV: str(timeout_s)})
    parallel.init(torch.device("cpu"))


def _outputs(model, prompt) -> dict:
    """Full logits, a cached prefill + decode, a two-row batch, greedy tokens and the bytes of the weight formats
    of one model (sharded or not)."""
    from llamacli.generation import Engine
    from llamacli.request import Request

    tokens = torch.tensor(prompt)
    engine = Engine(model)
    with torch.inference_mode():
        full = model(tokens)
        cache = engine.new_cache(32, max_batch=2)
        rows = torch.tensor([prompt[0][:6], prompt[0][3:9]])
        batched = model(rows, 0, cache, last_only=True)
        step = model(torch.tensor([[4], [8]]), 6, cache)
        fin = engine.generate(prompt[0], Request(max_new_tokens=8, ignore_eos=True))
    nbytes = sum(f.nbytes for f in model.formats().values())
    return {"full": full, "batched": batched, "step": step, "greedy": fin.token_ids, "nbytes": nbytes}


def _tp_worker(rank: int, port: int, cases: list[tuple[str, dict]], out: str) -> None:
    _join(rank, port)
    results = []
    for folder, options in cases:
        plan = ShardPlan.for_config(load_config(folder), rank, WORLD)
        results.append(_outputs(load_model(folder, shard=plan, **options), PROMPT))
    torch.save(results, Path(out) / f"rank{rank}.pt")
    parallel.shutdown()


def _spawn_tp(cases: list[tuple[str, dict]], tmp_path: Path) -> list[list[dict]]:
    """Run the cases (folder, load_model options) on 2 ranks; each rank's outputs, case by case."""
    torch.multiprocessing.spawn(_tp_worker, args=(_free_port(), cases, str(tmp_path)), nprocs=WORLD)
    return [torch.load(tmp_path / f"rank{r}.pt") for r in range(WORLD)]


SHAPES = {
    "gqa": {},
    "mqa replicated, tied": dict(num_key_value_heads=1, tie_word_embeddings=True),
    "mha, biases, odd vocabulary": dict(num_key_value_heads=4, attention_bias=True, mlp_bias=True, vocab_size=127),
    "gqa 8/2 heads, dim 64": dict(num_attention_heads=8, num_key_value_heads=2, tie_word_embeddings=True),
    "3 kv heads over 2 ranks (2 + 1 groups)": dict(hidden_size=96, num_attention_heads=6, num_key_value_heads=3),
}


def test_tensor_parallel_matches_one_process_for_every_shape(tiny_checkpoint, tmp_path):
    folders = [str(tiny_checkpoint(**overrides)) for overrides in SHAPES.values()]
    ranks = _spawn_tp([(f, {}) for f in folders], tmp_path)
    for name, folder, got0, got1 in zip(SHAPES, folders, *ranks):
        want = _outputs(load_model(folder), PROMPT)
        for key in ("full", "batched", "step"):
            assert torch.equal(got0[key], got1[key]), (name, key)  # every rank holds the same logits
            torch.testing.assert_close(got0[key], want[key], rtol=1e-5, atol=1e-5, msg=f"{name}: {key}")
        assert got0["greedy"] == want["greedy"], name


QUANT_SHAPES = ("gqa", "mha, biases, odd vocabulary", "3 kv heads over 2 ranks (2 + 1 groups)")


def test_tensor_parallel_quantized_matches_one_process_quantized(tiny_checkpoint, tmp_path):
    """Shard, then quantize per rank (int8, int4) and a quantized checkpoint sliced as stored: every rank's weights
    are its slices of the one-process quantized model's, so logits agree up to the rounding of the kernels' bf16
    partial sums and greedy tokens are the same; each rank holds about half the weight bytes."""
    from llamacli import quantization
    from llamacli.quant.checkpoint import write_quantized

    cases, names = [], []
    for name in QUANT_SHAPES:
        folder = tiny_checkpoint(**SHAPES[name])
        for quant, options in (("int8", dict(quantize="int8")), ("int4", dict(quantize="int4"))):
            cases.append((str(folder), options))
            names.append(f"{name}: --quantize {quant}")
        for bits in (8, 4):
            stored = write_quantized(folder, tmp_path / f"q{len(cases)}", quantization.Quantization(bits, 32 if bits == 4
                                                                                              else None))
            cases.append((str(stored), {}))
            names.append(f"{name}: stored int{bits}")
    ranks = _spawn_tp(cases, tmp_path)
    for name, (folder, options), got0, got1 in zip(names, cases, *ranks):
        want = _outputs(load_model(folder, **options), PROMPT)
        for key in ("full", "batched", "step"):
            assert torch.equal(got0[key], got1[key]), (name, key)
            # a few rows go through the CPU kernels, which return bf16: a rank's partial sum of o / down is
            # rounded before the all-reduce, the one-process sum after (2^-9 of each, tests/test_quant.py)
            tol = 2e-2 * want[key].abs().max().item()
            torch.testing.assert_close(got0[key], want[key], rtol=2e-2, atol=tol, msg=f"{name}: {key}")
        assert got0["greedy"] == want["greedy"], name
        assert max(got0["nbytes"], got1["nbytes"]) < 0.6 * want["nbytes"], name


def test_int4_groups_must_tile_each_ranks_columns(tiny_checkpoint):
    folder = tiny_checkpoint()  # o_proj: 2 heads x 16 = 32 input columns per rank; down_proj: 64
    plan = ShardPlan.for_config(load_config(folder), 0, WORLD)
    with pytest.raises(UsageError, match=r"^--tensor-parallel over 2 ranks with int4 group size 64: o_proj's 32 "
                                         r"input columns per rank are not a multiple of 64; use --group-size 32$"):
        load_model(folder, quantize="int4", group_size=64, shard=plan)
    with pytest.raises(UsageError, match="o_proj's 32 input columns per rank and down_proj's 64 input columns per "
                                         "rank are not a multiple of 128; use --group-size 32"):
        plan.check_groups(128)
    plan.check_groups(32)


def test_rank_reads_only_its_slices_and_caches_its_own_heads(tiny_checkpoint):
    folder = tiny_checkpoint(num_key_value_heads=4)
    config = load_config(folder)
    plan = ShardPlan.for_config(config, 1, WORLD)
    local = plan.local_config()
    assert (local.n_heads, local.n_kv_heads, local.ffn_dim) == (2, 2, config.ffn_dim // 2)
    assert plan.slice_of("model.layers.0.self_attn.k_proj.weight") == (0, 2 * config.head_dim, 4 * config.head_dim)
    assert plan.slice_of("model.layers.0.mlp.down_proj.weight") == (1, config.ffn_dim // 2, config.ffn_dim)
    assert plan.slice_of("model.norm.weight") is None
    uneven = [ShardPlan.for_config(load_config(tiny_checkpoint(hidden_size=144, num_attention_heads=9,
                                                                num_key_value_heads=3)), r, WORLD) for r in (0, 1)]
    assert [(p.kv_first, p.kv_heads, p.head_first, p.heads) for p in uneven] == [(0, 2, 0, 6), (2, 1, 6, 3)]
    mqa = ShardPlan.for_config(load_config(tiny_checkpoint(num_key_value_heads=1)), 1, WORLD)
    assert (mqa.kv_heads, mqa.kv_first) == (1, 0)  # the one KV head on both ranks


def test_shape_that_cannot_be_split_fails_before_loading(tiny_checkpoint):
    folder = tiny_checkpoint(num_attention_heads=4, num_key_value_heads=1, intermediate_size=96)
    (folder / "model.safetensors").write_bytes(b"not read")  # loading would fail with another error
    with pytest.raises(UsageError, match=r"n_heads 4 cannot be split .*not divisible by 3"):
        ShardPlan.for_config(load_config(folder), 0, 3)
    with pytest.raises(UsageError, match="intermediate_size 96"):
        ShardPlan.for_config(load_config(folder), 0, 5)


def _dead_rank_worker(rank: int, port: int, out: str) -> None:
    _join(rank, port, timeout_s=10)
    parallel.barrier()
    if rank == 1:
        os._exit(3)  # dies without a word, between collectives
    try:
        parallel.all_reduce(torch.ones(4))
        message = "no error"
    except parallel.DistributedError as exc:
        message = str(exc)
    Path(out, "rank0.txt").write_text(message)
    os._exit(0)


def test_a_dead_rank_makes_the_other_fail_with_a_clear_error(tmp_path):
    ctx = torch.multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_dead_rank_worker, args=(r, port, str(tmp_path))) for r in range(WORLD)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)  # a hang would leave rank 0 alive past this (its collective timeout is 10 s)
    assert [p.exitcode for p in procs] == [0, 3]
    message = (tmp_path / "rank0.txt").read_text()
    assert message.startswith("rank 0: an all-reduce with the other ranks failed"), message
    assert "\n" not in message


# -- the CLI under torchrun ---------------------------------------------------------------------------------------


def _torchrun(*args, env=None, timeout=240, stdin=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(WORLD), "--master-addr",
           "127.0.0.1", "--master-port", str(_free_port()), "-m", "llamacli", *map(str, args)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env, cwd=ROOT, input=stdin)


def _cli(*args, stdin=None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llamacli", *map(str, args)], capture_output=True, text=True,
                          timeout=120, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, input=stdin)


def test_torchrun_tensor_parallel_generate_prints_once_and_matches(tiny_chat_dir):
    args = ["generate", "--model", tiny_chat_dir, "--prompt", "hello there", "-n", "12", "--ignore-eos", "--json"]
    one = _cli(*args)
    assert one.returncode == 0, one.stderr
    tp = _torchrun(*args, "--tensor-parallel")
    assert tp.returncode == 0, tp.stderr
    lines = tp.stdout.strip().splitlines()
    assert len(lines) == 1, tp.stdout  # rank 0 only
    assert json.loads(lines[0])["token_ids"] == json.loads(one.stdout)["token_ids"]
    # The int4 self-draft is sharded as the model is (shard, then quantize): greedy output unchanged.
    spec = _torchrun(*args, "--tensor-parallel", "--draft-quantize", "int4")
    assert spec.returncode == 0, spec.stderr
    out = json.loads(spec.stdout)
    assert out["token_ids"] == json.loads(one.stdout)["token_ids"]
    assert out["stats"]["draft"] == "self-int4" and out["stats"]["accepted_tokens"] > 0


def test_torchrun_tensor_parallel_int4_generate_matches_one_process_int4(tiny_chat_dir):
    args = ["generate", "--model", tiny_chat_dir, "--prompt", "hello there", "-n", "12", "--ignore-eos", "--json",
            "--quantize", "int4"]
    one = _cli(*args)
    assert one.returncode == 0, one.stderr
    tp = _torchrun(*args, "--tensor-parallel")
    assert tp.returncode == 0, tp.stderr
    assert json.loads(tp.stdout)["token_ids"] == json.loads(one.stdout)["token_ids"]
    bad = _torchrun(*args, "--tensor-parallel", "--group-size", "128")
    assert bad.returncode != 0 and "int4 group size 128: o_proj's 32 input columns per rank" in bad.stderr


def test_torchrun_tensor_parallel_chat_matches_one_process(tiny_chat_dir):
    """Piped chat under torchrun: rank 0 reads the turns, every rank runs them, rank 0 alone prints the replies."""
    args = ["chat", "--model", tiny_chat_dir, "-n", "8", "--json", "--seed", "3", "--temperature", "0.8"]
    turns = "hello there\nand what else?\n"
    one = _cli(*args, stdin=turns)
    assert one.returncode == 0, one.stderr
    tp = _torchrun(*args, "--tensor-parallel", stdin=turns)
    assert tp.returncode == 0, tp.stderr
    got, want = ([json.loads(line) for line in r.stdout.splitlines()] for r in (tp, one))
    assert len(got) == len(want) == 2
    assert [t["token_ids"] for t in got] == [t["token_ids"] for t in want]
    assert got[1]["prefill_tokens"] < len(got[1]["prompt_token_ids"])  # the second turn reused the cache


def test_torchrun_sharded_batch_equals_one_process_and_resumes(tiny_chat_dir, tmp_path):
    rows = [{"id": f"r{i}", "prompt": f"say {i} " * (1 + i % 3), "max_new_tokens": 3 + i % 4} for i in range(7)]
    rows.insert(3, {"id": "bad", "prompt": 5})
    prompts = tmp_path / "in.jsonl"
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    single, sharded = tmp_path / "one.jsonl", tmp_path / "two.jsonl"
    base = ["generate", "--model", tiny_chat_dir, "--prompts-file", prompts, "--batch-size", "2"]
    one = _cli(*base, "--output", single)
    assert one.returncode == 1, one.stderr  # the bad row
    # An unfinished run: rank 1's part holds a finished row and a row cut by its death; the output one row.
    want = [json.loads(line) for line in single.read_text().splitlines()]
    by_id = {r["id"]: r for r in want}
    sharded.write_text(json.dumps(by_id["r0"]) + "\n")
    part = sharded.with_name(sharded.name + ".rank1-of-2.part")
    part.write_text(json.dumps(by_id["r4"]) + "\n" + '{"id": "r5", "te')
    with pytest.raises(UsageError, match="unfinished sharded run"):  # what every rank checks first
        batch_shards.check_parts(sharded, resume=False, overwrite=False)
    two = _torchrun(*base, "--output", sharded, "--resume")
    assert two.returncode != 0, two.stderr  # the bad row (torchrun exits 1 when a rank does)
    got = [json.loads(line) for line in sharded.read_text().splitlines()]
    assert [r["id"] for r in got] == [r["id"] for r in rows]  # every row once, in input order
    for a, b in zip(got, sorted(want, key=lambda r: [x["id"] for x in rows].index(r["id"]))):
        assert a == b
    assert not list(tmp_path.glob("*.part"))
    assert "merged" in two.stderr


def test_tensor_parallel_in_one_process_is_the_plain_model(tiny_chat_dir):
    from typer.testing import CliRunner

    from llamacli.cli import app

    args = ["generate", "--model", str(tiny_chat_dir), "-p", "hi", "-n", "6", "--ignore-eos", "--json"]
    plain, tp = (CliRunner().invoke(app, args + extra) for extra in ([], ["--tensor-parallel"]))
    assert plain.exit_code == 0 and tp.exit_code == 0, tp.output
    assert json.loads(tp.stdout)["token_ids"] == json.loads(plain.stdout)["token_ids"]

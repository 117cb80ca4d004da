"""Batched generation: the engine's continuous batching equals one-at-a-time generation; the JSONL runner
(`llamacli.batch`): input rules, bad rows with line numbers, resume, stdin/stdout; the CLI; the Python API example.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from llamacli.batch import BatchDefaults, generate_many, prepare_output, read_rows, run_batch
from llamacli.cli import app
from llamacli.generation import PREFILL_TOKENS_PER_STEP, Engine, Request, generate_batch, scheduler_for
from llamacli.errors import ContextOverflowError, InputError, UsageError
from llamacli.sampling import SamplingParams
from tests.conftest import write_tiny_chat_checkpoint

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def chat_dir(tmp_path_factory) -> Path:
    """A tiny random checkpoint with a tiny byte-level BPE tokenizer and a Llama-3 style chat template."""
    return write_tiny_chat_checkpoint(tmp_path_factory.mktemp("batch") / "tiny-chat", max_position_embeddings=128)


@pytest.fixture(scope="module")
def engine(chat_dir) -> Engine:
    return Engine.load(chat_dir, dtype="float32", device="cpu")


def random_items(n: int, seed: int = 0, vocab: int = 400) -> list[tuple[int, list[int], Request]]:
    """n prompts of mixed lengths (1..40 tokens) with mixed max_new_tokens, some sampled with seeds."""
    rng = random.Random(seed)
    items = []
    for k in range(n):
        ids = [rng.randrange(5, vocab) for _ in range(rng.randrange(1, 41))]
        sampled = k % 3 == 0
        req = Request(max_new_tokens=rng.randrange(1, 25), ignore_eos=k % 2 == 0, seed=1000 + k,
                      sampling=SamplingParams(temperature=1.3, top_k=50) if sampled else SamplingParams())
        items.append((k, ids, req))
    return items


def assert_same(batch, single):
    assert batch.token_ids == single.token_ids
    assert batch.reason == single.reason
    assert batch.text == single.text
    assert batch.stats.prompt_tokens == single.stats.prompt_tokens
    assert batch.stats.generated_tokens == len(single.token_ids)


# -- the engine ----------------------------------------------------------------------------------------------


def run_scheduled(engine, items, batch_size, prefill_budget=PREFILL_TOKENS_PER_STEP, prefix_cache=True):
    """(scheduler, results by key) of a batch job, keeping the scheduler to read its counters."""
    scheduler = scheduler_for(engine, items, batch_size, prefill_budget, prefix_cache)
    return scheduler, dict(generate_batch(engine, items, scheduler=scheduler))


@pytest.mark.parametrize("batch_size", [1, 3, 4, 16])
def test_batch_equals_one_at_a_time(engine, batch_size):
    """Mixed prompt lengths, more prompts than slots (refill), greedy and seeded rows: each row as if alone."""
    items = random_items(13)
    decoder, results = run_scheduled(engine, items, batch_size)
    assert sorted(results) == list(range(13))
    for key, ids, req in items:
        assert_same(results[key], engine.generate(ids, req))
    assert decoder.max_active == min(batch_size, 13)


def test_refilled_slot_hides_the_previous_rows_cache(engine):
    """A long row finishes, a short prompt takes its slot: stale keys past the new row's end stay hidden."""
    long_ids = list(range(10, 70))
    items = [(0, long_ids, Request(max_new_tokens=3, ignore_eos=True)),
             (1, [7, 8, 9], Request(max_new_tokens=30, ignore_eos=True)),
             (2, [11, 12], Request(max_new_tokens=20, ignore_eos=True))]
    results = dict(engine.stream_batch(items, batch_size=2))
    for key, ids, req in items:
        assert results[key].token_ids == engine.generate(ids, req).token_ids


def test_finished_slot_takes_the_next_prompt_at_once(engine):
    """Continuous, not static, batching: the decode steps equal the longest slot's work, not a sum of waves."""
    news = [2, 10, 2, 2, 2]
    items = [(k, [20 + k, 30, 40], Request(max_new_tokens=n, ignore_eos=True)) for k, n in enumerate(news)]
    decoder = scheduler_for(engine, items, 2)
    order = [key for key, _ in generate_batch(engine, items, scheduler=decoder)]
    # Every step is one forward, and a new row's prefill rides in the same forward as the other slot's decode.
    # Slot 1 runs row 1 (its prefill, then 9 decode steps: 10 forwards) while slot 0 runs rows 0, 2, 3, 4 (a
    # prefill and one decode step each: 8 forwards): 10 steps in all; static batches would take 10 + 2 + 2.
    assert decoder.steps == 10
    assert order == [0, 2, 3, 4, 1]


def test_rows_at_the_end_move_into_free_slots(engine):
    """With no prompt waiting, finished slots are compacted away and the remaining rows stay correct."""
    news = [3, 12, 5, 20]
    items = [(k, list(range(5, 5 + 4 * (k + 1))), Request(max_new_tokens=n, ignore_eos=True))
             for k, n in enumerate(news)]
    results = dict(engine.stream_batch(items, batch_size=4))
    for key, ids, req in items:
        assert results[key].token_ids == engine.generate(ids, req).token_ids



def test_new_prompts_prefill_in_the_decode_step_within_a_token_budget(engine, monkeypatch):
    """Free slots take waiting prompts in the same forward as the decoding rows, up to the step's prompt-token
    budget; a prompt longer than the budget still goes in alone. Results equal one-at-a-time runs."""
    items = [(0, list(range(3, 9)), Request(max_new_tokens=6, ignore_eos=True)),
             (1, list(range(20, 26)), Request(max_new_tokens=6, ignore_eos=True)),
             (2, list(range(40, 60)), Request(max_new_tokens=6, ignore_eos=True))]
    seen = []
    forward_last = engine.model.forward_last

    def record(parts):
        seen.append([tuple(t.shape) for t, _, _ in parts])
        return forward_last(parts)

    monkeypatch.setattr(engine.model, "forward_last", record)
    decoder, results = run_scheduled(engine, items, 3, prefill_budget=10)
    # Step 1 prefills item 0 (6 tokens; 6 more would pass 10); step 2 decodes it and prefills item 1; step 3
    # decodes both and prefills the 20-token item 2 on its own budget.
    assert seen[:3] == [[(1, 6)], [(1, 1), (1, 6)], [(2, 1), (1, 20)]]
    assert all(shapes == [(3, 1)] for shapes in seen[3:5])
    monkeypatch.setattr(engine.model, "forward_last", forward_last)
    for key, ids, req in items:
        assert results[key].token_ids == engine.generate(ids, req).token_ids


@pytest.mark.parametrize("batch_size", [1, 3, 5])
def test_cost_benchmark_replays_the_schedule_forward_by_forward(engine, monkeypatch, batch_size):
    """benchmarks/bench_batch_costs.py predicts a run from its schedule: every forward's decoding rows and
    prefill tokens, in order, must be those the scheduler runs (here with a small prefill budget too)."""
    from benchmarks.bench_batch_costs import replay

    rng = random.Random(batch_size)
    items = [(k, [rng.randrange(5, 400) for _ in range(rng.randrange(2, 25))],
              Request(max_new_tokens=rng.randrange(1, 12), ignore_eos=True)) for k in range(11)]
    seen = []
    forward_last = engine.model.forward_last

    def record(parts):
        decoding = sum(t.shape[0] for t, _, _ in parts if t.shape[1] == 1)  # prompts here are >= 2 tokens
        seen.append((decoding, sum(t.shape[1] for t, _, _ in parts if t.shape[1] > 1)))
        return forward_last(parts)

    monkeypatch.setattr(engine.model, "forward_last", record)
    decoder, results = run_scheduled(engine, items, batch_size, prefill_budget=30)
    replayed = []
    seconds, forwards = replay([len(ids) for _, ids, _ in items], [len(results[k].token_ids) for k, _, _ in items],
                               batch_size, decoder.shared_prefix_tokens, lambda k, T: replayed.append((k, T)) or 1.0,
                               prefill_budget=30)
    assert replayed == seen
    assert forwards == decoder.steps == len(seen)
    assert seconds == pytest.approx(len(seen) / 1e3)


@pytest.mark.parametrize("prefix_cache", [False, True])
def test_a_prefix_all_prompts_share_is_prefilled_once(engine, monkeypatch, prefix_cache):
    """A shared header (system prompt, few-shot examples) is computed once; each row copies its keys/values and
    prefills only its own tokens, with the same results as one-at-a-time runs. With the prefix cache, the rows
    admitted once the first two have run reuse the 20 header tokens those rows hold."""
    header = list(range(100, 100 + 20))
    tails = [[5, 6, 7], [8], list(range(30, 45)), [9, 10]]
    items = [(k, header + tail, Request(max_new_tokens=8, ignore_eos=True)) for k, tail in enumerate(tails)]
    items.append((4, header[:-1] + [1, 2], Request(max_new_tokens=8, ignore_eos=True)))  # shares 19 tokens
    seen = []
    forward_last = engine.model.forward_last

    def record(parts):
        seen.extend((tuple(t.shape), start) for t, start, _ in parts if t.shape[1] > 1)  # the prefills
        return forward_last(parts)

    monkeypatch.setattr(engine.model, "forward_last", record)
    decoder, results = run_scheduled(engine, items, 2, prefix_cache=prefix_cache)
    # Every prompt is prefilled from position 19 on: its own tail (and the header's 20th token for the first four);
    # with the prefix cache, rows 2 and 3 from position 20 on, copied from rows 0 and 1.
    starts = [19, 19, 20, 20, 19] if prefix_cache else [19] * 5
    assert sorted(seen) == sorted(((1, len(ids) - start), start) for (_, ids, _), start in zip(items, starts))
    assert decoder.cached_tokens == sum(starts)
    monkeypatch.setattr(engine.model, "forward_last", forward_last)
    for (key, ids, req), start in zip(items, starts):
        assert results[key].token_ids == engine.generate(ids, req).token_ids
        assert results[key].stats.prompt_tokens == len(ids)
        assert results[key].stats.prefill_tokens == len(ids) - start


def test_a_short_shared_prefix_is_not_worth_a_separate_prefill(engine):
    from llamacli.generation.scheduler import SHARED_PREFIX_MIN

    n = SHARED_PREFIX_MIN - 1
    items = [(k, list(range(100, 100 + n)) + [k + 1, 3], Request(max_new_tokens=3)) for k in range(3)]
    results = dict(engine.stream_batch(items, 2))
    assert all(r.stats.prefill_tokens == r.stats.prompt_tokens for r in results.values())


def test_no_prefix_reuse_past_a_dynamic_ntk_context(tmp_path):
    """Dynamic NTK rotates every position by the whole prompt's length once it passes the context, so a
    prefix computed alone would differ: batches of such prompts prefill each prompt whole, as single runs do."""
    from tests.conftest import write_tiny_checkpoint

    model_dir = write_tiny_checkpoint(tmp_path / "dyn", max_position_embeddings=24,
                                      rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    from llamacli.weights import load_model

    dyn = Engine(load_model(model_dir, dtype="float32", device="cpu"), None, None)
    header = list(range(3, 23))
    items = [(k, header + [30 + k] * (k + 5), Request(max_new_tokens=4, ignore_eos=True)) for k in range(3)]
    results = dict(dyn.stream_batch(items, 2))
    for key, ids, req in items:
        assert results[key].stats.prefill_tokens == len(ids)
        assert results[key].token_ids == dyn.generate(ids, req).token_ids
    # Prompts within the context reuse what rows hold within it (rows decode past it: those positions do not).
    items = [(k, header + [30 + k], Request(max_new_tokens=8, ignore_eos=True)) for k in range(3)]
    items.append((3, header + [30] + dyn.generate(header + [30], items[0][2]).token_ids[:2], items[0][2]))
    results = dict(generate_batch(dyn, items, scheduler=scheduler_for(dyn, items, 2)))
    for key, ids, req in items:
        assert results[key].token_ids == dyn.generate(ids, req).token_ids
    assert [results[k].stats.prefill_tokens for k in range(4)] == [1, 1, 1, 1]  # row 3: 22 from row 0

@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_half_precision_batches_of_many_rows_run(chat_dir, dtype):
    """Half weights with more rows than compute in half (fp16 upcasts them to fp32) still write the cache
    at each row's position: every row finishes, the cache keeps the weights' dtype."""
    half = Engine.load(chat_dir, dtype=dtype, device="cpu")
    items = random_items(10, seed=3)
    decoder, results = run_scheduled(half, items, 6)
    assert sorted(results) == list(range(10)) and decoder.max_active == 6
    for k, ids, req in items:
        assert 1 <= len(results[k].token_ids) <= req.max_new_tokens


def test_seeded_row_does_not_depend_on_its_batch_mates(engine):
    req = Request(max_new_tokens=15, sampling=SamplingParams(temperature=1.5), seed=7, ignore_eos=True)
    target = [33, 44, 55, 66]
    alone = engine.generate(target, req).token_ids
    mates_a = [("x", target, req)] + [(i, [9] * (i + 2), Request(max_new_tokens=5 + i)) for i in range(5)]
    mates_b = [(i, [100 + i] * 30, Request(max_new_tokens=20, sampling=SamplingParams(temperature=0.7), seed=i))
               for i in range(3)] + [("x", target, req)]
    for items, bs in ((mates_a, 3), (mates_b, 2), (mates_b, 4)):
        assert dict(engine.stream_batch(items, bs))["x"].token_ids == alone
    other_seed = Request(max_new_tokens=15, sampling=SamplingParams(temperature=1.5), seed=8, ignore_eos=True)
    assert dict(engine.stream_batch([("x", target, other_seed)] + mates_a[1:], 3))["x"].token_ids != alone


def test_rows_stop_on_their_own_eos_and_stop_strings(engine):
    """Each row stops at its own stop string or eos, with the text a single run gives."""
    free = engine.generate([1, 2, 3], Request(max_new_tokens=20, ignore_eos=True))
    stop = free.text[len(free.text) // 2:][:3]
    assert stop.strip()
    eos_engine = Engine(engine.model, engine.tokenizer, engine.chat_template)
    eos_engine.eos_ids = frozenset({free.token_ids[4]})
    items = [(0, [1, 2, 3], Request(max_new_tokens=20, stop=(stop,))),
             (1, [1, 2, 3], Request(max_new_tokens=20)),
             (2, [1, 2, 3], Request(max_new_tokens=20, ignore_eos=True)),
             (3, [5, 6], Request(max_new_tokens=7))]
    results = dict(eos_engine.stream_batch(items, 4))
    for key, ids, req in items:
        assert_same(results[key], eos_engine.generate(ids, req))
    assert results[0].reason == "stop" and stop not in results[0].text
    assert results[1].reason == "stop" and results[1].token_ids[-1] == free.token_ids[4]
    assert results[2].reason == "length" and len(results[2].token_ids) == 20


def test_batch_logprobs_match_single(engine):
    req = Request(max_new_tokens=6, logprobs=True, ignore_eos=True)
    items = [(k, [5 + k] * (3 + 5 * k), req) for k in range(3)]
    for key, fin in engine.stream_batch(items, 3):
        single = engine.generate(items[key][1], req)
        assert fin.token_ids == single.token_ids
        assert fin.logprobs == pytest.approx(single.logprobs, abs=1e-5)


def test_cache_is_sized_by_the_rows_and_overflow_is_refused_before_running(engine):
    too_long = [(0, [5] * 10, Request(max_new_tokens=5)), (1, [5] * 120, Request(max_new_tokens=20))]
    gen = engine.stream_batch(too_long, 2)
    with pytest.raises(ContextOverflowError, match=r"prompt \(120 tokens\) \+ max-new-tokens \(20\) = 140"):
        next(gen)
    with pytest.raises(UsageError, match="batch-size"):
        scheduler_for(engine, too_long, 0)
    assert list(engine.stream_batch([], 4)) == []


# -- the open scheduler: requests added while others run, token events, cancellation -------------------------


def test_requests_added_while_others_run_equal_one_at_a_time(engine):
    """add() between steps joins the running batch; every row's tokens equal a single run, and the events of
    each id are one TokenEvent per token, then Finished."""
    from llamacli.generation import Finished, Scheduler, TokenEvent

    items = random_items(7, seed=5)
    sched = Scheduler(engine, max_rows=3, max_positions=128)
    assert sched.idle
    ids_of, events = {}, {}
    pending = list(items)
    for _ in range(2):
        key, ids, req = pending.pop(0)
        ids_of[sched.add(ids, req)] = key
    steps = 0
    while not sched.idle or pending:
        if pending and steps % 3 == 2:  # a new request arrives every third step
            key, ids, req = pending.pop(0)
            ids_of[sched.add(ids, req)] = key
        for sid, event in sched.step():
            events.setdefault(sid, []).append(event)
        steps += 1
    assert sorted(ids_of) == sorted(events)
    for sid, evs in events.items():
        key, ids, req = items[ids_of[sid]]
        single = engine.generate(ids, req)
        tokens = [e.token_id for e in evs if isinstance(e, TokenEvent)]
        assert isinstance(evs[-1], Finished) and sum(isinstance(e, Finished) for e in evs) == 1
        assert tokens == single.token_ids == evs[-1].token_ids
        assert "".join(e.text for e in evs[:-1]) == evs[-1].text == single.text
    assert sched.max_active == 3


def test_cancel_frees_the_slot_at_the_next_step(engine):
    from llamacli.generation import Finished, Scheduler

    sched = Scheduler(engine, max_rows=2, max_positions=64)
    long_req = Request(max_new_tokens=40, ignore_eos=True)
    a = sched.add([5, 6, 7], long_req)
    b = sched.add([8, 9], long_req)
    c = sched.add([10, 11, 12], Request(max_new_tokens=5, ignore_eos=True))  # waits: both slots are taken
    sched.step()
    sched.step()
    assert sched.active == 2 and len(sched.waiting) == 1
    sched.cancel(a)
    events = sched.step()
    finished = [(sid, e) for sid, e in events if isinstance(e, Finished)]
    assert finished[0][0] == a and finished[0][1].reason == "cancelled" and len(finished[0][1].token_ids) == 2
    # c took a's slot in the same step (its prefill), and b kept decoding.
    moved = {sid for sid, _ in events}
    assert moved == {a, b, c}
    sched.cancel(c)
    sched.cancel(b)
    sched.cancel(12345)  # unknown ids are ignored
    events = sched.step()
    assert {sid for sid, e in events if isinstance(e, Finished) and e.reason == "cancelled"} == {b, c}
    assert sched.idle
    # The freed rows serve new requests correctly.
    d = sched.add([5, 6, 7], Request(max_new_tokens=6, ignore_eos=True))
    out = []
    while not sched.idle:
        out += [e for sid, e in sched.step() if sid == d and isinstance(e, Finished)]
    assert out[0].token_ids == engine.generate([5, 6, 7], Request(max_new_tokens=6, ignore_eos=True)).token_ids


def test_a_cancelled_queued_request_never_runs(engine):
    from llamacli.generation import Finished, Scheduler

    sched = Scheduler(engine, max_rows=1, max_positions=64)
    a = sched.add([5, 6, 7], Request(max_new_tokens=3, ignore_eos=True))
    b = sched.add([8, 9], Request(max_new_tokens=3, ignore_eos=True))
    sched.cancel(b)
    events = sched.step()
    fin = [e for sid, e in events if sid == b]
    assert len(fin) == 1 and isinstance(fin[0], Finished) and fin[0].reason == "cancelled" and fin[0].token_ids == []
    assert sched.steps == 1 and not sched.waiting
    while not sched.idle:
        assert all(sid == a for sid, _ in sched.step())


def test_a_request_that_cannot_fit_the_rows_is_refused_at_add(engine):
    from llamacli.generation import Finished, Scheduler

    sched = Scheduler(engine, max_rows=2, max_positions=20)
    with pytest.raises(ContextOverflowError, match=r"prompt \(15 tokens\) \+ max-new-tokens \(10\) = 25 exceeds "
                                                    r"a batch row's context of 20"):
        sched.add([5] * 15, Request(max_new_tokens=10))
    with pytest.raises(ContextOverflowError, match="the model's context of 128"):
        Scheduler(engine, max_rows=1).add([5] * 120, Request(max_new_tokens=10))
    assert sched.idle


def test_admission_policy_is_a_pure_function():
    from llamacli.generation import plan_admissions

    assert plan_admissions([0, 2, 3], [6, 6, 20], budget=10) == [0]
    assert plan_admissions([0, 2, 3], [4, 6, 20], budget=10) == [0, 2]
    assert plan_admissions([1], [500], budget=10) == [1]  # always at least one, however long
    assert plan_admissions([], [5], budget=10) == []
    assert plan_admissions([0, 1], [], budget=10) == []


# -- reading rows --------------------------------------------------------------------------------------------


def jsonl(text: str) -> list[dict]:
    """Rows of JSONL text. Split on "\\n" only: model text may hold U+2028 and friends, which splitlines() cuts."""
    return [json.loads(line) for line in text.split("\n") if line]


def write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


def test_read_rows_jsonl_ids_blank_lines_and_every_kind_of_bad_row(tmp_path):
    src = write(tmp_path / "in.jsonl", "\n".join([
        '{"id": "a", "prompt": "hello"}',                       # 1
        '',                                                      # 2 (blank: skipped)
        '{"prompt": "no id", "temperature": 0.5, "stop": "x"}',  # 3 -> id 3
        '{"prompt": "broken"',                                   # 4 malformed JSON
        '{"id": "b", "text": "neither"}',                        # 5 neither prompt nor messages
        '{"prompt": "p", "top_k": "many"}',                      # 6 bad override type
        '{"messages": [{"role": "user"}]}',                      # 7 bad messages
        '[1, 2]',                                                # 8 not an object
        '{"id": "a", "prompt": "again"}',                        # 9 duplicate id
        '{"messages": [{"role": "user", "content": "hi"}], "seed": 3, "system": "be brief", "extra": 1}',  # 10
        '{"prompt": "p", "stop": ["", "y"]}',                    # 11 empty stop string
    ]) + "\n")
    rows = read_rows(src)
    by_line = {r.line: r for r in rows}
    assert 2 not in by_line and len(rows) == 10
    assert (by_line[1].id, by_line[1].prompt, by_line[1].error) == ("a", "hello", None)
    assert by_line[3].id == 3 and by_line[3].overrides == {"temperature": 0.5, "stop": ("x",)}
    assert by_line[10].messages == [{"role": "user", "content": "hi"}]
    assert by_line[10].overrides == {"seed": 3, "system": "be brief"}
    errors = {n: r.error for n, r in by_line.items() if r.error}
    assert sorted(errors) == [4, 5, 6, 7, 8, 9, 11]
    assert errors[4].startswith("line 4: malformed JSON")
    assert errors[5] == "line 5: has neither 'prompt' nor 'messages'"
    assert errors[6] == "line 6: top_k must be an integer, got 'many'"
    assert errors[7].startswith("line 7: messages[0] must be an object with string 'role' and 'content'")
    assert errors[8] == "line 8: expected a JSON object, got list"
    assert errors[9] == "line 9: duplicate id 'a' (first used on line 1)"
    assert errors[11].startswith("line 11: stop must be a non-empty string")
    assert by_line[5].id == "b" and by_line[4].id == 4


def test_rows_with_text_that_is_valid_json_but_not_valid_text_fail_alone(tmp_path):
    src = write(tmp_path / "in.jsonl", "\n".join([
        '{"prompt": "fine"}',                                                    # 1
        '{"prompt": "a\\udcffb"}',                                               # 2 lone surrogate in the prompt
        '{"messages": [{"role": "user", "content": "x\\ud800"}]}',               # 3 ... in a message
        '{"messages": [{"role": "user", "content": "x", "name": ["\\udfff"]}]}',  # 4 ... deep in a message
        '{"prompt": "p", "stop": ["ok", "\\udcff"]}',                            # 5 ... in a stop string
        '{"prompt": "p", "system": "\\udcff"}',                                  # 6 ... in the system override
        '{"id": "\\udcff", "prompt": "p"}',                                      # 7 ... in the id
        '{"prompt": "also fine", "extra": "\\udcff"}',                           # 8 ignored fields are not read
    ]) + "\n")
    errors = {r.line: r.error for r in read_rows(src)}
    assert errors[1] is None and errors[8] is None
    assert errors[2] == "line 2: 'prompt' is not valid text (a lone surrogate '\\udcff' at character 1)"
    assert errors[3] == "line 3: messages[0]['content'] is not valid text (a lone surrogate '\\ud800' at character 1)"
    assert errors[4].startswith("line 4: messages[0]['name'][0] is not valid text")
    assert errors[5].startswith("line 5: stop[1] is not valid text")
    assert errors[6].startswith("line 6: system is not valid text")
    assert errors[7].startswith("line 7: id is not valid text")


def test_a_lone_surrogate_row_does_not_stop_the_batch(engine, chat_dir, tmp_path):
    src = write(tmp_path / "in.jsonl", '{"prompt": "one"}\n{"prompt": "\\udcff"}\n{"prompt": "three"}\n')
    result = CliRunner().invoke(app, ["generate", "--model", str(chat_dir), "--prompts-file", str(src), "-n", "2"])
    assert result.exit_code == 1 and "Traceback" not in result.stderr
    rows = {r["id"]: r for r in map(json.loads, result.stdout.splitlines())}
    assert sorted(rows) == [1, 2, 3] and "text" in rows[1] and "text" in rows[3]
    assert rows[2]["error"].startswith("line 2: 'prompt' is not valid text")
    api = generate_many(engine, ["\udcff", {"messages": [{"role": "user", "content": "\ud800"}]}, "fine"],
                        max_new_tokens=2)
    assert api[0]["error"].startswith("prompt 0: 'prompt' is not valid text")
    assert api[1]["error"].startswith("prompt 1: messages[0]['content'] is not valid text")
    assert len(api[2]["token_ids"]) == 2
    with pytest.raises(UsageError, match="the system message is not valid text"):
        generate_many(engine, ["x"], system="\udcff")
    with pytest.raises(UsageError, match="a stop string is not valid text"):
        generate_many(engine, ["x"], stop=["\udcff"])


def test_plain_text_input_and_the_format_rule(tmp_path):
    text = write(tmp_path / "prompts.txt", "first prompt\n\n{not json, a prompt in a .txt}\r\nlast")
    rows = read_rows(text)
    assert [(r.line, r.id, r.prompt) for r in rows] == [
        (1, 1, "first prompt"), (3, 3, "{not json, a prompt in a .txt}"), (4, 4, "last")]
    # No telling extension: JSONL when the first non-blank line starts with "{", plain text otherwise.
    assert read_rows(write(tmp_path / "p.in", '\n{"prompt": "x"}\n'))[0].prompt == "x"
    assert read_rows(write(tmp_path / "q.in", 'say {"prompt": "x"}\n'))[0].prompt == 'say {"prompt": "x"}'
    # A .jsonl file is JSONL even when a line is not an object.
    assert read_rows(write(tmp_path / "r.jsonl", "plain words\n"))[0].error.startswith("line 1: malformed JSON")
    bad = tmp_path / "bad.txt"
    bad.write_bytes(b"ok\n\xff\xfe broken\n")
    rows = read_rows(bad)
    assert rows[0].prompt == "ok" and rows[1].error.startswith("line 2: not UTF-8 text")


def test_unreadable_input_and_unwritable_output_are_input_errors(tmp_path):
    with pytest.raises(InputError, match="prompts file not found"):
        read_rows(tmp_path / "missing.jsonl")
    with pytest.raises(InputError, match="is a directory"):
        read_rows(tmp_path)
    with pytest.raises(InputError, match="does not exist"):
        prepare_output(tmp_path / "no" / "such" / "out.jsonl")
    with pytest.raises(InputError, match="is a directory"):
        prepare_output(tmp_path)
    with pytest.raises(UsageError, match="--resume needs an --output file"):
        prepare_output("-", resume=True)
    done, _ = prepare_output(tmp_path / "new.jsonl")
    assert done == {} and not (tmp_path / "new.jsonl").exists()  # checking creates nothing


def test_bad_defaults_are_refused_before_any_model():
    with pytest.raises(UsageError, match="temperature must be >= 0"):
        BatchDefaults.of(temperature=-1)
    with pytest.raises(UsageError, match="max-new-tokens"):
        BatchDefaults.of(max_new_tokens=0)
    with pytest.raises(UsageError, match="unknown batch option\\(s\\): temprature"):
        BatchDefaults.of(temprature=0.5)


def test_defaults_from_flat_options_build_the_engine_request():
    d = BatchDefaults.of(max_new_tokens=9, temperature=0.5, top_k=3, seed=4, stop=["x"], logprobs=True, system="s")
    r = d.request_for({"temperature": 0.9, "stop": ("y",)})
    assert (r.max_new_tokens, r.seed, r.stop, r.logprobs) == (9, 4, ("y",), True)
    assert (r.sampling.temperature, r.sampling.top_k) == (0.9, 3) and d.system == "s"


# -- running rows --------------------------------------------------------------------------------------------


def run_file(engine, src: Path, out: Path, defaults=BatchDefaults.of(max_new_tokens=8), batch_size=3, resume=False,
             overwrite=False):
    rows = read_rows(src)
    done, opener = prepare_output(out, resume, rows=rows, overwrite=overwrite, source=src)
    seen = []
    with opener() as f:
        summary = run_batch(engine, rows, defaults, f, batch_size, done, on_progress=lambda s, r: seen.append(
            (s.done, r["id"])))
    results = jsonl(out.read_text(encoding="utf-8"))
    assert [n for n, _ in seen] == list(range(1, summary.done + 1))  # one progress call per written row
    return summary, results


def test_run_batch_outputs_every_row_and_names_bad_ones(engine, tmp_path):
    src = write(tmp_path / "in.jsonl", "\n".join([
        '{"id": "chat", "prompt": "Hello world"}',
        '{"id": "msgs", "messages": [{"role": "user", "content": "How are you today?"}], "max_new_tokens": 5}',
        '{"prompt": "' + "Numbers: 0 1 2 3 12 123 1234 " * 20 + '"}',   # line 3: too long for the context
        '{"id": "hot", "prompt": "The quick brown fox", "temperature": -2}',  # bad override value
        '{"id": "seeded", "prompt": "The lazy dog", "temperature": 0.9, "seed": 11, "stop": ["zz"]}',
        'nope',
    ]) + "\n")
    summary, results = run_file(engine, src, tmp_path / "out.jsonl")
    by_id = {r["id"]: r for r in results}
    assert len(results) == 6 and summary.ok == 3 and summary.failed == 3 and summary.total == 6
    assert by_id[3]["error"].startswith("line 3: prompt (") and "exceeds the model's context of 128" in by_id[3]["error"]
    assert by_id["hot"]["error"] == "line 4: temperature must be >= 0, got -2"
    assert by_id[6]["error"].startswith("line 6: malformed JSON")
    assert set(by_id["chat"]) == {"id", "text", "token_ids", "prompt_tokens", "finish_reason", "prompt_hash"}
    # Each row equals its single-prompt run with the same settings.
    cases = {"chat": ([{"role": "user", "content": "Hello world"}], Request(max_new_tokens=8)),
             "msgs": ([{"role": "user", "content": "How are you today?"}], Request(max_new_tokens=5)),
             "seeded": ([{"role": "user", "content": "The lazy dog"}],
                        Request(max_new_tokens=8, sampling=SamplingParams(temperature=0.9), seed=11, stop=("zz",)))}
    for rid, (messages, req) in cases.items():
        ids = engine.chat_ids(messages)
        single = engine.generate(ids, req)
        got = by_id[rid]
        assert (got["token_ids"], got["text"], got["finish_reason"], got["prompt_tokens"]) == (
            single.token_ids, single.text, single.reason, len(ids))
    assert len(by_id["msgs"]["token_ids"]) <= 5


def test_system_raw_and_logprobs_defaults(engine, tmp_path):
    src = write(tmp_path / "in.jsonl", '{"id": 1, "prompt": "Hello"}\n{"id": 2, "prompt": "Hi", "system": "s2"}\n'
                                       '{"id": 3, "messages": [{"role": "user", "content": "Hey"}]}\n')
    defaults = BatchDefaults.of(max_new_tokens=4, system="be kind", logprobs=True)
    _, results = run_file(engine, src, tmp_path / "out.jsonl", defaults)
    by_id = {r["id"]: r for r in results}
    sys_ids = engine.chat_ids([{"role": "system", "content": "be kind"}, {"role": "user", "content": "Hello"}])
    assert by_id[1]["prompt_tokens"] == len(sys_ids)
    assert by_id[1]["token_ids"] == engine.generate(sys_ids, Request(max_new_tokens=4)).token_ids
    s2 = engine.chat_ids([{"role": "system", "content": "s2"}, {"role": "user", "content": "Hi"}])
    assert by_id[2]["prompt_tokens"] == len(s2)
    s3 = engine.chat_ids([{"role": "system", "content": "be kind"}, {"role": "user", "content": "Hey"}])
    assert by_id[3]["prompt_tokens"] == len(s3)
    assert all(len(r["logprobs"]) == len(r["token_ids"]) and all(lp <= 0 for lp in r["logprobs"]) for r in results)

    raw = BatchDefaults.of(max_new_tokens=4, raw=True)
    _, results = run_file(engine, src, tmp_path / "raw.jsonl", raw)
    by_id = {r["id"]: r for r in results}
    assert by_id[1]["prompt_tokens"] == len(engine.raw_ids("Hello"))
    assert by_id[1]["token_ids"] == engine.generate(engine.raw_ids("Hello"), Request(max_new_tokens=4)).token_ids
    assert by_id[2]["error"] == "line 2: a system message needs the chat template; it cannot be used with a raw prompt"
    assert by_id[3]["prompt_tokens"] == len(engine.chat_ids([{"role": "user", "content": "Hey"}]))


def test_resume_skips_finished_ids_and_retries_failed_ones(engine, tmp_path):
    lines = [json.dumps({"id": f"r{i}", "prompt": f"prompt number {i}"}) for i in range(6)]
    src = write(tmp_path / "in.jsonl", "\n".join(lines) + "\n")
    full_summary, full = run_file(engine, src, tmp_path / "full.jsonl")
    assert full_summary.ok == 6
    expected = {r["id"]: r for r in full}
    # An interrupted run: r1 and r4 finished, r2 failed, and the last line was cut mid-write.
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(expected["r1"]) + "\n" + json.dumps(expected["r4"]) + "\n"
                   + json.dumps({"id": "r2", "error": "line 3: something transient"}) + "\n"
                   + json.dumps(expected["r0"])[:25], encoding="utf-8")
    done, _ = prepare_output(out, resume=True, rows=read_rows(src))
    assert set(done) == {("str", "r1"), ("str", "r4")}
    summary, results = run_file(engine, src, out, resume=True)
    assert summary.skipped == 2 and summary.ok == 4 and summary.failed == 0
    ok = [r for r in results if "error" not in r]
    assert len(results) == 6  # r2's old error row went: one row per id
    assert sorted(r["id"] for r in ok) == [f"r{i}" for i in range(6)]
    assert {r["id"]: r for r in ok} == expected
    # Resuming a complete output does nothing.
    summary, again = run_file(engine, src, out, resume=True)
    assert summary.total == 0 and summary.skipped == 6 and again == results
    # Without --resume the output is replaced, with --overwrite only.
    with pytest.raises(UsageError, match="already holds results"):
        run_file(engine, src, out)
    summary, fresh = run_file(engine, src, out, overwrite=True)
    assert summary.ok == 6 and len(fresh) == 6


def test_generate_many_python_api(engine):
    prompts = ["Hello world", {"id": "m", "messages": [{"role": "user", "content": "Hi"}], "max_new_tokens": 3},
               {"prompt": ""}, {"nothing": 1}, "The quick brown fox"]
    results = generate_many(engine, prompts, max_new_tokens=6, batch_size=2)
    assert [r["id"] for r in results] == [0, "m", 2, 3, 4]
    for i in (0, 4):
        ids = engine.chat_ids([{"role": "user", "content": prompts[i]}])
        assert results[i]["token_ids"] == engine.generate(ids, Request(max_new_tokens=6)).token_ids
    assert len(results[1]["token_ids"]) <= 3
    assert results[3]["error"] == "prompt 3: has neither 'prompt' nor 'messages'"
    raw = generate_many(engine, ["", "abc"], raw=True, max_new_tokens=2)
    assert "error" not in raw[0] or "empty" in raw[0]["error"]
    assert raw[1]["token_ids"] == engine.generate(engine.raw_ids("abc"), Request(max_new_tokens=2)).token_ids


def test_example_script_runs(chat_dir):
    proc = subprocess.run([sys.executable, str(ROOT / "examples" / "batch_generate.py"), str(chat_dir)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    lines = jsonl(proc.stdout)
    assert len(lines) >= 3 and all({"id", "text", "finish_reason"} <= set(r) for r in lines)


# -- the CLI ---------------------------------------------------------------------------------------------------


runner = CliRunner()


def invoke(*args, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


def cli_run(*args, input: str | None = None):
    """llamacli in a fresh process, for real exit codes and the stdout/stderr split."""
    return subprocess.run([sys.executable, "-m", "llamacli", *map(str, args)], capture_output=True, text=True,
                          input=input, timeout=300, cwd=ROOT)


def test_cli_batch_file_to_file_with_a_bad_row(engine, chat_dir, tmp_path):
    src = write(tmp_path / "in.jsonl", '{"id": "a", "prompt": "Hello world"}\n{"id": "b", "prompt": 5}\n'
                                       '{"prompt": "The quick brown fox", "max_new_tokens": 3}\n')
    out = tmp_path / "out.jsonl"
    result = invoke("generate", "--model", chat_dir, "--prompts-file", src, "--output", out, "-n", "6",
                    "--batch-size", "2", "--logprobs")
    assert result.exit_code == 1, result.stderr
    assert "error: line 2: 'prompt' must be a string, got int (id 'b')" in result.stderr
    assert "batch: 3 rows written to " in result.stderr and "(2 ok, 1 failed)" in result.stderr
    assert result.stdout == ""
    by_id = {r["id"]: r for r in jsonl(out.read_text(encoding="utf-8"))}
    for rid, text, n in (("a", "Hello world", 6), (3, "The quick brown fox", 3)):
        single = engine.generate(engine.chat_ids([{"role": "user", "content": text}]),
                                 Request(max_new_tokens=n, logprobs=True))
        assert by_id[rid]["token_ids"] == single.token_ids and by_id[rid]["text"] == single.text
        assert by_id[rid]["logprobs"] == pytest.approx(single.logprobs, abs=1e-5)


def test_cli_stdin_plain_text_to_stdout_with_defaults(engine, chat_dir):
    result = invoke("generate", "--model", chat_dir, "--prompts-file", "-", "-n", "4", "--raw",
                    "--temperature", "0.8", "--seed", "5", input="Hello world\n\nHow are you today?\n")
    assert result.exit_code == 0, result.stderr
    rows = jsonl(result.stdout)
    assert [r["id"] for r in sorted(rows, key=lambda r: r["id"])] == [1, 3]
    req = Request(max_new_tokens=4, sampling=SamplingParams(temperature=0.8), seed=5)
    for r in rows:
        text = {1: "Hello world", 3: "How are you today?"}[r["id"]]
        assert r["token_ids"] == engine.generate(engine.raw_ids(text), req).token_ids
    assert "batch: 2 rows written to stdout (2 ok, 0 failed)" in result.stderr


def test_cli_default_max_new_tokens_is_capped_to_each_rows_context(chat_dir, tmp_path):
    long_prompt = "Numbers: 0 1 2 3 12 123 1234 " * 6
    src = write(tmp_path / "in.txt", long_prompt + "\n")
    result = invoke("generate", "--model", chat_dir, "--prompts-file", src, "--raw", "--ignore-eos")
    assert result.exit_code == 0, result.stderr
    (row,) = jsonl(result.stdout)
    assert row["prompt_tokens"] + len(row["token_ids"]) == 128 and row["finish_reason"] == "length"


def test_cli_resume_generates_only_the_missing_rows(chat_dir, tmp_path):
    src = write(tmp_path / "in.jsonl", "".join(json.dumps({"id": f"q{i}", "prompt": f"question {i}"}) + "\n"
                                               for i in range(3)))
    out = tmp_path / "out.jsonl"
    first = invoke("generate", "--model", chat_dir, "--prompts-file", src, "-o", out, "-n", "3")
    assert first.exit_code == 0, first.stderr
    before = out.read_text(encoding="utf-8")
    with open(src, "a", encoding="utf-8") as f:
        f.write(json.dumps({"id": "q3", "prompt": "question 3"}) + "\n" + '{"prompt": "question 4"}\n')
    second = invoke("generate", "--model", chat_dir, "--prompts-file", src, "-o", out, "-n", "3", "--resume")
    assert second.exit_code == 0, second.stderr
    assert "3 skipped (already in the output)" in second.stderr
    after = out.read_text(encoding="utf-8")
    assert after.startswith(before)
    assert sorted(str(r["id"]) for r in jsonl(after)) == ["5", "q0", "q1", "q2", "q3"]


@pytest.mark.parametrize("args, fragment", [
    (["--prompts-file", "{tmp}/missing.jsonl"], "prompts file not found"),
    (["--prompts-file", "{src}", "-o", "{tmp}/no/dir/out.jsonl"], "does not exist"),
    (["--prompts-file", "{src}", "-o", "{tmp}"], "output path is a directory"),
])
def test_cli_bad_input_or_output_fails_before_the_model_loads(args, fragment, tmp_path):
    src = write(tmp_path / "in.jsonl", '{"prompt": "hi"}\n')
    args = [a.format(tmp=tmp_path, src=src) for a in args]
    # The model does not exist: the error must come from the batch files, checked first.
    result = invoke("generate", "--model", tmp_path / "no-such-model", *args)
    assert result.exit_code == 1
    assert fragment in result.stderr and "no-such-model" not in result.stderr


def test_cli_batch_usage_errors(chat_dir, tmp_path):
    src = write(tmp_path / "in.txt", "hi\n")
    result = invoke("generate", "--model", chat_dir, "--prompts-file", src, "--raw", "--system", "s")
    assert result.exit_code == 2 and "--system needs the chat template" in result.stderr
    result = invoke("generate", "--model", chat_dir, "--prompts-file", src, "--resume")
    assert result.exit_code == 2 and "--resume needs an --output file" in result.stderr


def test_cli_exit_codes_in_a_subprocess(chat_dir, tmp_path):
    good = write(tmp_path / "good.jsonl", '{"prompt": "Hello"}\n{"prompt": "World"}\n')
    proc = cli_run("generate", "--model", chat_dir, "--prompts-file", good, "-n", "3")
    assert proc.returncode == 0, proc.stderr
    assert len(jsonl(proc.stdout)) == 2 and "(2 ok, 0 failed)" in proc.stderr
    bad = write(tmp_path / "bad.jsonl", '{"prompt": "Hello"}\n{"oops": true}\n')
    out = tmp_path / "out.jsonl"
    proc = cli_run("generate", "--model", chat_dir, "--prompts-file", bad, "-o", out, "-n", "3")
    assert proc.returncode == 1
    assert "error: line 2: has neither 'prompt' nor 'messages' (id 2)" in proc.stderr and proc.stdout == ""
    rows = {r["id"]: r for r in jsonl(out.read_text(encoding="utf-8"))}
    assert rows[2] == {"id": 2, "error": "line 2: has neither 'prompt' nor 'messages'"}
    assert len(rows[1]["token_ids"]) <= 3


# -- SmolLM2 -------------------------------------------------------------------------------------------------


def near_tie_gap(engine: Engine, ids: list[int]) -> float:
    """Top-1 minus top-2 logit of the next token after ids, from a plain one-row forward."""
    with torch.inference_mode():
        logits = engine.model(torch.tensor([ids]))[0, -1].float()
    top = torch.topk(logits, 2).values
    return float(top[0] - top[1])


@pytest.mark.slow
def test_smollm2_batch_equals_single_up_to_near_ties(smollm2_dir):
    engine = Engine.load(smollm2_dir, dtype="float32", device="cpu")
    questions = ["What is the capital of France?", "Write a haiku about rain.",
                 "Explain photosynthesis to a child in two sentences. " * 3, "List three prime numbers.",
                 "Translate 'good morning' into Spanish.", "Why is the sky blue? " * 6,
                 "Give me a name for a cat.", "What is 12 times 12?", "Describe a lighthouse at night. " * 10,
                 "Tell me a fun fact about octopuses."]
    req = Request(max_new_tokens=24)
    items = [(i, engine.chat_ids([{"role": "user", "content": q}]), req) for i, q in enumerate(questions)]
    batch = dict(engine.stream_batch(items, batch_size=4))
    divergences = []
    for key, ids, _ in items:
        single = engine.generate(ids, req)
        b = batch[key]
        if b.token_ids == single.token_ids:
            assert b.text == single.text and b.reason == single.reason
            continue
        at = next(i for i, (x, y) in enumerate(zip(b.token_ids, single.token_ids)) if x != y)
        gap = near_tie_gap(engine, ids + single.token_ids[:at])
        divergences.append((key, at, gap))
        assert gap < 1e-4, f"row {key} diverges at token {at} where the top-2 logits differ by {gap:.2e}"
    if divergences:
        warnings.warn(f"batch vs single diverged at near-ties (row, token, top-2 gap): {divergences}")
    print(f"SmolLM2 batch vs single: {len(items) - len(divergences)}/{len(items)} rows identical; "
          f"near-tie divergences: {divergences}")


def test_dynamic_rope_rows_past_the_trained_length_do_not_depend_on_their_batch_mates(tmp_path):
    """Dynamic NTK rotates by each sequence's own length: a short row decoding beside a row already past the
    trained context gets the tokens it gets alone (issue 15: it diverged at its 4th token)."""
    from tests.conftest import write_tiny_checkpoint
    from llamacli.weights import load_model

    model_dir = write_tiny_checkpoint(tmp_path / "dyn", max_position_embeddings=24,
                                      rope_scaling={"rope_type": "dynamic", "factor": 4.0})
    for runtime in (True, False):
        dyn = Engine(load_model(model_dir, dtype="float32", device="cpu", runtime=runtime), None, None)
        items = [(0, [5, 6, 7], Request(max_new_tokens=30, ignore_eos=True)),
                 (1, list(range(30, 52)), Request(max_new_tokens=12, ignore_eos=True))]
        results = dict(dyn.stream_batch(items, 2))
        for key, ids, req in items:
            assert results[key].token_ids == dyn.generate(ids, req).token_ids, (runtime, key)

# -- the prefix cache across requests -------------------------------------------------------------------------

SYSTEM = list(range(100, 140))  # a 40-token "system prompt"


def run_one(sched, ids, req):
    """Add one request to a scheduler and step it until that request finishes; its Finished."""
    from llamacli.generation import Finished

    sid = sched.add(ids, req)
    while True:
        for s, e in sched.step():
            if s == sid and isinstance(e, Finished):
                return e


def run_all(sched):
    """Step until idle; {id: Finished}."""
    from llamacli.generation import Finished

    done = {}
    while not sched.idle:
        done.update((sid, e) for sid, e in sched.step() if isinstance(e, Finished))
    return done


def test_prefix_index_is_pure_bookkeeping():
    from llamacli.generation.prefix_cache import PrefixIndex, common_prefix

    a = list(range(50))
    assert [common_prefix(a, b, lim) for b, lim in [(a, 99), (a, 10), (a[:7] + [0], 99), ([], 9), (a, 0), (a, -1)]] \
        == [50, 10, 7, 0, 0, 0]
    index = PrefixIndex(min_tokens=4)
    index.keep(3, a[:20])
    index.keep(1, a[:30])
    index.keep(0, a[:3])  # too short to keep
    assert len(index) == 2 and index.held(0) == [] and index.eviction_order([0, 1, 2, 3]) == [0, 2, 3, 1]
    ids = a[:25] + [99]
    assert index.best(ids, {}, len(ids) - 1) == (1, 25)
    assert index.best(a[:18] + [99], {}, 18) == (3, 18)  # a tie: the least recently freed slot
    assert index.best(ids, {5: a[:40]}, len(ids) - 1) == (1, 25)  # a tie: the freed slot before a running row
    assert index.best(ids, {5: a[:40]}, 3) == (None, 0)  # under the minimum
    index.touch(3)
    assert index.eviction_order([1, 3]) == [1, 3]
    index.swap(1, 2)
    assert index.held(2) == a[:30] and index.held(1) == []
    index.drop(2)
    assert index.best(ids, {}, 25) == (3, 20)
    dyn = PrefixIndex(min_tokens=4, dynamic_context=24)
    assert dyn.tokens(a[:20], [7, 8, 9], 22) == a[:20] + [7, 8] and dyn.tokens(a[:25], [7], 25) == []
    dyn.keep(0, a[:20])
    assert dyn.best(a[:24], {}, 23) == (0, 20) and dyn.best(a[:25], {}, 24) == (None, 0)


def test_which_prompts_admitted_together_wait_for_another_ones_row():
    """`PrefixIndex.waiting`: a prompt waits when an earlier one that goes in now shares min_tokens more of it than
    the rows serve already, unless it waited before; not past a dynamic-NTK context. `shared_by_all`: a job's."""
    from llamacli.generation.prefix_cache import PrefixIndex, shared_by_all

    a = list(range(50))
    index = PrefixIndex(min_tokens=4)
    burst = [a[:10] + [90], a[:10] + [91], [7] * 12, a[:12] + [92], a[:3] + [93]]
    assert index.waiting(burst, [0] * 5, [True] * 5) == [1, 3]  # 4 shares 3 tokens: too few
    assert index.waiting(burst, [0, 7, 0, 0, 0], [True] * 5) == [3]  # 1 gains 3 on what the rows give it
    assert index.waiting(burst, [0] * 5, [True, False, True, True, True]) == [3]  # 1 waited once already
    assert index.waiting([a[:10] + [90], a[:3] + [91], a[:10] + [92]], [0] * 3, [True] * 3) == [2]  # 0 leads
    assert PrefixIndex(min_tokens=4, dynamic_context=11).waiting(burst, [0] * 5, [True] * 5) == [1]  # 3: 13 long
    assert PrefixIndex(min_tokens=4, dynamic_context=11).waiting([a[:12], a[:10]], [0, 0], [True] * 2) == []
    assert PrefixIndex(min_tokens=4).waiting([a[:10], a[:10] + [1]], [0, 0], [True] * 2) == [1]
    assert shared_by_all([a[:20], a[:18] + [0], a[:30]], 4) == 18 and shared_by_all([a[:5], a[:5]], 4) == 4
    assert shared_by_all([a[:20]], 4) == shared_by_all([a[:3] + [1], a[:3] + [2]], 4) == 0
    assert shared_by_all([a[:20], a[:30]], 4, dynamic_context=25) == 0


def test_a_freed_rows_cache_serves_the_next_prompt_that_starts_like_it(engine):
    """Requests one after another: the same prompt again, a conversation resent with its answer, another
    question after the same system prompt. Each prefills only what the freed row does not hold (always its last
    token), and gets exactly the tokens of a run with the prefix cache off and of a single run."""
    from llamacli.generation import Scheduler

    req = Request(max_new_tokens=6, ignore_eos=True)
    on, off = Scheduler(engine, 2, 128), Scheduler(engine, 2, 128, prefix_cache=False)
    a_ids = SYSTEM + [5, 6, 7]
    first = run_one(on, a_ids, req)
    assert first.stats.prefill_tokens == len(a_ids) and on.cached_tokens == 0
    again = run_one(on, a_ids, req)
    assert again.stats.prefill_tokens == 1 and again.token_ids == first.token_ids
    turn = a_ids + first.token_ids + [9, 10]  # the answer's last token was never fed: it is prefilled again
    asks = [(turn, len(a_ids) + len(first.token_ids) - 1), (SYSTEM + [8], len(SYSTEM)),
            (list(range(100, 115)) + [9, 9, 9], 0)]  # 15 common tokens: too few to reuse
    for ids, cached in asks:
        got, plain = run_one(on, ids, req), run_one(off, ids, req)
        assert got.stats.prompt_tokens - got.stats.prefill_tokens == cached, ids
        assert plain.stats.prefill_tokens == len(ids)
        assert got.token_ids == plain.token_ids == engine.generate(ids, req).token_ids
        assert got.text == plain.text
    assert on.cached_tokens == len(a_ids) - 1 + sum(c for _, c in asks) and off.cached_tokens == 0


def test_a_running_or_cancelled_rows_keys_are_copied_for_a_prompt_that_starts_like_it(engine):
    from llamacli.generation import Scheduler

    sched = Scheduler(engine, 3, 128)
    long_req = Request(max_new_tokens=30, ignore_eos=True)
    running = sched.add(SYSTEM + [5], long_req)
    sched.step()
    sched.step()
    other = sched.add(SYSTEM + [6, 7], Request(max_new_tokens=8, ignore_eos=True))
    sched.step()  # the new row's first 40 positions are copied from the running row's
    sched.cancel(running)
    sched.step()
    late = sched.add(SYSTEM + [9], Request(max_new_tokens=5, ignore_eos=True))  # the cancelled row's cache serves
    done = run_all(sched)
    assert sched.cached_tokens == 2 * len(SYSTEM)
    for sid, ids, n in [(other, SYSTEM + [6, 7], 8), (late, SYSTEM + [9], 5)]:
        assert done[sid].stats.prefill_tokens == len(ids) - len(SYSTEM)
        assert done[sid].token_ids == engine.generate(ids, Request(max_new_tokens=n, ignore_eos=True)).token_ids


def test_freed_rows_are_overwritten_least_recently_freed_first_and_survive_compaction(engine):
    from llamacli.generation import Scheduler

    sched = Scheduler(engine, 3, 128)
    p_ids, q_ids, r_ids = SYSTEM + [5], list(range(300, 330)) + [6], list(range(200, 230)) + [7]
    short, long_req = Request(max_new_tokens=2, ignore_eos=True), Request(max_new_tokens=12, ignore_eos=True)
    sched.add(r_ids, long_req)  # slot 0
    sched.add(p_ids, short)  # slot 1: freed first, then the row in slot 2 moves into it (the rows swap)
    sched.add(q_ids, long_req)  # slot 2
    run_all(sched)
    # p's row survived the move (its slot is the least recently freed: p goes back there); then each prompt
    # without a donor overwrites the least recently freed row: r's, then (after q reused its own) p's.
    unrelated = list(range(240, 270))
    for ids, cached in [(p_ids, 40), (unrelated, 0), (q_ids, 30), (r_ids, 0), (p_ids, 0)]:
        got = run_one(sched, ids, short)
        assert got.stats.prompt_tokens - got.stats.prefill_tokens == cached, ids
        assert got.token_ids == engine.generate(ids, short).token_ids


def test_a_donor_row_overwritten_in_the_same_step_is_copied_first(engine):
    """Two prompts admitted together: y's donor is b's freed row, x (no donor) takes b's slot. y's positions are
    copied (into the least recently freed slot, a's) before x's prefill overwrites b's row."""
    from llamacli.generation import Scheduler

    sched = Scheduler(engine, 2, 128)
    req = Request(max_new_tokens=4, ignore_eos=True)
    b_ids = list(range(300, 330)) + [6]
    run_one(sched, SYSTEM + [5], req)  # slot 0
    run_one(sched, b_ids, req)  # slot 1 (it held nothing)
    x_ids, y_ids = list(range(200, 230)), b_ids[:30] + [9, 9]
    x, y = sched.add(x_ids, req), sched.add(y_ids, req)
    done = run_all(sched)
    assert sched.steps == 2 * 4 + 4  # x and y ran together
    assert done[y].stats.prefill_tokens == 2 and done[x].stats.prefill_tokens == len(x_ids)
    assert done[y].token_ids == engine.generate(y_ids, req).token_ids
    assert done[x].token_ids == engine.generate(x_ids, req).token_ids


def test_n_choices_admitted_into_a_freed_rows_slot_each_equal_their_single_run(engine):
    """The prompt's donor is the slot freed first, which comes after the others: the choices' slots come
    before their leader's, and still copy its prefill and logits."""
    from llamacli.generation import Scheduler

    sched = Scheduler(engine, 3, 128)
    sched.add([5, 6, 7], Request(max_new_tokens=6, ignore_eos=True))
    sched.add([8, 9], Request(max_new_tokens=6, ignore_eos=True))
    sched.add(SYSTEM + [10], Request(max_new_tokens=2, ignore_eos=True))
    run_all(sched)
    ids = SYSTEM + [11, 12]
    reqs = [Request(max_new_tokens=8, sampling=SamplingParams(temperature=1.2), seed=s) for s in (1, 2, 3)]
    sids = sched.add_choices(ids, reqs)
    done = run_all(sched)
    assert [done[s].stats.prefill_tokens for s in sids] == [2, 0, 0]
    assert [done[s].token_ids for s in sids] == [engine.generate(ids, r).token_ids for r in reqs]


def record_prefills(engine, monkeypatch) -> list[list[tuple[int, int]]]:
    """Filled as the model runs: per forward, (start position, tokens) of each prompt part (more than one token)
    it prefills, in slot order."""
    seen = []
    forward_last = engine.model.forward_last

    def record(parts):
        seen.append([(start, t.shape[1]) for t, start, _ in parts if t.shape[1] > 1])
        return forward_last(parts)

    monkeypatch.setattr(engine.model, "forward_last", record)
    return seen


@pytest.mark.parametrize("prefix_cache", [True, False])
def test_a_burst_behind_one_system_prompt_prefills_it_once(engine, monkeypatch, prefix_cache):
    """Requests that arrive together behind the same system prompt, none held by a row yet: the first is prefilled
    whole, the others wait one step and copy its 40 positions; a prompt that shares nothing goes in at once. With
    the prefix cache off, all four are prefilled whole in the first step. Each equals its single run."""
    from llamacli.generation import Scheduler

    sched = Scheduler(engine, 4, 128, prefix_cache=prefix_cache)
    req = Request(max_new_tokens=6, ignore_eos=True)
    burst = [SYSTEM + [5, 6, 7], list(range(200, 225)), SYSTEM + [8, 9], SYSTEM + list(range(30, 45))]
    sids = [sched.add(ids, req) for ids in burst]
    seen = record_prefills(engine, monkeypatch)
    done = run_all(sched)
    monkeypatch.undo()
    whole = [(0, len(ids)) for ids in burst]
    cached = [0, 0, 40, 40] if prefix_cache else [0, 0, 0, 0]
    assert seen[:2] == ([whole[:2], [(40, 2), (40, 15)]] if prefix_cache else [whole, []])
    assert not any(seen[2:]) and sched.max_active == 4
    assert sched.cached_tokens == sum(cached)
    for sid, ids, n in zip(sids, burst, cached):
        assert done[sid].stats.prefill_tokens == len(ids) - n
        assert done[sid].token_ids == engine.generate(ids, req).token_ids


def test_prompts_held_for_a_same_step_prefix_keep_their_rows_and_wait_once(engine, monkeypatch):
    """Four rows, five prompts: b and c wait for a's row, u1 goes in beside a, u2 finds no row (b's and c's are
    kept for them). At the next step b and c both go in, though c shares 20 more tokens with b: a prompt waits once
    at most. Held prompts still count in the step's prefill budget: with room for a's and b's prompts only, u1
    waits for the next step as it did before (b goes in then, beside it)."""
    from llamacli.generation import Scheduler

    req = Request(max_new_tokens=6, ignore_eos=True)
    a, b, c = SYSTEM + [5, 6], SYSTEM + list(range(300, 320)) + [7, 8], SYSTEM + list(range(300, 320)) + [9, 9]
    u1, u2 = list(range(200, 230)), list(range(230, 260))
    sched = Scheduler(engine, 4, 128)
    sids = [sched.add(ids, req) for ids in (a, b, u1, c, u2)]
    seen = record_prefills(engine, monkeypatch)
    sched.step()
    assert sched.active == 2 and [row.sid for row in sched.waiting] == [sids[1], sids[3], sids[4]]
    done = run_all(sched)
    monkeypatch.undo()
    assert seen[:2] == [[(0, len(a)), (0, len(u1))], [(40, 22), (40, 22)]]
    assert [(0, len(u2))] in seen[2:]
    for sid, ids, n in zip(sids, (a, b, u1, c, u2), (0, 40, 0, 40, 0)):
        assert done[sid].stats.prefill_tokens == len(ids) - n
        assert done[sid].token_ids == engine.generate(ids, req).token_ids

    sched = Scheduler(engine, 4, 128, prefill_budget=len(a) + len(b))
    for ids in (a, b, u1):
        sched.add(ids, req)
    seen = record_prefills(engine, monkeypatch)
    run_all(sched)
    monkeypatch.undo()
    assert seen[:2] == [[(0, len(a))], [(40, 22), (0, len(u1))]]


def test_n_choices_behind_a_same_step_prefix_wait_together_and_copy_it(engine):
    from llamacli.generation import Scheduler

    sched = Scheduler(engine, 4, 128)
    first = sched.add(SYSTEM + [5, 6], Request(max_new_tokens=4, ignore_eos=True))
    ids = SYSTEM + [11, 12]
    reqs = [Request(max_new_tokens=8, sampling=SamplingParams(temperature=1.2), seed=s) for s in (1, 2, 3)]
    sids = sched.add_choices(ids, reqs)
    sched.step()
    assert sched.active == 1 and sched.queued == 3
    done = run_all(sched)
    assert done[first].stats.prefill_tokens == len(SYSTEM) + 2
    assert [done[s].stats.prefill_tokens for s in sids] == [2, 0, 0]
    assert [done[s].token_ids for s in sids] == [engine.generate(ids, r).token_ids for r in reqs]


# -- what the server needs: penalties, top logprobs, n choices of one prompt -----------------------------------


def test_frequency_penalty_keeps_greedy_off_repeats(engine):
    """A strong frequency penalty never repeats a token within a run; greedy without one does (tiny model)."""
    prompt = [5, 6, 7]
    plain = engine.generate(prompt, Request(max_new_tokens=30, ignore_eos=True)).token_ids
    assert len(set(plain)) < len(plain)
    strong = SamplingParams(frequency_penalty=2.0, presence_penalty=2.0)
    penalised = engine.generate(prompt, Request(max_new_tokens=30, ignore_eos=True, sampling=strong)).token_ids
    assert penalised != plain
    # The same penalties in a batch (which skips the batched argmax for these rows) give the same tokens.
    batch = dict(engine.stream_batch([(0, prompt, Request(max_new_tokens=30, ignore_eos=True, sampling=strong)),
                                      (1, [9, 9], Request(max_new_tokens=10))], 2))
    assert batch[0].token_ids == penalised


def test_top_logprobs_are_the_k_most_likely_with_the_chosen_logprob(engine):
    done = engine.generate([3, 4, 5], Request(max_new_tokens=6, logprobs=True, top_logprobs=3, ignore_eos=True))
    assert len(done.top_logprobs) == len(done.token_ids) == 6
    for token, lp, top in zip(done.token_ids, done.logprobs, done.top_logprobs):
        assert len(top) == 3 and [v for _, v in top] == sorted((v for _, v in top), reverse=True)
        assert top[0] == (token, pytest.approx(lp))  # greedy: the chosen token is the most likely
    with pytest.raises(UsageError, match="top-logprobs needs logprobs"):
        Request(top_logprobs=2)
    with pytest.raises(UsageError, match=r"top-logprobs must be an integer in \[0, 20\]"):
        Request(logprobs=True, top_logprobs=21)


def test_n_choices_share_one_prefill_and_each_equals_its_single_run(engine):
    from llamacli.generation import Finished, Scheduler

    prompt = list(range(10, 40))
    reqs = [Request(max_new_tokens=12, sampling=SamplingParams(temperature=1.2), seed=s, ignore_eos=True)
            for s in (1, 2, 3)]
    singles = [engine.generate(prompt, r) for r in reqs]
    sched = Scheduler(engine, max_rows=4, max_positions=64)
    other = sched.add([7, 8, 9], Request(max_new_tokens=20, ignore_eos=True))  # running beside them
    sched.step()
    ids = sched.add_choices(prompt, reqs)
    results = {}
    while not sched.idle:
        results.update((sid, e) for sid, e in sched.step() if isinstance(e, Finished))
    for sid, single in zip(ids, singles):
        assert results[sid].token_ids == single.token_ids
        assert results[sid].text == single.text
    prefilled = [results[sid].stats.prefill_tokens for sid in ids]
    assert prefilled == [len(prompt), 0, 0]  # one prefill for the three
    assert other in results
    with pytest.raises(UsageError, match=r"n must be in \[1, 4\]"):
        sched.add_choices(prompt, reqs + reqs)


def test_cancelling_a_waiting_choice_keeps_the_others(engine):
    from llamacli.generation import Finished, Scheduler

    prompt = [11, 12, 13, 14]
    reqs = [Request(max_new_tokens=5, ignore_eos=True) for _ in range(3)]
    sched = Scheduler(engine, max_rows=3, max_positions=32)
    first, second, third = sched.add_choices(prompt, reqs)
    assert sched.queued == 3
    sched.cancel(first)
    results = {}
    while not sched.idle:
        results.update((sid, e) for sid, e in sched.step() if isinstance(e, Finished))
    assert results[first].reason == "cancelled" and results[first].token_ids == []
    single = engine.generate(prompt, reqs[0]).token_ids
    assert results[second].token_ids == results[third].token_ids == single
    assert results[second].stats.prefill_tokens == len(prompt) and results[third].stats.prefill_tokens == 0

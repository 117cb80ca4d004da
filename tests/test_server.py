"""`llamacli serve`: a real server on a loopback port (in-process uvicorn, and a `python -m llamacli serve`
subprocess) and the real `openai` client. The answers are checked against the engine run directly on the same
token ids: greedy text, seeded samples, log-probabilities, usage; and the HTTP contract: SSE framing, errors in
OpenAI's shape with their statuses, the bounded queue, disconnects freeing their slot, health after every error.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from llamacli.generation import Engine
from llamacli.prompts import encode_chat
from llamacli.request import Finished, Request, SamplingParams
from llamacli.server.app import bind, create_app, make_server
from llamacli.server.worker import Worker

ROOT = Path(__file__).resolve().parents[1]
KEY = "test-key"
NAME = "tiny"
CONTEXT = 128
HANG = 120  # seconds before a wait is declared hung (a guard against hanging, not a speed threshold)


class Served:
    """A running in-process server: its URL, worker, and clients."""

    def __init__(self, url: str, worker: Worker, server):
        self.url, self.worker, self.server = url, worker, server
        self.client = openai.OpenAI(base_url=url + "/v1", api_key=KEY, max_retries=0)
        self.http = httpx.Client(base_url=url, headers={"Authorization": f"Bearer {KEY}"}, timeout=HANG)

    def metric(self, name: str, labels: str = "") -> float:
        text = self.http.get("/metrics").text
        m = re.search(rf"^{name}{re.escape(labels)} (\S+)$", text, re.M)
        return float(m.group(1)) if m else 0.0


def start_server(load, **app_kw):
    """(worker, uvicorn server, its thread, an event set when the model is loaded, [url] once it is)."""
    worker = Worker(load, batch_size=4, max_queue=16, context=CONTEXT).start()
    app = create_app(worker, NAME, api_key=KEY, cors_origins=("http://allowed.test",), **app_kw)
    urls: list[str] = []
    ready = threading.Event()
    server = make_server(app, worker, port=0, drain_s=2, on_ready=lambda url: (urls.append(url), ready.set()))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [bind("127.0.0.1", 0)]}, daemon=True)
    thread.start()
    return worker, server, thread, ready, urls


def stop_server(server, thread, worker) -> None:
    server.should_exit = True
    thread.join(HANG)
    worker.shutdown(1)


@pytest.fixture(scope="module")
def ref(tiny_chat_dir) -> Engine:
    """The engine run directly: what every answer is compared with."""
    return Engine.load(tiny_chat_dir, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def served(tiny_chat_dir):
    worker, server, thread, ready, urls = start_server(
        lambda: Engine.load(tiny_chat_dir, dtype="float32", device="cpu"), max_body_bytes=64 * 1024)
    assert ready.wait(HANG)
    yield Served(urls[0], worker, server)
    stop_server(server, thread, worker)


def chat_ids(ref: Engine, text: str) -> list[int]:
    return encode_chat(ref.tokenizer, ref.chat_template, [{"role": "user", "content": text}])


def run(ref: Engine, ids: list[int], max_new: int, **kw) -> Finished:
    return ref.generate(ids, Request(max_new_tokens=max_new, **kw))


def assert_healthy(s: Served) -> None:
    assert s.http.get("/health").status_code == 200
    r = s.client.completions.create(model=NAME, prompt="ok", max_tokens=2)
    assert r.choices[0].finish_reason in ("stop", "length")


def sse_events(response: httpx.Response) -> list:
    """The data lines of an SSE stream, checking the framing: `data: ...` lines each followed by a blank line."""
    raw = response.read().decode()
    assert raw.endswith("data: [DONE]\n\n")
    blocks = raw.split("\n\n")[:-1]
    assert all(b.startswith("data: ") and "\n" not in b for b in blocks)
    return [b[6:] if b == "data: [DONE]" else json.loads(b[6:]) for b in blocks]


# -- answers -----------------------------------------------------------------------------------------------------


def test_health_models_and_tokenize(served, ref):
    assert httpx.get(served.url + "/health").json() == {"status": "ok"}  # no key needed
    assert [m.id for m in served.client.models.list().data] == [NAME]
    ids = chat_ids(ref, "hi there")
    tok = served.http.post("/tokenize", json={"messages": [{"role": "user", "content": "hi there"}]}).json()
    assert tok["tokens"] == ids and tok["count"] == len(ids) and tok["max_model_len"] == CONTEXT
    text = served.http.post("/detokenize", json={"tokens": ids}).json()["prompt"]
    assert text == ref.tokenizer.decode(ids)


def test_chat_non_stream_and_stream_equal_the_engine(served, ref):
    messages = [{"role": "user", "content": "tell me about the moon"}]
    ids = chat_ids(ref, "tell me about the moon")
    want = run(ref, ids, 12)
    r = served.client.chat.completions.create(model=NAME, messages=messages, max_tokens=12)
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == NAME
    assert r.choices[0].message.content == want.text and r.choices[0].message.role == "assistant"
    assert r.choices[0].finish_reason == want.reason
    u = r.usage
    assert (u.prompt_tokens, u.completion_tokens, u.total_tokens) == (len(ids), len(want.token_ids),
                                                                      len(ids) + len(want.token_ids))
    assert u.prompt_tokens_details.cached_tokens == 0
    body = {"model": NAME, "messages": messages, "max_tokens": 12, "stream": True,
            "stream_options": {"include_usage": True}}
    with served.http.stream("POST", "/v1/chat/completions", json=body) as resp:
        assert resp.headers["content-type"].startswith("text/event-stream")
        events = sse_events(resp)
    chunks, usage_chunk = events[:-2], events[-2]
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"
    assert len({c["id"] for c in events[:-1]}) == 1 and chunks[0]["id"] != r.id
    assert all(c["object"] == "chat.completion.chunk" for c in events[:-1])
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"][0]["finish_reason"]]
    assert finishes == [want.reason] and chunks[-1]["choices"][0]["finish_reason"] == want.reason
    assert "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks) == want.text
    # The same prompt again: all but its last token come from the cache the first request left.
    assert usage_chunk["choices"] == [] and usage_chunk["usage"] == r.usage.model_dump(exclude_none=True) | {
        "prompt_tokens_details": {"cached_tokens": len(ids) - 1}}
    assert all(c["usage"] is None for c in chunks)
    # Without include_usage: no usage chunk, no usage key.
    with served.http.stream("POST", "/v1/chat/completions", json={**body, "stream_options": None}) as resp:
        plain = sse_events(resp)
    assert all("usage" not in c for c in plain[:-1]) and plain[-2]["choices"][0]["finish_reason"] == want.reason


def test_a_long_system_prompt_is_served_from_the_cache(served, ref):
    """Requests after the same system prompt (and a conversation resent with its answer) prefill only what the
    cache does not hold: usage says how much came from it, streamed or not, and the metric counts it; the text
    is the engine's, which recomputes everything."""
    from llamacli.generation.prefix_cache import common_prefix

    system = {"role": "system", "content": "You are a patient assistant."}
    first = [system, {"role": "user", "content": "a river?"}]
    ids1 = ref.chat_ids(first)
    r1 = served.client.chat.completions.create(model=NAME, messages=first, max_tokens=8)
    cached_before = served.metric("llamacli_prompt_tokens_cached_total")
    second = [system, {"role": "user", "content": "a lake?"}]
    ids2 = ref.chat_ids(second)
    shared = common_prefix(ids1, ids2, len(ids2) - 1)
    assert shared > 16
    r2 = served.client.chat.completions.create(model=NAME, messages=second, max_tokens=8)
    assert r2.usage.prompt_tokens_details.cached_tokens == shared
    assert r2.choices[0].message.content == run(ref, ids2, 8).text
    turn = [*first, {"role": "assistant", "content": r1.choices[0].message.content},
            {"role": "user", "content": "more"}]
    ids3 = ref.chat_ids(turn)
    body = {"model": NAME, "messages": turn, "max_tokens": 8, "stream": True, "stream_options": {"include_usage": True}}
    with served.http.stream("POST", "/v1/chat/completions", json=body) as resp:
        events = sse_events(resp)
    text = "".join(c["choices"][0]["delta"].get("content") or "" for c in events[:-2])
    cached = events[-2]["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert text == run(ref, ids3, 8).text
    assert cached >= common_prefix(ids1, ids3, len(ids3) - 1) > shared  # the first turn, at least
    assert served.metric("llamacli_prompt_tokens_cached_total") == cached_before + shared + cached


def test_completions_with_the_openai_client(served, ref):
    ids = ref.tokenizer.encode("Once upon a time", add_special_tokens=True)
    want = run(ref, ids, 10)
    r = served.client.completions.create(model=NAME, prompt="Once upon a time", max_tokens=10)
    assert r.id.startswith("cmpl-") and r.object == "text_completion"
    assert r.choices[0].text == want.text and r.usage.prompt_tokens == len(ids)
    stream = served.client.completions.create(model=NAME, prompt=ids, max_tokens=10, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks) == want.text
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == [want.reason]


def test_stop_strings_across_token_boundaries_never_leak(served, ref):
    ids = ref.tokenizer.encode("The river", add_special_tokens=True)
    pieces = [e.text for e in ref.stream(ids, Request(max_new_tokens=40, ignore_eos=True)) if hasattr(e, "token_id")]
    text = "".join(pieces)
    # A stop string made of the end of one token's text and the start of the next, first found there.
    ends = [sum(map(len, pieces[:k + 1])) for k in range(len(pieces))]
    stop = next(text[e - 2:e + 2] for e in ends[3:] if e + 2 <= len(text) and text.find(text[e - 2:e + 2]) == e - 2
                and text[e - 2:e + 2].isprintable())
    expected = text[:text.find(stop)]
    for stream in (False, True):
        r = served.client.completions.create(model=NAME, prompt=ids, max_tokens=40, stop=[stop, "\x00never"],
                                             stream=stream)
        if stream:
            chunks = list(r)
            got = "".join(c.choices[0].text for c in chunks)
            reasons = [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason]
        else:
            got, reasons = r.choices[0].text, [r.choices[0].finish_reason]
        assert got == expected and reasons == ["stop"]


def test_n_choices_each_equal_a_single_run_with_its_seed(served, ref):
    ids = chat_ids(ref, "pick a word")
    r = served.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "pick a word"}],
                                              max_tokens=8, n=3, temperature=1.3, seed=40)
    singles = [run(ref, ids, 8, sampling=SamplingParams(temperature=1.3), seed=40 + i) for i in range(3)]
    assert [c.index for c in r.choices] == [0, 1, 2]
    assert [c.message.content for c in r.choices] == [s.text for s in singles]
    assert len({s.text for s in singles}) > 1  # the seeds differ, so the choices do
    assert r.usage.prompt_tokens == len(ids)  # the prompt once, the completions summed
    assert r.usage.completion_tokens == sum(len(s.token_ids) for s in singles)
    # Streamed: per choice, the same text and exactly one finish_reason.
    stream = served.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "pick a word"}],
                                                   max_tokens=8, n=3, temperature=1.3, seed=40, stream=True)
    texts, finishes = ["", "", ""], [[], [], []]
    for c in stream:
        ch = c.choices[0]
        texts[ch.index] += ch.delta.content or ""
        if ch.finish_reason:
            finishes[ch.index].append(ch.finish_reason)
    assert texts == [s.text for s in singles] and finishes == [[s.reason] for s in singles]


def test_logprobs_and_top_logprobs(served, ref):
    ids = chat_ids(ref, "numbers")
    want = ref.generate(ids, Request(max_new_tokens=5, logprobs=True, top_logprobs=3))
    r = served.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "numbers"}],
                                              max_tokens=5, logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert [c.logprob for c in content] == pytest.approx(want.logprobs, abs=1e-5)
    for c, (token, top) in zip(content, zip(want.token_ids, want.top_logprobs)):
        assert c.token == ref.tokenizer.decode([token]) and bytes(c.bytes) == c.token.encode()
        assert [t.logprob for t in c.top_logprobs] == pytest.approx([v for _, v in top], abs=1e-5)
    comp = served.client.completions.create(model=NAME, prompt=ids, max_tokens=5, logprobs=2)
    assert comp.choices[0].logprobs.token_logprobs == pytest.approx(want.logprobs, abs=1e-5)
    assert all(len(t) <= 2 for t in comp.choices[0].logprobs.top_logprobs)


def test_seed_reproducible_and_stream_equals_non_stream(served):
    kw = dict(model=NAME, prompt="Seeds", max_tokens=10, temperature=1.5, top_p=0.9, seed=123)
    a, b = (served.client.completions.create(**kw).choices[0].text for _ in range(2))
    streamed = "".join(c.choices[0].text for c in served.client.completions.create(**kw, stream=True))
    other = served.client.completions.create(**{**kw, "seed": 124}).choices[0].text
    assert a == b == streamed and other != a


def test_penalties_change_the_greedy_answer(served, ref):
    ids = ref.tokenizer.encode("Again and again", add_special_tokens=True)
    plain = run(ref, ids, 20)
    assert len(set(plain.token_ids)) < len(plain.token_ids)  # greedy repeats itself on the tiny model
    r = served.client.completions.create(model=NAME, prompt=ids, max_tokens=20, frequency_penalty=2.0,
                                         presence_penalty=1.0)
    want = run(ref, ids, 20, sampling=SamplingParams(frequency_penalty=2.0, presence_penalty=1.0))
    assert r.choices[0].text == want.text != plain.text


def test_sixteen_concurrent_clients_equal_one_by_one(served, ref):
    asks = [(f"question {i}: " + "words " * (i % 5), 4 + i % 7) for i in range(16)]

    def ask(a):
        text, n = a
        return served.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": text}],
                                                     max_tokens=n).choices[0].message.content

    one_by_one = [ask(a) for a in asks]
    before = served.worker.scheduler.max_active
    served.worker.scheduler.max_active = 0
    with ThreadPoolExecutor(16) as pool:
        together = list(pool.map(ask, asks))
    assert together == one_by_one
    assert served.worker.scheduler.max_active > 1  # they did share the batch
    served.worker.scheduler.max_active = max(before, served.worker.scheduler.max_active)
    assert one_by_one == [run(ref, chat_ids(ref, t), n).text for t, n in asks]


# -- errors ------------------------------------------------------------------------------------------------------


def error_of(resp: httpx.Response) -> dict:
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_unknown_field_is_a_400_naming_it(served):
    with pytest.raises(openai.BadRequestError) as e:
        served.client.chat.completions.create(model=NAME, messages=[{"role": "user", "content": "x"}],
                                              tools=[{"type": "function", "function": {"name": "f"}}])
    assert e.value.status_code == 400 and "tools" in e.value.message and e.value.body["param"] == "tools"
    with pytest.raises(openai.BadRequestError, match="echo"):
        served.client.completions.create(model=NAME, prompt="x", echo=True)
    err = error_of(served.http.post("/v1/chat/completions", json={"model": NAME, "messages": [
        {"role": "user", "content": "x", "extra": 1}]}))
    assert err["param"] == "messages.0.extra"
    assert_healthy(served)


def test_bad_values_and_malformed_json_are_400(served):
    resp = served.http.post("/v1/chat/completions", content=b'{"model": "tiny", "messages": [')
    assert resp.status_code == 400 and error_of(resp)["code"] == "invalid_json"
    for body, param in [({"model": NAME, "messages": [{"role": "user", "content": "x"}], "temperature": -1},
                         "temperature"),
                        ({"model": NAME, "messages": []}, "messages"),
                        ({"model": NAME, "prompt": "x", "n": 5}, "n"),
                        ({"model": NAME, "prompt": "x", "stop": [""]}, "stop"),
                        ({"model": NAME, "prompt": "x", "stream_options": {"include_usage": True}},
                         "stream_options"),
                        ({"model": NAME, "prompt": [10**6]}, "prompt"),
                        ({"prompt": "x"}, "model")]:
        path = "/v1/chat/completions" if "messages" in body else "/v1/completions"
        resp = served.http.post(path, json=body)
        assert resp.status_code == 400, body
        assert error_of(resp)["param"] == param, body
    assert_healthy(served)


def test_context_overflow_is_a_400_with_both_numbers(served, ref):
    ids = ref.tokenizer.encode("hello", add_special_tokens=True)
    with pytest.raises(openai.BadRequestError) as e:
        served.client.completions.create(model=NAME, prompt="hello", max_tokens=200)
    msg = e.value.message
    assert f"prompt ({len(ids)} tokens)" in msg and "(200)" in msg and f"{CONTEXT} tokens" in msg
    assert e.value.body["code"] == "context_length_exceeded"
    long_prompt = list(range(5, 5 + CONTEXT))
    with pytest.raises(openai.BadRequestError, match=f"prompt \\({CONTEXT} tokens\\)"):
        served.client.completions.create(model=NAME, prompt=long_prompt)
    assert_healthy(served)


def test_bad_key_unknown_model_route_and_big_body(served):
    bad = openai.OpenAI(base_url=served.url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.models.list()
    assert httpx.get(served.url + "/metrics").status_code == 401
    with pytest.raises(openai.NotFoundError, match="gpt-4"):
        served.client.chat.completions.create(model="gpt-4", messages=[{"role": "user", "content": "x"}])
    resp = served.http.get("/v1/nothing")
    assert resp.status_code == 404 and error_of(resp)["code"] == "not_found"
    resp = served.http.post("/v1/completions", json={"model": NAME, "prompt": "x" * (65 * 1024)})
    assert resp.status_code == 413 and error_of(resp)["code"] == "request_too_large"
    assert_healthy(served)


def test_cors_only_for_the_given_origin(served):
    ok = served.http.get("/health", headers={"Origin": "http://allowed.test"})
    assert ok.headers.get("access-control-allow-origin") == "http://allowed.test"
    other = served.http.get("/health", headers={"Origin": "http://evil.test"})
    assert "access-control-allow-origin" not in other.headers


@contextlib.contextmanager
def held_steps(worker: Worker):
    """Hold the engine thread before each scheduler step until the yielded event is set."""
    gate = threading.Event()
    sched = worker.scheduler
    step = sched.step
    sched.step = lambda: (gate.wait(), step())[1]
    try:
        yield gate
    finally:
        gate.set()
        del sched.step


def wait_for(condition, what: str) -> None:
    deadline = time.monotonic() + HANG
    while not condition():
        assert time.monotonic() < deadline, f"hung waiting for {what}"
        time.sleep(0.01)


def test_queue_full_is_a_429_with_retry_after(served, monkeypatch):
    monkeypatch.setattr(served.worker, "max_queue", 2)
    with held_steps(served.worker) as gate, ThreadPoolExecutor(2) as pool:
        futures = [pool.submit(served.client.completions.create, model=NAME, prompt="q", max_tokens=3)
                   for _ in range(2)]
        wait_for(lambda: served.worker.waiting == 2, "two waiting requests")
        assert served.metric("llamacli_queue_depth") == 2
        resp = served.http.post("/v1/completions", json={"model": NAME, "prompt": "q", "max_tokens": 3})
        assert resp.status_code == 429 and int(resp.headers["retry-after"]) >= 1
        assert error_of(resp)["code"] == "queue_full"
        gate.set()
        assert all(f.result().choices[0].text is not None for f in futures)
    assert served.worker.waiting == 0
    assert_healthy(served)


def test_disconnect_mid_stream_frees_the_slot(served, ref):
    ids = ref.tokenizer.encode("A long story", add_special_tokens=True)
    assert run(ref, ids, 100).reason == "length"  # this prompt runs to max_tokens: only a cancel ends it early
    cancelled = served.metric("llamacli_requests_finished_total", '{reason="cancelled"}')
    body = {"model": NAME, "prompt": ids, "max_tokens": 100, "stream": True}
    with served.http.stream("POST", "/v1/completions", json=body) as resp:
        lines = resp.iter_lines()
        assert next(line for line in lines if line.startswith("data: {"))
    # The client is gone after one chunk: the row is cancelled and its slot freed at the next step.
    wait_for(lambda: served.metric("llamacli_requests_finished_total", '{reason="cancelled"}') == cancelled + 1,
             "the cancellation")
    wait_for(lambda: served.worker.scheduler.active == 0, "the slot to free")
    assert served.metric("llamacli_running_rows") == 0
    assert_healthy(served)


def test_health_is_503_while_loading(ref):
    gate = threading.Event()
    worker, server, thread, ready, _ = start_server(lambda: (gate.wait(HANG), ref)[1])
    try:
        wait_for(lambda: server.started, "the server to listen")
        url = f"http://127.0.0.1:{server.servers[0].sockets[0].getsockname()[1]}"
        assert httpx.get(url + "/health").status_code == 503
        resp = httpx.post(url + "/v1/completions", json={"model": NAME, "prompt": "x"},
                          headers={"Authorization": f"Bearer {KEY}"})
        assert resp.status_code == 503 and error_of(resp)["type"] == "server_error"
        gate.set()
        assert ready.wait(HANG)
        assert httpx.get(url + "/health").status_code == 200
    finally:
        gate.set()
        stop_server(server, thread, worker)


# -- the command -------------------------------------------------------------------------------------------------


def test_serve_subprocess_answers_drains_on_sigterm_and_exits_0(tiny_chat_dir, tmp_path):
    key_file = tmp_path / "key"
    key_file.write_text(KEY + "\n")
    proc = subprocess.Popen([sys.executable, "-m", "llamacli", "serve", "--model", str(tiny_chat_dir), "--port", "0",
                             "--api-key-file", str(key_file), "--batch-size", "2", "--context", "128",
                             "--model-name", "sub"], cwd=ROOT, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    try:
        line = proc.stderr.readline()
        m = re.search(r"serving 'sub' at (http://127\.0\.0\.1:\d+)/v1", line)
        assert m, line
        client = openai.OpenAI(base_url=m.group(1) + "/v1", api_key=KEY, max_retries=0)
        assert client.chat.completions.create(model="sub", messages=[{"role": "user", "content": "hi"}],
                                              max_tokens=3).choices[0].finish_reason in ("stop", "length")
        stream = client.completions.create(model="sub", prompt="A long story", max_tokens=60, stream=True)
        first = next(iter(stream))
        proc.send_signal(signal.SIGTERM)  # mid-stream: the running request still finishes
        rest = list(stream)
        assert [c.choices[0].finish_reason for c in [first, *rest] if c.choices[0].finish_reason]
        assert proc.wait(HANG) == 0
        err = proc.stderr.read()
        assert "stopped" in err and "Traceback" not in err
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_refuses_a_bad_key_file_and_a_busy_port(tiny_chat_dir, tmp_path):
    empty = tmp_path / "empty"
    empty.write_text("\n")
    r = subprocess.run([sys.executable, "-m", "llamacli", "serve", "--model", str(tiny_chat_dir), "--api-key-file",
                        str(empty)], cwd=ROOT, capture_output=True, text=True)
    assert r.returncode == 2 and r.stderr.strip() == f"error: {empty}: the API key file is empty"
    busy = bind("127.0.0.1", 0)
    port = busy.getsockname()[1]
    try:
        r = subprocess.run([sys.executable, "-m", "llamacli", "serve", "--model", str(tiny_chat_dir), "--port",
                            str(port)], cwd=ROOT, capture_output=True, text=True)
    finally:
        busy.close()
    assert r.returncode == 1 and r.stderr.startswith(f"error: cannot listen on 127.0.0.1:{port}")
    assert len(r.stderr.strip().splitlines()) == 1


def start_serve(*args: str) -> tuple[subprocess.Popen, str, str]:
    """`python -m llamacli serve ARGS --port 0`: (the process, its URL, its startup line)."""
    proc = subprocess.Popen([sys.executable, "-m", "llamacli", "serve", *args, "--port", "0"], cwd=ROOT,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})
    line = proc.stderr.readline()
    m = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", line)
    if not m:
        proc.kill()
    assert m, line + proc.stderr.read()
    return proc, m.group(1), line


def test_serve_quantized_weights_answer_as_the_quantized_engine(tiny_chat_dir):
    int8 = Engine.load(tiny_chat_dir, dtype="float32", device="cpu", quantize="int8")
    messages = [{"role": "user", "content": "tell me about the moon"}]
    want = int8.generate(int8.chat_ids(messages), Request(max_new_tokens=10))
    proc, url, line = start_serve("--model", str(tiny_chat_dir), "--quantize", "int8", "--context", "128",
                                  "--no-prefix-cache", "--model-name", "q")
    try:
        assert "int8 per row weights" in line
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0)
        for _ in range(2):  # with --no-prefix-cache, the same prompt again is prefilled whole
            r = client.chat.completions.create(model="q", messages=messages, max_tokens=10)
            assert r.choices[0].message.content == want.text
            assert r.usage.prompt_tokens_details.cached_tokens == 0
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(HANG) == 0
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_refuses_bad_quantize_options_with_one_line(tiny_chat_dir, tmp_path):
    from llamacli import quantization
    from llamacli.quant.checkpoint import write_quantized

    quantized = write_quantized(tiny_chat_dir, tmp_path / "q8", quantization.Quantization(8))
    for args, message in [(["--quantize", "int4", "--group-size", "48"], "--group-size 48 is not supported"),
                          (["--quantize", "int8", "--group-size", "32"], "--group-size applies to --quantize int4"),
                          (["--group-size", "64"], "--group-size applies to --quantize int4 only"),
                          (["--model", str(quantized), "--quantize", "int8"], "is already quantized (int8 per row)")]:
        model = [] if "--model" in args else ["--model", str(tiny_chat_dir)]
        r = subprocess.run([sys.executable, "-m", "llamacli", "serve", *model, *args, "--port", "0"], cwd=ROOT,
                           capture_output=True, text=True, timeout=HANG)
        assert r.returncode == 2, (args, r.stderr)
        assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr


def test_serve_help_says_batched_serving_decodes_normally():
    r = subprocess.run([sys.executable, "-m", "llamacli", "serve", "--help"], cwd=ROOT, capture_output=True,
                       text=True, timeout=HANG, env={**os.environ, "COLUMNS": "200"})
    assert r.returncode == 0
    assert "no speculative decoding" in " ".join(r.stdout.split())
    assert "--quantize" in r.stdout and "--group-size" in r.stdout
    r = subprocess.run([sys.executable, "-m", "llamacli", "serve", "--model", "x", "--draft-model", "y"], cwd=ROOT,
                       capture_output=True, text=True, timeout=HANG)
    assert r.returncode == 2 and "--draft-model" in r.stderr and r.stderr.count("\n") == 1


# -- the real model ----------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_smollm2_chat_stream_and_concurrency(smollm2_dir):
    smol = Engine.load(smollm2_dir, dtype="float32", device="cpu")
    worker, server, thread, ready, urls = start_server(lambda: smol)
    try:
        assert ready.wait(HANG)
        s = Served(urls[0], worker, server)
        asks = ["What is the capital of France?", "Name a colour.", "Say hello.", "Count to three."]
        msgs = [[{"role": "user", "content": a}] for a in asks]
        answers = [s.client.chat.completions.create(model=NAME, messages=m, max_tokens=16) for m in msgs]
        one = [r.choices[0].message.content for r in answers]
        assert "Paris" in one[0]
        # The template's default system prompt comes from the cache after the first request; the text does not
        # change (the engine recomputes every prompt).
        assert all(r.usage.prompt_tokens_details.cached_tokens >= 16 for r in answers[1:])
        assert one == [smol.generate(smol.chat_ids(m), Request(max_new_tokens=16)).text for m in msgs]
        with ThreadPoolExecutor(4) as pool:
            together = list(pool.map(lambda m: s.client.chat.completions.create(
                model=NAME, messages=m, max_tokens=16).choices[0].message.content, msgs))
        assert together == one
        streamed = "".join(c.choices[0].delta.content or "" for c in s.client.chat.completions.create(
            model=NAME, messages=msgs[0], max_tokens=16, stream=True))
        assert streamed == one[0]
    finally:
        stop_server(server, thread, worker)

"""The engine thread: ONE thread loads the `Engine` and owns it and an open `Scheduler`; the HTTP side talks to it
only through a thread-safe inbox (add, cancel, stop) and gets each request's events back on an asyncio queue fed
with `loop.call_soon_threadsafe`. Requests join the running batch as slots free up (continuous batching across
requests) and reuse the keys/values earlier requests left in the cache (the scheduler's prefix cache). The
waiting queue is bounded (`QueueFull` beyond it); a cancelled request's slot is freed at the next step;
`shutdown` drains the running requests for a bounded time, then cancels the rest.
"""

from __future__ import annotations

import asyncio
import queue
import threading
import time
from typing import AsyncIterator, Callable

from llamacli import prompts
from llamacli.request import Event, Finished, Request, TokenEvent
from llamacli.server.metrics import Metrics


DEFAULT_CONTEXT = 4096  # positions per batch row unless --context says otherwise (the KV cache is rows x this)


class QueueFull(Exception):
    """More requests are waiting than --max-queue allows."""


class NotReady(Exception):
    """The model is still loading, failed to load, or the server is shutting down."""


class Submission:
    """One HTTP request's generation: n choices of one prompt, and the queue their events arrive on."""

    def __init__(self, worker: "Worker", prompt_ids: list[int], requests: list[Request]):
        self.worker, self.prompt_ids, self.requests = worker, prompt_ids, requests
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.submitted_at = time.perf_counter()
        self.waiting = True  # counted in the worker's queue until its first event
        self.finished: list[Finished | None] = [None] * len(requests)

    def push(self, item) -> None:
        """From the engine thread: hand (choice index, event) or an exception to the HTTP side."""
        self.loop.call_soon_threadsafe(self.queue.put_nowait, item)

    async def events(self) -> AsyncIterator[tuple[int, Event]]:
        """(choice index, event) until every choice has finished; re-raises an engine failure."""
        left = len(self.requests)
        while left:
            item = await self.queue.get()
            if isinstance(item, BaseException):
                raise item
            index, event = item
            if isinstance(event, Finished):
                self.finished[index] = event
                left -= 1
            yield index, event

    def cancel(self) -> None:
        """Stop generating for this request (its client went away): the slots free at the next step."""
        self.worker.inbox.put(("cancel", self))


class Worker:
    """The engine thread (see the module doc). `load` builds the Engine, in the thread, so the server can answer
    /health while it loads."""

    def __init__(self, load: Callable[[], object], *, batch_size: int = 8, max_queue: int = 64,
                 context: int | None = None, metrics: Metrics | None = None, prefix_cache: bool = True):
        self.load, self.batch_size, self.max_queue, self.context_cap = load, batch_size, max_queue, context
        self.prefix_cache = prefix_cache
        self.metrics = metrics or Metrics()
        self.inbox: queue.SimpleQueue = queue.SimpleQueue()
        self.ready = threading.Event()  # set when loaded, or when loading failed (then `load_error`)
        self.load_error: BaseException | None = None
        self.engine = None
        self.scheduler = None
        self.stopping = False
        self._lock = threading.Lock()
        self._waiting = 0  # submitted, not yet admitted to a slot
        self._rows: dict[int, tuple[Submission, int]] = {}  # scheduler id -> (submission, choice index)
        self._last_token: dict[int, float] = {}
        self._cached = 0  # the scheduler's cached_tokens counted into the metric so far
        self._thread = threading.Thread(target=self._run, name="llamacli-engine", daemon=True)

    # -- the HTTP side -----------------------------------------------------------------------------------------

    def start(self) -> "Worker":
        """Start the engine thread (it loads the model first)."""
        self._thread.start()
        return self

    @property
    def loaded(self) -> bool:
        """Whether requests can be served."""
        return self.scheduler is not None and not self.stopping

    @property
    def context(self) -> int:
        """Positions a request may use: --context (default DEFAULT_CONTEXT), at most the model's context."""
        return min(self.engine.config.context_length, self.context_cap or DEFAULT_CONTEXT)

    @property
    def context_where(self) -> str:
        """How the context check names the limit."""
        return "the model's context" if self.context == self.engine.config.context_length else \
            "the server's context (--context)"

    @property
    def waiting(self) -> int:
        """Requests submitted and not yet in a batch slot."""
        return self._waiting

    def submit(self, prompt_ids: list[int], requests: list[Request]) -> Submission:
        """Queue a request's choices (call from the event loop). QueueFull past --max-queue; NotReady."""
        if not self.loaded:
            raise NotReady("the server is shutting down" if self.stopping else "the model is loading")
        prompts.check_fits(len(prompt_ids), max(r.max_new_tokens for r in requests), self.context,
                           self.context_where)
        with self._lock:
            if self._waiting >= self.max_queue:
                raise QueueFull(f"{self._waiting} requests are waiting (--max-queue {self.max_queue}); retry later")
            self._waiting += 1
            self.metrics.queue_depth.set(self._waiting)
        sub = Submission(self, list(prompt_ids), requests)
        self.inbox.put(("add", sub))
        return sub

    def shutdown(self, timeout: float = 30.0) -> None:
        """Stop taking requests, let the running ones finish for up to `timeout` s, cancel the rest, join."""
        self.stopping = True
        self.inbox.put(("stop", time.monotonic() + timeout))
        self._thread.join(timeout + 10)

    # -- the engine thread -------------------------------------------------------------------------------------

    def _run(self) -> None:
        from llamacli.generation.scheduler import Scheduler

        try:
            engine = self.load()
            self.engine = engine
            self.scheduler = Scheduler(engine, self.batch_size, self.context, prefix_cache=self.prefix_cache)
        except BaseException as exc:  # reported by /health and the serve command
            self.load_error = exc
            self.ready.set()
            return
        self.ready.set()
        deadline = None
        while True:
            items = []
            try:
                if self.scheduler.idle and deadline is None:  # nothing to do: sleep until a request comes
                    items.append(self.inbox.get())
                while True:
                    items.append(self.inbox.get_nowait())
            except queue.Empty:
                pass
            for kind, arg in items:
                if kind == "add":
                    self._add(arg)
                elif kind == "cancel":
                    for sid, (sub, _) in list(self._rows.items()):
                        if sub is arg:
                            self.scheduler.cancel(sid)
                else:
                    deadline = arg
            if deadline is not None and (self.scheduler.idle or time.monotonic() > deadline):
                for sid in list(self._rows):
                    self.scheduler.cancel(sid)
                self._step()  # reports the cancellations
                return
            self._step()

    def _add(self, sub: Submission) -> None:
        try:
            sids = self.scheduler.add_choices(sub.prompt_ids, sub.requests)
        except Exception as exc:
            self._admitted(sub)
            sub.push(exc)
            return
        for index, sid in enumerate(sids):
            self._rows[sid] = (sub, index)

    def _admitted(self, sub: Submission) -> None:
        if sub.waiting:
            sub.waiting = False
            with self._lock:
                self._waiting -= 1
                self.metrics.queue_depth.set(self._waiting)

    def _step(self) -> None:
        try:
            events = self.scheduler.step()
        except Exception as exc:  # a failed forward: fail every request in it, start over with a fresh cache
            from llamacli.generation.scheduler import Scheduler

            for sub in {sub for sub, _ in self._rows.values()}:
                self._admitted(sub)
                sub.push(exc)
            self._rows.clear()
            self.scheduler = Scheduler(self.engine, self.batch_size, self.context, prefix_cache=self.prefix_cache)
            self._cached = 0
            return
        now = time.perf_counter()
        m = self.metrics
        if self.scheduler.cached_tokens > self._cached:
            m.cached_prompt_tokens.inc(self.scheduler.cached_tokens - self._cached)
            self._cached = self.scheduler.cached_tokens
        for sid, event in events:
            sub, index = self._rows[sid]
            if sub.waiting:
                self._admitted(sub)
                m.prompt_tokens.inc(len(sub.prompt_ids))
            if isinstance(event, TokenEvent):
                m.generation_tokens.inc()
                last = self._last_token.get(sid)
                if last is None:
                    if index == 0:
                        m.ttft.observe(now - sub.submitted_at)
                else:
                    m.per_token.observe(now - last)
                self._last_token[sid] = now
            elif isinstance(event, Finished):
                m.finished.labels(event.reason).inc()
                del self._rows[sid]
                self._last_token.pop(sid, None)
            sub.push((index, event))
        m.running.set(self.scheduler.active)

"""The open batch scheduler: continuous batching of requests that arrive while others run.

`add(prompt_ids, request) -> id` queues a request, `step()` runs one forward and returns the token-level events
of every row that moved, `cancel(id)` frees a row's slot at the next step, `idle` says when nothing is left.
The KV cache is sized once by capacity (rows x positions). A batch job is `generate_batch(engine, items)` on top.

Each slot is a row of the cache. Every step is one forward over the weights: the active rows advance one token
each (per-row positions; the mask hides each row's stale cache entries) and, in the same pass, waiting prompts
are prefilled into free slots (`forward_last` with one part per contiguous run of decoding rows and one per new
prompt). Decoding is bound by reading the weights, prefill by arithmetic, so the decoding rows ride along with a
prefill almost for free instead of waiting for it. Each row is a `Sequence` (its own sampler, stops and
max_new_tokens); a finished slot takes the next waiting prompt at the next step, and when none is waiting the
last active row moves into a hole so the active rows stay one run of slots (one attention call per layer). A
prompt prefix shared by every prompt of a job (a system prompt, a few-shot header) can be prefilled once
(`share_prefix`); each new row that starts with it copies its keys/values and prefills only the rest.
`add_choices` queues n requests on one prompt (OpenAI's `n`): they are admitted together, the first row
prefills the prompt, the others copy its keys/values and start from the same logits, so each choice is what a
single run with its seed gives.

Across requests (`prefix_cache`, on by default): a finished or cancelled row leaves its keys/values in its slot
until the slot is needed (`PrefixIndex`: least recently freed overwritten first), and a new prompt that starts
with at least CACHED_PREFIX_MIN tokens some row holds (a running or a freed one: the same system prompt, a
conversation's earlier turns resent) gets those positions copied into its slot, or is admitted into the freed
donor's slot itself (see `_admit`), and prefills only the rest: at least its last token, whose logits it needs.
Its `prefill_tokens` (and the scheduler's `cached_tokens`) count what was reused. Compaction swaps a freed row
out of the way instead of overwriting it. Prompts admitted in one step cannot read each other's rows (none is
written before the forward): one that shares at least CACHED_PREFIX_MIN more tokens with an earlier one admitted
with it than any row holds now (a burst of chat requests behind one system prompt) waits one step at the front
of the queue, its rows kept free, and then copies them from that prompt's row (`_take`; once at most). Reused
keys/values are those a single run computes, up to float summation order, as with batching itself.
"""

from __future__ import annotations

import itertools
import time
from collections import deque
from typing import Iterable, Iterator

import torch

from llamacli import prompts
from llamacli.errors import UsageError
from llamacli.kv_cache import KVCache
from llamacli.request import Event, Finished, Request
from llamacli.generation.admission import PREFILL_TOKENS_PER_STEP, plan_admissions
from llamacli.generation.prefix_cache import PrefixIndex, shared_by_all
from llamacli.generation.sequence import Sequence

SHARED_PREFIX_MIN = 16  # a prefix all prompts share is prefilled once when it is at least this long


class _Row:
    """A request in the queue or in a slot. Its `Sequence` (sampler state, a vocabulary-sized penalty mask) is
    made when it is admitted, so a long queue costs only its prompts; times still count from `add`."""

    __slots__ = ("sid", "ids", "request", "prefix", "added_at", "seq", "followers", "leader", "held")

    def __init__(self, sid: int, ids: list[int], request: Request, prefix: int):
        self.sid, self.ids, self.request, self.prefix = sid, ids, request, prefix
        self.added_at = time.perf_counter()
        self.seq: Sequence | None = None
        self.followers: list[_Row] = []  # the other choices of this prompt, admitted with it (add_choices)
        self.leader: int | None = None  # for a follower once admitted: the slot whose prefill it copies
        self.held = False  # it waited a step for the row of a prompt admitted before it (once at most)

    @property
    def group(self) -> list["_Row"]:
        """This row and its followers: the rows admitted together."""
        return [self, *self.followers]

    @property
    def prefill_tokens(self) -> int:
        """Prompt tokens this request prefills (after the shared prefix)."""
        return len(self.ids) - self.prefix

    def start(self, engine) -> Sequence:
        """Make (once) the request's Sequence."""
        if self.seq is None:
            n_prefill = 0 if self.leader is not None else self.prefill_tokens
            self.seq = engine.sequence(self.ids, self.request, prefill_tokens=n_prefill, started_at=self.added_at)
        return self.seq


class Scheduler:
    """Continuous batching over one engine with a cache of `max_rows` x `max_positions` (see the module doc)."""

    def __init__(self, engine, max_rows: int = 8, max_positions: int | None = None,
                 prefill_budget: int = PREFILL_TOKENS_PER_STEP, prefix_cache: bool = True):
        if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
            raise UsageError(f"batch-size must be an integer >= 1, got {max_rows!r}")
        self.engine = engine
        self.max_rows = max_rows
        self.max_positions = min(max_positions or engine.config.context_length, engine.config.context_length)
        self.prefill_budget = prefill_budget
        self.cache = engine.new_cache(self.max_positions, max_batch=max_rows)
        self.slots: list[_Row | None] = [None] * max_rows  # slot i = cache row i; None = free
        self.waiting: deque[_Row] = deque()
        self.steps = 0  # forwards run, each decoding the active rows and prefilling new ones (tests, benchmarks)
        self.max_active = 0  # the most rows decoded together in one step
        self._ids = itertools.count()
        self._cancelled: set[int] = set()
        self._prefix: tuple[list[int], KVCache | None] = ([], None)
        dynamic = engine.config.max_seq_len if engine.config.rope_type == "dynamic" else None
        self.index = PrefixIndex(dynamic_context=dynamic) if prefix_cache else None  # None: no reuse
        self.cached_tokens = 0  # prompt tokens taken from the cache instead of prefilled (the server's metric)

    # -- requests --------------------------------------------------------------------------------------

    def add(self, prompt_ids: list[int], request: Request) -> int:
        """Queue a request; return its id. ContextOverflowError now if it can never fit the cache's positions."""
        return self.add_choices(prompt_ids, [request])[0]

    def add_choices(self, prompt_ids: list[int], requests: list[Request]) -> list[int]:
        """Queue n requests on one prompt that share its prefill (see the module doc); return their ids.

        ContextOverflowError if one can never fit the cache's positions; UsageError for more than `max_rows`.
        """
        if not 1 <= len(requests) <= self.max_rows:
            raise UsageError(f"n must be in [1, {self.max_rows}] (the batch size), got {len(requests)}")
        for request in requests:
            prompts.check_fits(len(prompt_ids), request.max_new_tokens, self.engine.config.context_length)
            prompts.check_fits(len(prompt_ids), request.max_new_tokens, self.max_positions,
                               "a batch row's context")
        prefix_ids, _ = self._prefix
        n = len(prefix_ids)
        prefix = n if n and len(prompt_ids) > n and prompt_ids[:n] == prefix_ids else 0
        rows = [_Row(next(self._ids), list(prompt_ids), request, prefix) for request in requests]
        rows[0].followers = rows[1:]
        self.waiting.append(rows[0])
        return [row.sid for row in rows]

    def cancel(self, sid: int) -> None:
        """Stop a request: its slot (or its place in the queue) is freed at the next step, which reports its
        Finished event with reason 'cancelled'. Unknown or finished ids are ignored."""
        self._cancelled.add(sid)

    @property
    def idle(self) -> bool:
        """True when no request is running or waiting."""
        return not self.waiting and not any(self.slots)

    @property
    def queued(self) -> int:
        """Requests waiting for a slot (each of n choices counts)."""
        return sum(1 + len(row.followers) for row in self.waiting)

    @property
    def active(self) -> int:
        """Rows decoding now."""
        return sum(s is not None for s in self.slots)

    @property
    def shared_prefix_tokens(self) -> int:
        """Length of the prefix set by `share_prefix` (0 when none)."""
        return len(self._prefix[0])

    @torch.inference_mode()
    def share_prefix(self, prompt_list: list[list[int]]) -> int:
        """Prefill once the prefix every prompt in `prompt_list` shares (when at least SHARED_PREFIX_MIN tokens),
        for requests added afterwards that start with it; return its length (0: none). Each prompt keeps at
        least its last token to prefill, whose logits give its first new token."""
        self._prefix = ([], None)
        cfg = self.engine.config
        n = shared_by_all(prompt_list, SHARED_PREFIX_MIN, cfg.max_seq_len if cfg.rope_type == "dynamic" else None)
        if not n:
            return 0
        first = prompt_list[0]
        cache = self.engine.new_cache(n)
        self.engine.model(torch.tensor([first[:n]], device=self.engine.device), 0, cache, last_only=True)
        self._prefix = (list(first[:n]), cache)
        return n

    # -- stepping --------------------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[tuple[int, Event]]:
        """One forward: decode every active row and prefill admitted prompts; (id, event) for each row that moved."""
        events = self._apply_cancellations()
        free = [i for i, s in enumerate(self.slots) if s is None]
        if self.index is not None:
            free = self.index.eviction_order(free)
        live = self._live() if free and self.waiting else {}
        reuse: list[int] = []  # prompt tokens rows hold now serve, of each waiting prompt the plan looks at

        def to_prefill() -> Iterator[int]:  # lazily: the plan stops at the first prompt that does not fit
            for w in self.waiting:
                reuse.append(max(w.prefix, self._donor(w, live)[1]))
                yield len(w.ids) - reuse[-1]

        admitted = plan_admissions(free, to_prefill(), self.prefill_budget, (len(w.group) for w in self.waiting))
        new = self._admit(self._take(len(admitted), reuse), admitted, live)
        if new or any(self.slots):
            events += self._forward(new)
        if not self.waiting:  # nothing left to fill holes with: keep the active rows contiguous
            self._compact()
        return events

    def _live(self) -> dict[int, list[int]]:
        """The tokens each running row holds, by slot (none without the prefix cache)."""
        if self.index is None:
            return {}
        return {i: self.index.tokens(r.ids, r.seq.token_ids, r.seq.pos) for i, r in enumerate(self.slots) if r}

    def _free(self, slot: int, row: _Row) -> None:
        """A row ended: its slot is free, and its keys/values stay for a later prompt to reuse."""
        self.slots[slot] = None
        if self.index is not None:
            self.index.keep(slot, self.index.tokens(row.ids, row.seq.token_ids, row.seq.pos))

    def _donor(self, row: _Row, live: dict[int, list[int]]) -> tuple[int | None, int]:
        """(slot, n): the cache row holding the longest prefix of the row's prompt, never its last token
        (None, 0 when none is worth it)."""
        return (None, 0) if self.index is None else self.index.best(row.ids, live, len(row.ids) - 1)

    def _take(self, n_rows: int, reuse: list[int]) -> list[_Row]:
        """Take from the queue the prompts planned into `n_rows` rows, but those that should wait a step for the
        row of another one taken now (`PrefixIndex.waiting`) stay at its front, in their order. Holding them
        changes nothing else: the others go in this step as planned, and at the next the held ones find their
        rows still free and a prefill no longer than planned, within the budget they were planned in."""
        taken = []
        while sum(len(w.group) for w in taken) < n_rows:
            taken.append(self.waiting.popleft())
        may_wait = [not w.held for w in taken]
        held = [] if self.index is None else self.index.waiting([w.ids for w in taken], reuse, may_wait)
        for k in reversed(held):
            taken[k].held = True
            self.waiting.appendleft(taken[k])
        return [w for k, w in enumerate(taken) if k not in held]

    def _admit(self, leaders: list[_Row], admitted: list[int], live: dict[int, list[int]]) -> dict[int, _Row]:
        """Put the prompts taken from the queue into the planned slots (eviction order; those of the prompts held
        back are the last, the most recently freed, which then keep what they hold); returns {slot: row}.

        The prompt reusing the most goes first, so that one sharing less takes another donor. A prompt goes into
        the first planned slot (the least recently freed) and gets the positions its donor holds copied there:
        from a running row, a freed one (which then counts as recently used) or the shared prefix; but into its
        donor's own slot, with no copy, when that is free and is the first planned anyway or holds nothing the
        prompt does not reuse (a conversation resent with its answer). Copies happen now, one prompt after
        another, so none reads a row an earlier one overwrote; a slot taken is no donor any more.
        """
        pool, new = admitted[:sum(len(w.group) for w in leaders)], {}
        while leaders:
            matches = [self._donor(w, live) for w in leaders]
            k = max(range(len(leaders)), key=lambda j: matches[j][1])  # queue order among equals
            leader, (donor, n) = leaders.pop(k), matches[k]
            reuse = n > leader.prefix
            free_donor = reuse and self.slots[donor] is None
            target = pool[0]
            if free_donor and (donor == target or n >= len(self.index.held(donor))):
                target = donor  # its keys/values are in place, and nothing else it holds is lost
            if target in pool:
                pool.remove(target)
            else:
                pool.pop()  # the donor replaces the planned slot freed last, which keeps what it holds
            slots = [target] + [pool.pop(0) for _ in leader.followers]
            if self.index is not None:
                for slot in slots:
                    self.index.drop(slot)
            if reuse:
                if donor != target:
                    self.cache.copy_prefix(target, self.cache, donor, n)
                    if free_donor:
                        self.index.touch(donor)
                leader.prefix = n
            elif leader.prefix:
                self.cache.copy_prefix(target, self._prefix[1], 0, leader.prefix)
            self.cached_tokens += leader.prefix
            for row, slot in zip(leader.group, slots):
                new[slot] = row
            for row in leader.followers:
                row.leader = target
        return new

    def _apply_cancellations(self) -> list[tuple[int, Event]]:
        if not self._cancelled:
            return []
        events = []
        for i, row in enumerate(self.slots):
            if row is not None and row.sid in self._cancelled:
                events += [(row.sid, e) for e in row.seq.cancel()]
                self._free(i, row)
        for k, leader in enumerate(list(self.waiting)):
            group = leader.group
            keep = [r for r in group if r.sid not in self._cancelled]
            if len(keep) == len(group):
                continue
            for row in group:
                if row.sid in self._cancelled:
                    events += [(row.sid, e) for e in row.start(self.engine).cancel()]
            if keep:  # the first choice left prefills for the others
                keep[0].followers, keep[0].held = keep[1:], leader.held
            self.waiting[k] = keep[0] if keep else None
        self.waiting = deque(w for w in self.waiting if w is not None)
        self._cancelled.clear()
        return events

    def _forward(self, new: dict[int, _Row]) -> list[tuple[int, Event]]:
        device = self.engine.device
        cache = self.cache
        order: list[tuple[int, _Row, bool, int]] = []  # (slot, row, is_new, its logits row)
        at: dict[int, int] = {}  # a new row's slot -> its logits row
        copies: list[tuple[int, int, int]] = []  # (follower slot, leader slot, prompt positions)
        parts = []
        run: list[int] = []  # a contiguous run of decoding slots, forming one part

        def close_run() -> None:
            if run:
                positions = [self.slots[i].seq.pos for i in run]
                tokens = torch.tensor([[self.slots[i].seq.last_token] for i in run], device=device)  # (n, 1)
                # Rows all at one position need no mask (and then match a single-row forward bit for bit).
                start = positions[0] if min(positions) == max(positions) else torch.tensor(positions, device=device)
                parts.append((tokens, start, cache.rows(run[0], run[-1] + 1)))
                base = sum(p[0].shape[0] for p in parts[:-1])  # logits rows before this part
                order.extend((i, self.slots[i], False, base + k) for k, i in enumerate(run))
                run.clear()

        for i, row in enumerate(self.slots):
            if row is not None:
                run.append(i)
                continue
            close_run()
            if i in new:
                row = new[i]
                row.start(self.engine)
                if row.leader is not None:  # another choice of the leader's prompt: same prefill, same logits
                    order.append((i, row, True, row.leader))  # the leader's logits row, looked up below
                    copies.append((i, row.leader, len(row.ids)))
                    continue
                n = row.prefix  # positions [0, n) are in place (`_admit`): prefill the rest
                at[i] = sum(p[0].shape[0] for p in parts)  # a prefill part gives one logits row
                order.append((i, row, True, at[i]))
                parts.append((torch.tensor([row.ids[n:]], device=device), n, cache.rows(i, i + 1)))
        close_run()
        order = [(i, row, is_new, at[j] if row.leader is not None and is_new else j) for i, row, is_new, j in order]

        self.steps += 1
        self.max_active = max(self.max_active, len(order))
        logits = self.engine.model.forward_last(parts).float().cpu()  # (rows, V)
        for dst, src, n_positions in copies:  # the leaders' keys/values are written now
            cache.copy_prefix(dst, cache, src, n_positions)
        greedy = torch.argmax(logits, dim=-1).tolist() if any(r.seq.plain_greedy for _, r, _, _ in order) else None
        logprobs = (torch.log_softmax(logits, dim=-1) if any(r.seq.logprobs is not None for _, r, _, _ in order)
                    else None)
        events = []
        for i, row, is_new, j in order:
            seq = row.seq
            if is_new:
                self.slots[i] = row
            else:
                seq.advance()
            events += [(row.sid, e) for e in seq.step(logits[j], greedy[j] if greedy is not None else None,
                                                       logprobs[j] if logprobs is not None else None)]
            if seq.done:
                self._free(i, row)
        return events

    def _compact(self) -> None:
        """Keep the active rows one run of consecutive slots (one attention call per layer): move the last into
        the first hole between them. A freed row's keys/values in the hole are swapped out, not overwritten."""
        while True:
            active = [i for i, r in enumerate(self.slots) if r is not None]
            if not active or active[-1] - active[0] + 1 == len(active):
                return
            hole = next(i for i in range(active[0], active[-1]) if self.slots[i] is None)
            last = active[-1]
            kept = self.index.held(hole) if self.index is not None else []
            if kept:
                self.cache.swap_rows(last, hole, self.slots[last].seq.pos, len(kept))
                self.index.swap(last, hole)
            else:
                self.cache.move_row(last, hole, self.slots[last].seq.pos)
            self.slots[hole], self.slots[last] = self.slots[last], None


def scheduler_for(engine, items: list[tuple[object, list[int], Request]], batch_size: int = 8,
                  prefill_budget: int = PREFILL_TOKENS_PER_STEP, prefix_cache: bool = True) -> Scheduler:
    """A scheduler sized for a batch job: min(batch_size, items) rows of the longest prompt + max_new_tokens.

    Every item is checked against the model's context first (ContextOverflowError before anything runs).
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UsageError(f"batch-size must be an integer >= 1, got {batch_size!r}")
    for _, ids, req in items:
        engine.check_fits(len(ids), req.max_new_tokens)
    if not items:
        raise UsageError("a batch needs at least one item")
    n_positions = max(len(ids) + req.max_new_tokens for _, ids, req in items)
    return Scheduler(engine, min(batch_size, len(items)), n_positions, prefill_budget, prefix_cache)


def generate_batch(engine, items: Iterable[tuple[object, list[int], Request]], batch_size: int = 8,
              scheduler: Scheduler | None = None) -> Iterator[tuple[object, Finished]]:
    """Generate for every (key, prompt_ids, request); yield (key, Finished) in the order rows finish.

    The prefix every prompt shares is prefilled once. `scheduler` (from `scheduler_for`) lets a caller read
    its counters afterwards.
    """
    items = list(items)
    if not items:
        return
    sched = scheduler or scheduler_for(engine, items, batch_size)
    sched.share_prefix([ids for _, ids, _ in items])
    keys = {sched.add(ids, req): key for key, ids, req in items}
    while not sched.idle:
        for sid, event in sched.step():
            if isinstance(event, Finished):
                yield keys.pop(sid), event

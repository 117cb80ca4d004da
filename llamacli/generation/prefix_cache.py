"""Cross-request prefix caching: which tokens each row of the scheduler's KV cache holds, and which row a new
prompt can reuse.

A request that finishes (or is cancelled) leaves its keys/values in its slot's row: `PrefixIndex` remembers the
tokens they stand for (positions [0, n)) until the slot is taken again; the rows of running requests hold theirs too
(the scheduler passes them in). A new prompt reuses the longest common token prefix it has with any of them, when
that is at least `min_tokens` long and never its last token (whose logits give the first new token): the scheduler
copies those positions into the new row, or admits the prompt into that very row when its slot is free, and prefills
only the rest. Prompts admitted in the same step cannot read each other's rows (none is written yet): `waiting`
names those that should wait one step for an earlier one's row instead of prefilling what it will hold. Free slots
are overwritten least recently freed first, slots that hold nothing before any. Under dynamic NTK scaling a
position's keys depend on the length of the forward that computed them once it passes the trained context
(`dynamic_context`): only prompts within it reuse, and only from rows whose prompt was within it. `shared_by_all`
is the prefix every prompt of a batch job shares (the scheduler prefills it once). Pure bookkeeping: no tensors here.
"""

from __future__ import annotations

import itertools

CACHED_PREFIX_MIN = 16  # fewer common tokens than this are recomputed (a copy is not worth its bookkeeping)


def common_prefix(a: list[int], b: list[int], limit: int) -> int:
    """The length of the longest common prefix of a and b, at most `limit` (a binary search on slices)."""
    lo, hi = 0, min(len(a), len(b), limit)
    if hi <= 0:
        return 0
    if a[:hi] == b[:hi]:
        return hi
    while lo < hi - 1:  # a[:lo] == b[:lo] and a[:hi] != b[:hi]
        mid = (lo + hi) // 2
        if a[:mid] == b[:mid]:
            lo = mid
        else:
            hi = mid
    return lo


def shared_by_all(prompts: list[list[int]], minimum: int, dynamic_context: int | None = None) -> int:
    """The length of the prefix every prompt shares, never a prompt's last token; 0 for fewer than two prompts,
    under `minimum` tokens, or a prompt past a dynamic-NTK context (its keys depend on its length there)."""
    if len(prompts) < 2 or (dynamic_context is not None and max(map(len, prompts)) > dynamic_context):
        return 0
    n = min(map(len, prompts)) - 1
    for ids in prompts[1:]:
        n = common_prefix(prompts[0], ids, n)
    return n if n >= minimum else 0


class PrefixIndex:
    """The tokens held by the rows of free slots, by slot, each with when it was freed (see the module doc)."""

    def __init__(self, min_tokens: int = CACHED_PREFIX_MIN, dynamic_context: int | None = None):
        self.min_tokens = max(1, min_tokens)
        self.dynamic_context = dynamic_context
        self._held: dict[int, tuple[list[int], int]] = {}  # slot -> (tokens at positions [0, n), freed at)
        self._clock = itertools.count()

    def __len__(self) -> int:
        return len(self._held)

    def tokens(self, prompt: list[int], generated: list[int], pos: int) -> list[int]:
        """What a row holds that may be reused: its first `pos` tokens (prompt, then generated ones fed back)."""
        if self.dynamic_context is not None and len(prompt) > self.dynamic_context:
            return []  # computed past the trained context: rotated by that prompt's own length
        return prompt[:pos] if pos <= len(prompt) else prompt + generated[:pos - len(prompt)]

    def held(self, slot: int) -> list[int]:
        """The tokens a free slot's row holds ([] when none are known)."""
        return self._held[slot][0] if slot in self._held else []

    def keep(self, slot: int, tokens: list[int]) -> None:
        """A slot was freed with `tokens` at positions [0, len(tokens)) of its row (too few: nothing kept)."""
        if len(tokens) >= self.min_tokens:
            self._held[slot] = (tokens, next(self._clock))
        else:
            self._held.pop(slot, None)

    def drop(self, slot: int) -> None:
        """The slot's row is being written for another request: forget what it held."""
        self._held.pop(slot, None)

    def touch(self, slot: int) -> None:
        """A free slot's row was read for a new prompt: it counts as freed now (the last to overwrite)."""
        if slot in self._held:
            self._held[slot] = (self._held[slot][0], next(self._clock))

    def swap(self, a: int, b: int) -> None:
        """Rows a and b exchanged their contents."""
        ha, hb = self._held.pop(a, None), self._held.pop(b, None)
        if ha is not None:
            self._held[b] = ha
        if hb is not None:
            self._held[a] = hb

    def eviction_order(self, free_slots: list[int]) -> list[int]:
        """Free slots, the first to overwrite first: those holding nothing (lowest first), then least recently
        freed."""
        empty = [s for s in free_slots if s not in self._held]
        kept = sorted((s for s in free_slots if s in self._held), key=lambda s: self._held[s][1])
        return empty + kept

    def _reusable(self, ids: list[int]) -> bool:
        """Whether a prompt's keys/values are those of any forward that computes them (see the module doc)."""
        return self.dynamic_context is None or len(ids) <= self.dynamic_context

    def waiting(self, prompts: list[list[int]], reuse: list[int], may_wait: list[bool]) -> list[int]:
        """Of the prompts a step would admit (queue order), those (their positions) that should wait one step.

        A prompt waits when an earlier one of them that does not wait shares at least `min_tokens` more of it
        than `reuse` (what rows hold now already serve it) and `may_wait` allows (a prompt waits once at most):
        at the next step that prompt's row holds them, and the waiting one copies them instead of prefilling them.
        """
        leaders: list[list[int]] = []
        held = []
        for k, ids in enumerate(prompts):
            if may_wait[k] and self._reusable(ids):
                n = max((common_prefix(ids, lead, len(ids) - 1) for lead in leaders if self._reusable(lead)),
                        default=0)
                if n - reuse[k] >= self.min_tokens:
                    held.append(k)
                    continue
            leaders.append(ids)
        return held

    def best(self, ids: list[int], live: dict[int, list[int]], limit: int) -> tuple[int | None, int]:
        """(slot, n): the row whose held tokens share the longest prefix with `ids` (at most `limit` tokens,
        at least `min_tokens`), or (None, 0). `live` gives the tokens held by running rows, by slot. Among
        equals, the least recently freed slot wins (it is the next to overwrite), then a running row."""
        if limit < self.min_tokens or not self._reusable(ids):
            return None, 0
        head = ids[:self.min_tokens]
        best_slot, best_n = None, 0
        freed = sorted(self._held, key=lambda s: self._held[s][1])
        candidates = [(s, self._held[s][0]) for s in freed] + list(live.items())
        for slot, held in candidates:
            if held[:self.min_tokens] != head:
                continue
            n = common_prefix(ids, held, limit)
            if n >= self.min_tokens and n > best_n:
                best_slot, best_n = slot, n
        return best_slot, best_n

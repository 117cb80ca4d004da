"""The scheduler's admission policy as a pure function: which free slots take the next waiting prompts in one step.

A step prefills the prompts it admits in the same forward as the decoding rows' next tokens. Decoding is bound by
reading the weights, prefill by arithmetic, so a step's prefill is capped (`PREFILL_TOKENS_PER_STEP`) to keep the
decoding rows' next tokens from waiting on a long burst of prompts; one prompt is always admitted, however long.
Which of the admitted prompts copy keys/values from another row is the prefix cache's question, not this one.
Torch-free (`benchmarks/bench_batch_costs.py` replays a schedule with it).
"""

from __future__ import annotations

import itertools
from typing import Iterable

PREFILL_TOKENS_PER_STEP = 2048  # prompt tokens one step may prefill beside its decoding rows


def plan_admissions(free_slots: list[int], waiting_prefill: Iterable[int],
                    budget: int = PREFILL_TOKENS_PER_STEP, widths: Iterable[int] | None = None) -> list[int]:
    """The admission policy: which free slots (lowest first) take the next waiting prompts, in queue order.

    `waiting_prefill` gives each waiting prompt's tokens to prefill, `widths` the rows each takes (n choices of
    one prompt take n together; default 1): the slots of each admitted prompt come out consecutively. Prompts are
    admitted while their total stays within `budget`, and always at least one (however long), so that a long
    prompt cannot starve. Both iterables are read lazily, no further than the first prompt that does not fit.
    """
    free = list(free_slots)
    admitted: list[int] = []
    tokens = 0
    for n, width in zip(waiting_prefill, itertools.repeat(1) if widths is None else widths):
        if len(admitted) + width > len(free) or (admitted and tokens + n > budget):
            break
        admitted += free[len(admitted):len(admitted) + width]
        tokens += n
    return admitted

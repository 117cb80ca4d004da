"""One request's token state machine: from the logits of each step to the events a caller sees.

A `Sequence` owns everything per request that is not the model or the cache: the sampler (its generator and
repetition-penalty mask), the eos ids, the stop strings, the incremental detokenizer, log-probabilities, stats
and the finish reason. Every way of decoding drives it the same way: a single stream (`Engine.stream`), the
batch scheduler (one `Sequence` per slot) and, later, speculative decoding (which accepts several tokens per
forward, `decide` + `take`). The driver runs the model; the sequence picks and accepts tokens and says when it is
done.
"""

from __future__ import annotations

import time

import torch

from llamacli.request import CANCELLED, LENGTH, STOP, Event, Finished, Request, Stats, TextEvent, TokenEvent
from llamacli.sampling import distribution, make_generator, sample


class StopMatcher:
    """Holds back text that might begin a stop string; reports the text before the first stop found."""

    def __init__(self, stops: tuple[str, ...]):
        self.stops = stops
        self.pending = ""

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add text; return (text safe to emit now, whether a stop string was found)."""
        if not self.stops:
            return piece, False
        self.pending += piece
        hits = [i for i in (self.pending.find(s) for s in self.stops) if i >= 0]
        if hits:
            out, self.pending = self.pending[:min(hits)], ""
            return out, True
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        cut = len(self.pending) - hold
        out, self.pending = self.pending[:cut], self.pending[cut:]
        return out, False

    def flush(self) -> str:
        """Whatever is held back, at the end of generation."""
        out, self.pending = self.pending, ""
        return out


class Sequence:
    """The state of one request being generated for; `step` turns one row of logits into events.

    `pos` is the position the last accepted token takes when it is fed back to the model: the driver feeds
    `last_token` at `pos` and then calls `advance()`.
    """

    def __init__(self, prompt_ids: list[int], request: Request, *, eos_ids: frozenset[int], vocab_size: int,
                 tokenizer=None, prefill_tokens: int | None = None, started_at: float | None = None):
        self.prompt_ids = prompt_ids
        self.request = request
        self.params = request.sampling
        # Greedy rows without a penalty can take a batched argmax; the others go through `sample`.
        counted = self.params.presence_penalty != 0 or self.params.frequency_penalty != 0
        self.plain_greedy = self.params.greedy and self.params.repetition_penalty == 1.0 and not counted
        self.generator = None if self.params.greedy else make_generator(request.seed)
        self.seen = None
        if self.params.repetition_penalty != 1.0:
            self.seen = torch.zeros(vocab_size, dtype=torch.bool)
            self.seen[torch.tensor(prompt_ids)] = True
        self.counts = torch.zeros(vocab_size, dtype=torch.float32) if counted else None  # generated, per token
        self.stop_ids = frozenset() if request.ignore_eos else eos_ids
        self.decoder = tokenizer.stream_decoder(skip_special_tokens=True) if tokenizer is not None else None
        self.matcher = StopMatcher(request.stop)
        self.token_ids: list[int] = []
        self.logprobs: list[float] | None = [] if request.logprobs else None
        self.top_logprobs: list[list[tuple[int, float]]] | None = [] if request.top_logprobs else None
        self.text_parts: list[str] = []
        n_prefill = len(prompt_ids) if prefill_tokens is None else prefill_tokens
        self.stats = Stats(prompt_tokens=len(prompt_ids), prefill_tokens=n_prefill)
        self.pos = len(prompt_ids)
        self.reason: str | None = None  # set when the sequence is done
        self._stop_hit = False
        # Prefill counts from now (the driver prefills next); time to first token from the request's arrival,
        # which for a request queued in a scheduler is earlier.
        self._t_prefill = time.perf_counter()
        self._t0 = self._t_prefill if started_at is None else started_at
        self._t_first = 0.0

    @property
    def done(self) -> bool:
        """Whether generation has ended (`reason` says why)."""
        return self.reason is not None

    @property
    def last_token(self) -> int:
        """The most recent accepted token: what the model reads next, at `pos`."""
        return self.token_ids[-1]

    def advance(self) -> None:
        """The driver fed `last_token` at `pos` into the cache."""
        self.pos += 1

    def pick(self, logits: torch.Tensor, greedy_token: int | None = None) -> int:
        """The next token from one row of fp32 CPU logits (V,); `greedy_token` is a batched argmax, if computed."""
        if self.plain_greedy and greedy_token is not None:
            return greedy_token
        return sample(logits, self.params, self.generator, self.seen, self.counts)

    def step(self, logits: torch.Tensor, greedy_token: int | None = None,
             logprobs: torch.Tensor | None = None) -> list[Event]:
        """Pick the next token from `logits` (V,) and accept it; `logprobs` is its log-softmax if already taken."""
        return self.take(logits, self.pick(logits, greedy_token), logprobs)

    def take(self, logits: torch.Tensor, token: int, logprobs: torch.Tensor | None = None) -> list[Event]:
        """Accept `token`, chosen for the position whose logits (V,) are given (its logprob is taken from them)."""
        lp = top = None
        if self.logprobs is not None:
            row = logprobs if logprobs is not None else torch.log_softmax(logits.float(), dim=-1)
            lp = float(row[token])
            if self.top_logprobs is not None:
                values, ids = torch.topk(row, min(self.request.top_logprobs, row.shape[-1]))
                top = list(zip(ids.tolist(), values.tolist()))
        return self.accept(token, lp, top)

    def distribution(self, logits: torch.Tensor) -> torch.Tensor:
        """The probabilities (V,) that sampling draws the next token from (penalty, temperature, filters)."""
        return distribution(logits, self.params, self.seen, self.counts)

    def decide(self, logits: torch.Tensor, draft_token: int, draft_probs: torch.Tensor | None = None) -> int:
        """The token this sequence takes at a position where a draft proposed `draft_token`.

        Greedy: the argmax (the draft is kept when it equals it). Sampling with the draft's distribution
        `draft_probs` (V,): the draft is kept with probability min(1, p/q), else a token is drawn from
        max(0, p - q) renormalised (speculative sampling; the result is distributed as p). Without it (a draft
        that is a guess, not a sample): a token drawn from p as plain decoding would, so the draft is kept
        exactly when the draws agree.
        """
        if self.params.greedy or draft_probs is None:
            return self.pick(logits)
        p = self.distribution(logits)
        q = draft_probs.to(p.dtype)
        u = float(torch.rand((), generator=self.generator))
        if float(q[draft_token]) > 0 and u * float(q[draft_token]) < float(p[draft_token]):
            return draft_token
        return int(torch.multinomial(self.residual(p, q), 1, generator=self.generator))

    @staticmethod
    def residual(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """What a rejected draft's position draws from: max(0, p - q) (unnormalised; multinomial normalises)."""
        residual = (p - q).clamp_min(0)
        if float(residual.sum()) <= 0:  # p <= q everywhere means p == q: any draw from p will do
            residual = p
        return residual

    def accept(self, token: int, logprob: float | None = None,
               top_logprobs: list[tuple[int, float]] | None = None) -> list[Event]:
        """Record a chosen token: its TokenEvent, and the closing events when it ends the sequence."""
        if self.done:
            raise RuntimeError("a finished sequence accepts no more tokens")
        if not self.token_ids:
            self._t_first = time.perf_counter()
            self.stats.prefill_s = self._t_first - self._t_prefill
            self.stats.ttft_s = self._t_first - self._t0
        self.token_ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        if self.top_logprobs is not None:
            self.top_logprobs.append(top_logprobs or [])
        if self.seen is not None:
            self.seen[token] = True
        if self.counts is not None and token < self.counts.shape[0]:
            self.counts[token] += 1
        stopped = token in self.stop_ids
        piece = "" if (stopped or self.decoder is None) else self.decoder.add(token)
        piece, self._stop_hit = self.matcher.feed(piece)
        self.text_parts.append(piece)
        events: list[Event] = [TokenEvent(text=piece, token_id=token, logprob=logprob,
                                                 top_logprobs=top_logprobs)]
        if stopped or self._stop_hit:
            events += self._finish(STOP)
        elif len(self.token_ids) >= self.request.max_new_tokens:
            events += self._finish(LENGTH)
        return events

    def cancel(self) -> list[Event]:
        """End the sequence at the caller's request: the text so far, then Finished with reason 'cancelled'."""
        return [] if self.done else self._finish(CANCELLED)

    def _finish(self, reason: str) -> list[Event]:
        """The text the detokenizer and stop matcher held back, then Finished."""
        events: list[Event] = []
        if not self._stop_hit:  # after a stop string, everything past it is dropped
            tail, hit = self.matcher.feed(self.decoder.flush() if self.decoder is not None else "")
            if not hit:
                tail += self.matcher.flush()
            elif reason == LENGTH:
                reason = STOP  # the held-back text completed a stop string
            if tail:
                self.text_parts.append(tail)
                events.append(TextEvent(tail))
        self.reason = reason
        self.stats.generated_tokens = len(self.token_ids)
        self.stats.decode_s = time.perf_counter() - self._t_first if self.token_ids else 0.0
        events.append(Finished(reason, "".join(self.text_parts), self.token_ids, self.logprobs, self.stats,
                               self.top_logprobs))
        return events

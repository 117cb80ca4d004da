"""Speculative decoding: a draft proposes k tokens, the model verifies them in one forward over k+1 positions.

`Speculator.stream` has `Engine.stream`'s signature and events. Each round feeds the last accepted token and the
k drafted ones at `seq.pos` in one forward (logits for every position), and hands each position to the same
`Sequence` as plain decoding: `decide` takes the model's decision for the drafted token (greedy: its argmax;
sampling: rejection sampling with min(1, p/q) and the residual max(0, p - q), or for a draft without
probabilities a plain draw that keeps the draft when it agrees), `take` accepts it with the model's logprob.
Stops, eos, stop strings and `max_new_tokens` therefore end a round anywhere inside it. Rollback is an earlier
`start_pos`: the cache positions of rejected tokens are overwritten by the next round, in the model's cache and
in a draft model's.

Drafts implement `propose(ids, k, params) -> (tokens, probs | None)`: `PromptLookup` (n-gram match over the
prompt and the text so far) and `DraftModel` (any `Engine`: a smaller checkpoint with the same tokenizer, or a
quantized copy of the model itself). `DraftLength` shortens the draft when little is accepted and switches
speculation off for a while when a round's time per token is worse than a plain step's.
"""

from __future__ import annotations

import time
from typing import Iterator, Protocol

import torch

from llamacli.errors import UsageError
from llamacli.kv_cache import KVCache
from llamacli.request import DEFAULT_DRAFT_TOKENS, Event, Request, SamplingParams
from llamacli.sampling import filter_logits, make_generator


class Draft(Protocol):
    """What proposes tokens: `name` for the stats, `propose` for each round."""

    name: str

    def propose(self, ids: list[int], k: int, params: SamplingParams) -> tuple[list[int], torch.Tensor | None]:
        """Up to k tokens to follow ids (prompt + generated so far), and the (n, V) probabilities they were
        sampled from, or None when the tokens are guesses (then greedy or a plain draw decides)."""


class PromptLookup:
    """Drafts copied from the context: the tokens that followed the latest earlier occurrence of its last n-gram
    (n from `max_ngram` down to 1), as transformers' prompt lookup and llama.cpp's n-gram drafts."""

    name = "prompt-lookup"

    def __init__(self, max_ngram: int = 3):
        if max_ngram < 1:
            raise UsageError(f"--prompt-lookup must be an n-gram length >= 1, got {max_ngram}")
        self.max_ngram = max_ngram

    def propose(self, ids: list[int], k: int, params: SamplingParams) -> tuple[list[int], None]:
        """The continuation of the most recent earlier match of the longest suffix n-gram that has one."""
        n_ids = len(ids)
        for n in range(min(self.max_ngram, n_ids - 1), 0, -1):
            tail = ids[n_ids - n:]
            first = tail[0]
            for start in range(n_ids - n - 1, -1, -1):  # latest match first; it must end before the tail
                if ids[start] == first and ids[start:start + n] == tail:
                    follow = ids[start + n:start + n + k]
                    if follow:
                        return follow, None
        return [], None


class DraftModel:
    """A draft that is a model (any `Engine`): its own KV cache, advanced by its proposals and rolled back to the
    prefix it shares with the context of the next round (an earlier start_pos; nothing is undone)."""

    def __init__(self, engine, name: str = "draft-model"):
        self.engine = engine
        self.name = name
        self.n_positions = 0
        self.cache: KVCache | None = None
        self.cached: list[int] = []  # ids whose keys/values are in the draft's cache, in order
        self.generator = make_generator(None)

    def reset(self, seed: int | None, n_positions: int) -> None:
        """A new request on a model cache of n_positions: reseed, and grow the draft's cache if it is smaller
        (its contents are kept: the prefix shared with each round's context is found then)."""
        # The draft samples with its own generator: the model's stays the one plain sampling would use.
        self.generator = make_generator(None if seed is None else (seed + 0x5DEECE66D) % 2**63)
        self.n_positions = min(n_positions, self.engine.config.context_length)
        if self.cache is not None and self.cache.max_seq_len < self.n_positions:
            self.cache, self.cached = None, []

    def _choose(self, logits: torch.Tensor, params: SamplingParams) -> tuple[int, torch.Tensor | None]:
        """The draft's token from its logits (V,), and the distribution it was drawn from (None if greedy)."""
        logits = logits.float().cpu()
        if params.greedy:
            return int(torch.argmax(logits)), None
        q = torch.softmax(filter_logits(logits, params), dim=-1)
        return int(torch.multinomial(q, 1, generator=self.generator)), q

    @torch.inference_mode()
    def propose(self, ids: list[int], k: int, params: SamplingParams) -> tuple[list[int], torch.Tensor | None]:
        """Feed the ids the draft's cache lacks, then k - 1 one-token steps: k tokens (fewer at its context end)."""
        k = min(k, self.n_positions - len(ids))
        if k <= 0:
            return [], None
        if self.cache is None:
            self.cache = self.engine.new_cache(self.n_positions)
        common = 0
        for a, b in zip(self.cached, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one id runs, for logits
        model, device = self.engine.model, self.engine.device
        logits = model(torch.tensor([ids[common:]], device=device), common, self.cache, last_only=True)[0, -1]
        self.cached = list(ids)
        tokens, probs = [], []
        step = torch.empty((1, 1), dtype=torch.long, device=device)
        while True:
            token, q = self._choose(logits, params)
            tokens.append(token)
            if q is not None:
                probs.append(q)
            if len(tokens) == k:
                break
            step.fill_(token)
            logits = model(step, len(self.cached), self.cache)[0, -1]
            self.cached.append(token)
        return tokens, torch.stack(probs) if probs else None


def check_same_vocabulary(target, draft, where: str) -> None:
    """Raise UsageError unless two engines share vocabulary size, tokens and special ids (`where`: the draft)."""
    tc, dc = target.config, draft.config
    if tc.vocab_size != dc.vocab_size:
        raise UsageError(f"{where}: its vocabulary has {dc.vocab_size} tokens, the model's {tc.vocab_size}; "
                         "a draft needs the same tokenizer")
    if tc.bos_token_id != dc.bos_token_id or target.eos_ids != draft.eos_ids:
        raise UsageError(f"{where}: its special ids differ from the model's (bos {dc.bos_token_id} vs "
                         f"{tc.bos_token_id}, eos {sorted(draft.eos_ids)} vs {sorted(target.eos_ids)})")
    tt, dt = target.tokenizer, draft.tokenizer
    if tt is None or dt is None:
        return
    if tt.vocab_size != dt.vocab_size:
        raise UsageError(f"{where}: its tokenizer has {dt.vocab_size} tokens, the model's {tt.vocab_size}")
    for i in range(tt.vocab_size):
        if tt.id_to_piece(i) != dt.id_to_piece(i):
            raise UsageError(f"{where}: its tokenizer differs from the model's at id {i} "
                             f"({dt.id_to_piece(i)!r} vs {tt.id_to_piece(i)!r}); a draft needs the same tokenizer")


class DraftLength:
    """How many tokens to draft next: shorter after a round that kept less than half, longer after one that kept
    all (up to `k_max`); off for a while (16, then 32, 64 ... tokens) when speculative rounds cost more time per
    token than plain steps. `adaptive=False` always drafts `k_max` (tests, benchmarks of a fixed K).

    The first round, and the first after an off period, is not timed: a draft model catches up on every token it
    has not seen in it (the whole prompt, or the plain steps' tokens), a cost that later rounds do not pay (an int4
    self-draft's prefill of a 441-token prompt made every run with it turn itself off: 0.97x plain vs 1.32x)."""

    PLAIN_FIRST = 2  # plain steps that measure a step's time before the first round
    ALPHA = 0.3  # weight of the newest measurement in the running means

    def __init__(self, k_max: int, adaptive: bool = True):
        if k_max < 1:
            raise UsageError(f"--draft-tokens must be >= 1, got {k_max}")
        self.k_max, self.k, self.adaptive = k_max, k_max, adaptive
        self.plain_s: float | None = None  # running mean: seconds per plain step
        self.round_s: float | None = None  # running mean: seconds per token of a speculative round
        self.plain_steps = 0
        self.rounds = 0
        self.off_until = 0  # generated-token count before which speculation stays off
        self.backoff = 16
        self.catch_up = True  # the next round carries the draft's catch-up: not timed

    def want(self, generated: int) -> int:
        """Tokens to draft now (0: take a plain step)."""
        if not self.adaptive:
            return self.k_max
        if self.plain_steps < self.PLAIN_FIRST or generated < self.off_until:
            return 0
        return self.k

    def _mean(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.ALPHA * (new - old)

    def plain(self, seconds: float) -> None:
        """A plain step took `seconds`."""
        self.plain_steps += 1
        self.plain_s = self._mean(self.plain_s, seconds)

    def round(self, drafted: int, accepted: int, seconds: float, generated: int) -> None:
        """A round drafted `drafted` tokens, kept `accepted`, and took `seconds` (draft + verify)."""
        if not self.adaptive:
            return
        if accepted == drafted:
            self.k = min(self.k_max, self.k + 1)
        elif 2 * accepted < drafted:
            self.k = max(1, self.k - 1)
        if self.catch_up:
            self.catch_up = False
            return
        self.rounds += 1
        self.round_s = self._mean(self.round_s, seconds / (accepted + 1))
        if self.rounds >= 4 and self.plain_s is not None and self.round_s > self.plain_s:
            self.off_until = generated + self.backoff  # not paying: plain steps for a while, then try again
            self.backoff *= 2
            self.rounds, self.round_s, self.k = 0, None, max(1, self.k_max // 2)
            self.catch_up = True


class Speculator:
    """Speculative decoding on an engine with a draft: `stream` as `Engine.stream`, same events and Sequence."""

    def __init__(self, engine, draft: Draft, draft_tokens: int = DEFAULT_DRAFT_TOKENS, adaptive: bool = True):
        DraftLength(draft_tokens)  # validates --draft-tokens before anything runs
        self.engine, self.draft, self.draft_tokens, self.adaptive = engine, draft, draft_tokens, adaptive

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], request: Request = Request(), cache: KVCache | None = None,
               start_pos: int = 0) -> Iterator[Event]:
        """Generate after prompt_ids as `Engine.stream` does (same events, same Sequence), drafting and verifying."""
        engine, draft = self.engine, self.draft
        seq, cache, logits = engine.start(prompt_ids, request, cache, start_pos)
        seq.stats.draft = draft.name
        if hasattr(draft, "reset"):
            draft.reset(request.seed, cache.max_seq_len)
        length = DraftLength(self.draft_tokens, self.adaptive)
        model, device = engine.model, engine.device
        step = torch.empty((1, 1), dtype=torch.long, device=device)
        yield from seq.step(logits.float().cpu())
        while not seq.done:
            t0 = time.perf_counter()
            generated = len(seq.token_ids)
            # A round yields up to k + 1 tokens and writes k + 1 positions from seq.pos: stay within both limits.
            room = min(request.max_new_tokens - generated, cache.max_seq_len - seq.pos) - 1
            k = min(length.want(generated), room)
            drafted, probs = draft.propose(prompt_ids + seq.token_ids, k, request.sampling) if k > 0 else ([], None)
            drafted = drafted[:k]
            if not drafted:
                step.fill_(seq.last_token)
                logits = model(step, seq.pos, cache)[0, -1]
                seq.advance()
                yield from seq.step(logits.float().cpu())
                length.plain(time.perf_counter() - t0)
                continue
            tokens = torch.tensor([[seq.last_token] + drafted], device=device)
            rows = model(tokens, seq.pos, cache)[0].float().cpu()  # (k + 1, V): one row per position
            seq.advance()
            events: list[Event] = []
            accepted = 0
            for i, d in enumerate(drafted):
                token = seq.decide(rows[i], d, None if probs is None else probs[i])
                events += seq.take(rows[i], token)
                if token != d:
                    break  # the model's own token replaces the draft from here; the rest is overwritten later
                accepted += 1
                if seq.done:
                    break
                seq.advance()  # d is in the cache at its position already
            else:
                events += seq.take(rows[-1], seq.pick(rows[-1]))  # every draft kept: the next one is free
            # Counted before the round's events go out, so the Finished among them carries this round too.
            seq.stats.drafted_tokens += len(drafted)
            seq.stats.accepted_tokens += accepted
            seq.stats.verify_forwards += 1
            length.round(len(drafted), accepted, time.perf_counter() - t0, len(seq.token_ids))
            yield from events

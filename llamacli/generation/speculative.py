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
quantized copy of the model itself). `DraftLength` picks each round's k from what the run has measured (the
acceptance rate, the draft's and the verify's costs, a plain step's): the k with the most expected tokens per
second, or none for a while when no k beats plain steps.
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
    prefix it shares with the context of the next round (an earlier start_pos; nothing is undone).

    With `share_cache` (a self-draft: the same checkpoint, quantized) it has no cache of its own: it reads the
    model's, whose positions before the last token hold the model's own keys/values, and writes its drafted
    tokens' keys/values after them, where the verify forward overwrites them with the model's. So it never
    prefills the prompt nor catches up on the tokens a round kept, and it attends to exact keys/values. Exactness
    does not depend on what the draft reads: the model verifies every draft. (SmolLM2 int4 self-draft, AVX2 EPYC:
    the draft's own prefill of a 441-token prompt and one catch-up step per round made it 0.88x plain.)"""

    def __init__(self, engine, name: str = "draft-model", share_cache: bool = False):
        self.engine = engine
        self.name = name
        self.share_cache = share_cache
        self.n_positions = 0
        self.cache: KVCache | None = None
        self.cached: list[int] = []  # ids whose keys/values are in the draft's cache, in order
        self.offset = 0  # with a shared cache: the position of the first id `propose` gets
        self.generator = make_generator(None)

    def reset(self, seed: int | None, n_positions: int, cache: KVCache | None = None, start_pos: int = 0) -> None:
        """A new request on a model cache of n_positions (`cache`, whose positions from `start_pos` on are the
        request's ids): reseed, and grow the draft's cache if it is smaller (its contents are kept: the prefix
        shared with each round's context is found then), or, sharing the model's, take that cache."""
        # The draft samples with its own generator: the model's stays the one plain sampling would use.
        self.generator = make_generator(None if seed is None else (seed + 0x5DEECE66D) % 2**63)
        self.n_positions = min(n_positions, self.engine.config.context_length)
        if self.share_cache:
            if cache is None:
                raise ValueError("a draft that shares the model's cache needs it (reset(..., cache=...))")
            self.cache, self.cached, self.offset = cache, [], start_pos
            self.n_positions = min(self.n_positions + start_pos, cache.max_seq_len)
            return
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
        """Feed the ids the draft's cache lacks, then k - 1 one-token steps: k tokens (fewer at its context end).
        Sharing the model's cache, only the last id lacks its keys/values there."""
        k = min(k, self.n_positions - self.offset - len(ids))
        if k <= 0:
            return [], None
        if self.cache is None:
            self.cache = self.engine.new_cache(self.n_positions)
        if self.share_cache:
            common = len(ids) - 1  # the model's cache holds every id but the last
        else:
            common = 0
            for a, b in zip(self.cached, ids):
                if a != b:
                    break
                common += 1
            common = min(common, len(ids) - 1)  # at least one id runs, for logits
        model, device = self.engine.model, self.engine.device
        logits = model(torch.tensor([ids[common:]], device=device), self.offset + common, self.cache,
                       last_only=True)[0, -1]
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
            logits = model(step, self.offset + len(self.cached), self.cache)[0, -1]
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
    """How many tokens to draft next (0: a plain step), from a cost model measured as the run goes.

    It tracks the acceptance rate per drafted position `a` (a round that kept m of k gives m accepted positions and
    one rejection when m < k; the positions after a rejection tell nothing), the draft's seconds per drafted token,
    the verify forward's seconds per drafted position beyond a plain step, and a plain step's seconds. A round of k
    then yields E(k) = (1 - a^(k+1)) / (1 - a) tokens in time(k) = plain + k * (draft + verify extra) (the verify
    always yields one more token), and the next round drafts the k in 1..k_max with the most tokens per second.
    When even that is no faster than plain steps (after `MIN_ROUNDS` timed rounds), speculation is off for a while
    (16, then 32, 64 ... tokens) and is measured afresh after. `adaptive=False` always drafts `k_max` (tests,
    benchmarks of a fixed K).

    Why a model and not +1/-1 steps: those lost to a fixed K at high acceptance (int4 self-draft, open-ended story,
    K=4: 1.29x plain adaptive vs 1.47x fixed; one early rejection cut K for several rounds), and turned prompt
    lookup off on open-ended text where its free drafts still paid (0.98x vs 1.10x fixed).

    The first round, and the first after an off period, is not timed: a draft model catches up on every token it
    has not seen in it (the whole prompt, or the plain steps' tokens), a cost that later rounds do not pay (an int4
    self-draft's prefill of a 441-token prompt made every run with it turn itself off: 0.97x plain vs 1.32x)."""

    PLAIN_FIRST = 2  # plain steps that measure a step's time before the first round
    MIN_ROUNDS = 4  # timed rounds before the model may switch speculation off
    ALPHA = 0.3  # weight of the newest timing in the running means
    KEEP = 0.9  # weight of the past acceptance counts at each round: a memory of about ten rounds

    def __init__(self, k_max: int, adaptive: bool = True):
        if k_max < 1:
            raise UsageError(f"--draft-tokens must be >= 1, got {k_max}")
        self.k_max, self.k, self.adaptive = k_max, k_max, adaptive
        self.plain_s: float | None = None  # running mean: seconds per plain step
        self.draft_s: float | None = None  # running mean: the draft's seconds per drafted token
        self.extra_s: float | None = None  # running mean: verify seconds per drafted position beyond a plain step
        self.accepted = self.observed = 0.0  # decayed counts of accepted and observed drafted positions
        self.plain_steps = 0
        self.rounds = 0  # timed rounds since the last off period
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

    def acceptance(self) -> float | None:
        """The measured acceptance rate per drafted position (None before any round)."""
        return self.accepted / self.observed if self.observed > 0 else None

    def expected_tokens(self, k: int) -> float:
        """Tokens a round of k drafts yields on average: the kept drafts plus the verify's own token."""
        a = self.acceptance()
        return k + 1.0 if a is None or a >= 1.0 else (1.0 - a ** (k + 1)) / (1.0 - a)

    def speedup(self, k: int) -> float | None:
        """Tokens per second of rounds of k drafts over plain steps' (None until both are timed)."""
        if self.plain_s is None or self.draft_s is None or self.extra_s is None:
            return None
        seconds = self.plain_s + k * (self.draft_s + max(0.0, self.extra_s))
        return self.expected_tokens(k) * self.plain_s / seconds

    def round(self, drafted: int, accepted: int, draft_seconds: float, verify_seconds: float, generated: int) -> None:
        """A round drafted `drafted` tokens in `draft_seconds`, kept `accepted`, and its verify forward (with the
        handing out of its tokens) took `verify_seconds`; `generated` tokens are out after it."""
        if not self.adaptive:
            return
        self.accepted = self.KEEP * self.accepted + accepted
        self.observed = self.KEEP * self.observed + accepted + (accepted < drafted)
        if self.catch_up:
            self.catch_up = False
        elif self.plain_s is not None:
            self.rounds += 1
            # A verify forward does a plain step's work and more: it bounds the plain mean, which is measured only
            # in plain steps (a stalled first step on a shared 2-core machine once read 1183 ms against a 57 ms
            # verify, and every later estimate was skewed by it).
            self.plain_s = min(self.plain_s, verify_seconds)
            self.draft_s = self._mean(self.draft_s, draft_seconds / drafted)
            self.extra_s = self._mean(self.extra_s, (verify_seconds - self.plain_s) / drafted)
        gains = {k: self.speedup(k) for k in range(1, self.k_max + 1)}
        if gains[1] is None:
            return  # nothing timed yet: keep drafting k_max
        self.k = max(gains, key=gains.get)
        if self.rounds >= self.MIN_ROUNDS and gains[self.k] <= 1.0:
            self.off_until = generated + self.backoff  # not paying: plain steps for a while, then measure again
            self.backoff *= 2
            self.rounds, self.k, self.catch_up = 0, self.k_max, True
            self.accepted = self.observed = 0.0  # the text may change; the costs are the draft's and stay


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
            draft.reset(request.seed, cache.max_seq_len - start_pos, cache, start_pos)
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
            draft_seconds = time.perf_counter() - t0
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
            length.round(len(drafted), accepted, draft_seconds, time.perf_counter() - t0 - draft_seconds,
                         len(seq.token_ids))
            yield from events

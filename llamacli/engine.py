"""Generation: prefill, one-token steps through the KV cache, and a stream of events on top.

Layers (as mlx-lm): `Engine.stream` yields `TokenEvent`s then one `Finished`; `Engine.generate` collects
them; `ChatSession` keeps a conversation and its cache across turns, prefilling only what is new.
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import torch

from llamacli.errors import ContextOverflowError, UsageError
from llamacli.kv_cache import KVCache
from llamacli.model import Llama
from llamacli.request import Finished, Request, SamplingParams, Stats, TextEvent, TokenEvent  # noqa: F401
from llamacli.sampling import make_generator, sample


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


class Engine:
    """A loaded model with its tokenizer (and chat template): the object scripts hold on to."""

    def __init__(self, model: Llama, tokenizer=None, chat_template: str | None = None):
        self.model = model
        self.config = model.config
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        self.device = model.device
        self.dtype = model.dtype
        eos = set(self.config.eos_token_ids)
        if tokenizer is not None:
            eos |= set(tokenizer.eos_ids)
        self.eos_ids = frozenset(eos)

    @classmethod
    def load(cls, folder: str | Path, dtype: str = "auto", device: str = "auto",
             tokenizer: str | Path | None = None, chat_template: str | Path | None = None) -> "Engine":
        """Load model, tokenizer and chat template from a local checkpoint folder."""
        from llamacli.chat_template import load_chat_template
        from llamacli.config import load_config
        from llamacli.tokenizer import load_tokenizer
        from llamacli.weights import load_model

        folder = Path(folder)
        config = load_config(folder)
        tok = load_tokenizer(tokenizer or folder, extra_eos_ids=config.eos_token_ids)
        template = load_chat_template(folder, chat_template)
        model = load_model(folder, dtype=dtype, device=device, config=config)
        return cls(model, tok, template)

    # -- prompts ---------------------------------------------------------------------------------------

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render messages with the chat template and encode them (the template carries its own BOS)."""
        from llamacli.chat_template import render_chat
        from llamacli.errors import TokenizerError

        if self.chat_template is None:
            raise TokenizerError("this model has no chat template: pass --raw to send the prompt as it is, "
                                 "or --chat-template FILE")
        tok = self.tokenizer
        text = render_chat(self.chat_template, messages, bos_token=tok.bos_token, eos_token=tok.eos_token,
                           add_generation_prompt=add_generation_prompt)
        return tok.encode(text, add_special_tokens=False)

    def raw_ids(self, text: str) -> list[int]:
        """Encode plain text, adding BOS/EOS as the tokenizer does by default."""
        return self.tokenizer.encode(text, add_special_tokens=True)

    # -- generation ------------------------------------------------------------------------------------

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise ContextOverflowError, with the numbers, when prompt + new tokens exceed the context."""
        ctx = self.config.context_length
        if prompt_len == 0:
            raise UsageError("the prompt is empty (no tokens to start from)")
        if prompt_len + max_new_tokens > ctx:
            raise ContextOverflowError(
                f"prompt ({prompt_len} tokens) + max-new-tokens ({max_new_tokens}) = "
                f"{prompt_len + max_new_tokens} exceeds the model's context of {ctx} tokens"
            )

    def new_cache(self, n_positions: int, max_batch: int = 1) -> KVCache:
        """A cache for n_positions (capped at the context) in the model's dtype and device."""
        return KVCache(self.config, max_batch, min(n_positions, self.config.context_length),
                       dtype=self.dtype, device=self.device)

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], request: Request = Request(), cache: KVCache | None = None,
               start_pos: int = 0) -> Iterator[TextEvent | Finished]:
        """Generate after prompt_ids, yielding a TokenEvent per token and then one Finished.

        With a cache, positions [0, start_pos) must already hold prompt_ids[:start_pos]; only the rest is
        prefilled (chat turns reuse the cache this way).
        """
        n_prompt = len(prompt_ids)
        if cache is None:
            self.check_fits(n_prompt, request.max_new_tokens)
            cache = self.new_cache(n_prompt + request.max_new_tokens)
        elif n_prompt + request.max_new_tokens > cache.max_seq_len:
            raise ContextOverflowError(
                f"prompt ({n_prompt} tokens) + max-new-tokens ({request.max_new_tokens}) = "
                f"{n_prompt + request.max_new_tokens} exceeds the {cache.max_seq_len} positions available"
            )
        if not 0 <= start_pos < n_prompt:
            raise ValueError(f"start_pos {start_pos} must be inside the prompt (0..{n_prompt - 1})")
        p = request.sampling
        stats = Stats(prompt_tokens=n_prompt, prefill_tokens=n_prompt - start_pos)
        generator = None if p.greedy else make_generator(request.seed)
        seen = None
        if p.repetition_penalty != 1.0:
            seen = torch.zeros(self.config.vocab_size, dtype=torch.bool)
            seen[torch.tensor(prompt_ids)] = True
        stop_ids = frozenset() if request.ignore_eos else self.eos_ids
        decoder = self.tokenizer.stream_decoder(skip_special_tokens=True) if self.tokenizer else None
        matcher = StopMatcher(request.stop)
        out_ids: list[int] = []
        logprobs: list[float] | None = [] if request.logprobs else None
        text_parts: list[str] = []

        t0 = time.perf_counter()
        tokens = torch.tensor([prompt_ids[start_pos:]], device=self.device)
        logits = self.model(tokens, start_pos, cache, last_only=True)[0, -1]
        pos = n_prompt
        step = torch.empty((1, 1), dtype=torch.long, device=self.device)
        reason = "length"
        t_first = None
        while True:
            row = logits.float().cpu()
            token = sample(row, p, generator, seen)
            if t_first is None:
                t_first = time.perf_counter()
                stats.prefill_s = stats.ttft_s = t_first - t0
            out_ids.append(token)
            lp = None
            if logprobs is not None:
                lp = float(torch.log_softmax(row, dim=-1)[token])
                logprobs.append(lp)
            if seen is not None:
                seen[token] = True
            stopped = token in stop_ids
            piece = "" if (stopped or decoder is None) else decoder.add(token)
            piece, hit = matcher.feed(piece)
            text_parts.append(piece)
            yield TokenEvent(text=piece, token_id=token, logprob=lp)
            if stopped or hit:
                reason = "stop"
                break
            if len(out_ids) >= request.max_new_tokens:
                break
            step.fill_(token)
            logits = self.model(step, pos, cache)[0, -1]
            pos += 1
        tail = ""
        if not hit:  # after a stop string, everything past it is dropped
            tail, hit = matcher.feed(decoder.flush() if decoder is not None else "")
            if not hit:
                tail += matcher.flush()
            elif reason == "length":
                reason = "stop"
        stats.generated_tokens = len(out_ids)
        stats.decode_s = time.perf_counter() - t_first
        if tail:
            yield TextEvent(tail)
            text_parts.append(tail)
        yield Finished(reason, "".join(text_parts), out_ids, logprobs, stats)

    def generate(self, prompt_ids: list[int], request: Request = Request()) -> Finished:
        """Run `stream` to the end and return its Finished event."""
        for event in self.stream(prompt_ids, request):
            if isinstance(event, Finished):
                return event
        raise AssertionError("stream ended without Finished")

    def stream_batch(self, items: Iterable[tuple[object, list[int], Request]],
                     batch_size: int = 8) -> Iterator[tuple[object, Finished]]:
        """Generate for many (key, prompt_ids, request) with continuous batching (see `BatchDecoder`)."""
        return BatchDecoder(self, batch_size).run(items)


class ChatSession:
    """A conversation whose KV cache lives across turns: each turn prefills only ids new since the cache."""

    def __init__(self, engine: Engine, system: str | None = None, max_context: int | None = None):
        self.engine = engine
        self.system = system
        self.messages: list[dict] = []
        self.n_positions = min(max_context or engine.config.context_length, engine.config.context_length)
        self.cache: KVCache | None = None
        self.cached_ids: list[int] = []  # ids whose keys/values are in the cache, in order

    def reset(self) -> None:
        """Forget the conversation and the cache contents."""
        self.messages = []
        self.cached_ids = []

    def set_system(self, system: str | None) -> None:
        """Change the system message (the next turn re-prefills from where the prompt differs)."""
        self.system = system

    def prompt_ids(self, user_text: str) -> list[int]:
        """Ids of the whole conversation plus a new user turn, ready for the assistant's reply."""
        msgs = ([{"role": "system", "content": self.system}] if self.system else []) + self.messages
        return self.engine.chat_ids(msgs + [{"role": "user", "content": user_text}])

    def turn(self, user_text: str, request: Request = Request()) -> Iterator[TextEvent | Finished]:
        """Add a user message and stream the assistant's reply; the reply joins the history when done."""
        ids = self.prompt_ids(user_text)
        need = len(ids) + request.max_new_tokens
        if need > self.n_positions:
            raise ContextOverflowError(
                f"the conversation needs {len(ids)} tokens + max-new-tokens {request.max_new_tokens} = {need}, "
                f"over the context of {self.n_positions}: use /reset to start over"
            )
        if self.cache is None:
            self.cache = self.engine.new_cache(self.n_positions)
        common = 0
        for a, b in zip(self.cached_ids, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one token must run to get logits
        # Until this turn completes, only the shared prefix is known to be in the cache (an interrupted turn
        # may have overwritten what followed it).
        self.cached_ids = ids[:common]
        for event in self.engine.stream(ids, request, cache=self.cache, start_pos=common):
            if isinstance(event, Finished):
                # Recorded before Finished is handed out, so a caller that stops reading there loses nothing.
                self.messages.append({"role": "user", "content": user_text})
                self.messages.append({"role": "assistant", "content": event.text})
                # The last sampled token was never fed to the model, so its keys/values are not in the cache.
                self.cached_ids = ids + event.token_ids[:-1]
            yield event


# =============================================================================================================
# Batched decoding (issue 5): continuous batching of many prompts through one preallocated KV cache.
#
# Each slot is a row of the cache. Every step is one forward over the weights: the active slots advance one
# token each (per-row positions; the model's mask hides each row's stale cache entries) and, in the same pass,
# waiting prompts are prefilled into free slots (`Llama.forward_last` with one part per contiguous run of
# decoding rows and one per new prompt). Decoding is bound by reading the weights, prefill by arithmetic, so
# the decoding rows ride along with a prefill almost for free instead of waiting for it. Rows sample with their
# own generator and stop on their own (eos ids, stop strings, their max_new_tokens); a finished slot takes the
# next waiting prompt in the next step, and once none is left the last active row moves into the hole so the
# active rows stay 0..n-1 (one attention call per layer). A prefix every prompt shares (a system prompt, a
# few-shot header) is prefilled once; each new row copies its keys/values and prefills only the rest.
# =============================================================================================================


class _Row:
    """One prompt being generated for in a batch slot: the per-row half of `Engine.stream`'s loop."""

    def __init__(self, engine: Engine, key, prompt_ids: list[int], request: Request):
        self.key = key
        self.request = request
        self.params = request.sampling
        # The greedy rows without a repetition penalty take a batched argmax; the others go through `sample`.
        self.plain_greedy = self.params.greedy and self.params.repetition_penalty == 1.0
        self.generator = None if self.params.greedy else make_generator(request.seed)
        self.seen = None
        if self.params.repetition_penalty != 1.0:
            self.seen = torch.zeros(engine.config.vocab_size, dtype=torch.bool)
            self.seen[torch.tensor(prompt_ids)] = True
        self.stop_ids = frozenset() if request.ignore_eos else engine.eos_ids
        tok = engine.tokenizer
        self.decoder = tok.stream_decoder(skip_special_tokens=True) if tok is not None else None
        self.matcher = StopMatcher(request.stop)
        self.out_ids: list[int] = []
        self.logprobs: list[float] | None = [] if request.logprobs else None
        self.text_parts: list[str] = []
        self.stats = Stats(prompt_tokens=len(prompt_ids), prefill_tokens=len(prompt_ids))
        self.pos = len(prompt_ids)  # where the last sampled token goes when it is fed back
        self.reason: str | None = None  # set when the row is done
        self.hit = False
        self.t0 = time.perf_counter()
        self.t_first = 0.0

    def pick(self, row: torch.Tensor, greedy_token: int | None) -> int:
        """The next token from this row's fp32 logits (V,); greedy_token is the batched argmax, if computed."""
        if self.plain_greedy and greedy_token is not None:
            return greedy_token
        return sample(row, self.params, self.generator, self.seen)

    def accept(self, token: int, logprob: float | None) -> bool:
        """Record a sampled token; return True when the row is done (and then `reason` is set)."""
        if not self.out_ids:
            self.t_first = time.perf_counter()
            self.stats.prefill_s = self.stats.ttft_s = self.t_first - self.t0
        self.out_ids.append(token)
        if self.logprobs is not None:
            self.logprobs.append(logprob)
        if self.seen is not None:
            self.seen[token] = True
        stopped = token in self.stop_ids
        piece = "" if (stopped or self.decoder is None) else self.decoder.add(token)
        piece, self.hit = self.matcher.feed(piece)
        self.text_parts.append(piece)
        if stopped or self.hit:
            self.reason = "stop"
        elif len(self.out_ids) >= self.request.max_new_tokens:
            self.reason = "length"
        return self.reason is not None

    def finish(self) -> Finished:
        """The Finished event, with the text the decoder and stop matcher held back (as `Engine.stream`)."""
        if not self.hit:  # after a stop string, everything past it is dropped
            tail, hit = self.matcher.feed(self.decoder.flush() if self.decoder is not None else "")
            if not hit:
                tail += self.matcher.flush()
            elif self.reason == "length":
                self.reason = "stop"
            self.text_parts.append(tail)
        self.stats.generated_tokens = len(self.out_ids)
        self.stats.decode_s = time.perf_counter() - self.t_first
        return Finished(self.reason, "".join(self.text_parts), self.out_ids, self.logprobs, self.stats)


PREFILL_TOKENS_PER_STEP = 2048  # prompt tokens one batch step may prefill beside its decoding rows
SHARED_PREFIX_MIN = 16  # a prefix all prompts share is prefilled once when it is at least this long


class BatchDecoder:
    """Continuous batching over one engine: `run(items)` yields (key, Finished) for each item as it finishes."""

    def __init__(self, engine: Engine, batch_size: int = 8):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UsageError(f"batch-size must be an integer >= 1, got {batch_size!r}")
        self.engine = engine
        self.batch_size = batch_size
        self.steps = 0  # forwards run, each decoding the active rows and prefilling new ones (tests, benchmarks)
        self._prefix: tuple[int, KVCache | None] = (0, None)  # the shared prompt prefix of the current run
        self.max_active = 0  # the most rows decoded together in one step

    @property
    def shared_prefix_tokens(self) -> int:
        """Prompt tokens every item of the current (or last) run shares, prefilled once; 0 when none."""
        return self._prefix[0]

    @torch.inference_mode()
    def run(self, items: Iterable[tuple[object, list[int], Request]]) -> Iterator[tuple[object, Finished]]:
        """Generate for every (key, prompt_ids, request); yield (key, Finished) in the order rows finish.

        Every item is checked against the context first (ContextOverflowError before anything runs); the
        cache is sized batch_size x the longest prompt + max_new_tokens over the items.
        """
        engine = self.engine
        waiting = deque(items)
        if not waiting:
            return
        for _, ids, req in waiting:
            engine.check_fits(len(ids), req.max_new_tokens)
        n_positions = max(len(ids) + req.max_new_tokens for _, ids, req in waiting)
        max_batch = min(self.batch_size, len(waiting))
        cache = engine.new_cache(n_positions, max_batch=max_batch)
        slots: list[_Row | None] = [None] * max_batch  # slot i = cache row i; None = free
        self._prefix = self._prefill_shared_prefix([ids for _, ids, _ in waiting])

        while True:
            new = self._plan_admissions(slots, waiting)
            if not new and not any(slots):
                break
            for i in self._step(slots, new, cache):
                row, slots[i] = slots[i], None
                yield row.key, row.finish()
            if not waiting:  # nothing left to fill holes with: keep the active rows contiguous
                self._compact(slots, cache)

    def _prefill_shared_prefix(self, prompts: list[list[int]]) -> tuple[int, KVCache | None]:
        """(length, keys/values) of the prefix every prompt shares, prefilled once; (0, None) when there is no
        such prefix of SHARED_PREFIX_MIN tokens. Each prompt keeps at least its last token to prefill (its
        logits give the first new token)."""
        cfg = self.engine.config
        if len(prompts) < 2:
            return 0, None
        if cfg.rope_type == "dynamic" and max(len(ids) for ids in prompts) > cfg.max_seq_len:
            return 0, None  # past the context, dynamic NTK rotates by the whole prompt's length: no reuse
        n = min(len(ids) for ids in prompts) - 1
        first = prompts[0]
        for ids in prompts[1:]:
            n = next((j for j in range(n) if ids[j] != first[j]), n)
            if n < SHARED_PREFIX_MIN:
                return 0, None
        cache = self.engine.new_cache(n)
        self.engine.model(torch.tensor([first[:n]], device=self.engine.device), 0, cache, last_only=True)
        return n, cache

    def _plan_admissions(self, slots: list[_Row | None], waiting: deque) -> dict[int, tuple]:
        """Take waiting items for free slots, lowest first, up to PREFILL_TOKENS_PER_STEP tokens to prefill
        (always at least one, however long)."""
        new: dict[int, tuple] = {}
        tokens = 0
        for i, row in enumerate(slots):
            if row is not None or not waiting:
                continue
            n = len(waiting[0][1]) - self._prefix[0]  # the shared prefix is not prefilled again
            if new and tokens + n > PREFILL_TOKENS_PER_STEP:
                break
            new[i] = waiting.popleft()
            tokens += n
        return new

    def _step(self, slots: list[_Row | None], new: dict[int, tuple], cache: KVCache) -> list[int]:
        """One forward: decode every active row and prefill the new items into their slots; return the slots
        whose rows finished."""
        engine = self.engine
        device = engine.device
        order: list[tuple[int, _Row, bool]] = []  # (slot, row, is_new) in the order of the logits rows
        parts = []
        run: list[int] = []  # a contiguous run of decoding slots, forming one part

        def close_run() -> None:
            if run:
                positions = [slots[i].pos for i in run]
                tokens = torch.tensor([[slots[i].out_ids[-1]] for i in run], device=device)  # (n, 1)
                # Rows all at one position need no mask (and then match a single-row forward bit for bit).
                start = (positions[0] if min(positions) == max(positions)
                         else torch.tensor(positions, device=device))
                parts.append((tokens, start, cache.rows(run[0], run[-1] + 1)))
                order.extend((i, slots[i], False) for i in run)
                run.clear()

        for i, row in enumerate(slots):
            if row is not None:
                run.append(i)
                continue
            close_run()
            if i in new:
                key, ids, req = new[i]
                row = _Row(engine, key, ids, req)
                n, prefix = self._prefix
                if prefix is not None:  # the shared prefix's keys/values are computed: copy, prefill the rest
                    cache.copy_prefix(i, prefix, 0, n)
                    row.stats.prefill_tokens = len(ids) - n
                order.append((i, row, True))
                parts.append((torch.tensor([ids[n:]], device=device), n, cache.rows(i, i + 1)))
        close_run()

        self.steps += 1
        self.max_active = max(self.max_active, len(order))
        logits = engine.model.forward_last(parts).float().cpu()  # (rows, V)
        greedy = None
        if any(r.plain_greedy for _, r, _ in order):
            greedy = torch.argmax(logits, dim=-1).tolist()
        logprobs = torch.log_softmax(logits, dim=-1) if any(r.logprobs is not None for _, r, _ in order) else None
        done = []
        for j, (i, row, is_new) in enumerate(order):
            token = row.pick(logits[j], greedy[j] if greedy is not None else None)
            lp = float(logprobs[j, token]) if row.logprobs is not None else None
            if is_new:
                slots[i] = row
            else:
                row.pos += 1
            if row.accept(token, lp):
                done.append(i)
        return done

    def _compact(self, slots: list[_Row | None], cache: KVCache) -> None:
        """Move the last active rows into the holes before them, so the active rows are slots 0..n-1."""
        while True:
            holes = [i for i, r in enumerate(slots) if r is None]
            last = max((i for i, r in enumerate(slots) if r is not None), default=-1)
            if not holes or holes[0] > last:
                return
            cache.move_row(last, holes[0], slots[last].pos)
            slots[holes[0]], slots[last] = slots[last], None

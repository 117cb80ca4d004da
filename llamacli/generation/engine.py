"""The engine: a loaded model with its tokenizer and chat template, and single-prompt generation on it.

Layers (as mlx-lm): `Engine.stream` prefills the prompt, then feeds one token at a time through the KV cache,
and yields the events its `Sequence` makes of each step (a `TokenEvent` per token, then one `Finished`);
`Engine.generate` collects them. Many prompts at once go through `Scheduler` (`Engine.stream_batch`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, Iterator

import torch

from llamacli import prompts
from llamacli.kv_cache import KVCache
from llamacli.request import Event, Finished, Request
from llamacli.generation.sequence import Sequence


class Engine:
    """A loaded model with its tokenizer (and chat template): the object scripts hold on to."""

    def __init__(self, model, tokenizer=None, chat_template: str | None = None):
        self.model = model  # a model.Runtime (or the reference model.Llama): same call surface
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
             tokenizer: str | Path | None = None, chat_template: str | Path | None = None,
             **model_options) -> "Engine":
        """Load model, tokenizer and chat template from a local checkpoint folder; `model_options` go to
        `weights.load_model` (quantize, group_size, shard)."""
        from llamacli.chat_template import load_chat_template
        from llamacli.config import load_config
        from llamacli.tokenizer import load_tokenizer
        from llamacli.weights import load_model

        folder = Path(folder)
        config = load_config(folder)
        tok = load_tokenizer(tokenizer or folder, extra_eos_ids=config.eos_token_ids)
        template = load_chat_template(folder, chat_template)
        model = load_model(folder, dtype=dtype, device=device, config=config, **model_options)
        return cls(model, tok, template)

    # -- prompts ---------------------------------------------------------------------------------------

    def chat_ids(self, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
        """Render messages with the chat template and encode them (checked against the model: `prompts`)."""
        return prompts.encode_chat(self.tokenizer, self.chat_template, messages, add_generation_prompt,
                                   config=self.config)

    def raw_ids(self, text: str) -> list[int]:
        """Encode plain text, adding BOS/EOS as the tokenizer does by default."""
        return prompts.encode_raw(self.tokenizer, text, config=self.config)

    def check_fits(self, prompt_len: int, max_new_tokens: int) -> None:
        """Raise ContextOverflowError, with the numbers, when prompt + new tokens exceed the model's context."""
        prompts.check_fits(prompt_len, max_new_tokens, self.config.context_length)

    # -- generation ------------------------------------------------------------------------------------

    def new_cache(self, n_positions: int, max_batch: int = 1) -> KVCache:
        """A cache for n_positions (capped at the context) in the model's dtype and device."""
        return KVCache(self.config, max_batch, min(n_positions, self.config.context_length),
                       dtype=self.dtype, device=self.device)

    def sequence(self, prompt_ids: list[int], request: Request, prefill_tokens: int | None = None,
                 started_at: float | None = None) -> Sequence:
        """A fresh token state machine for one request on this engine (its eos ids, tokenizer, vocabulary)."""
        return Sequence(prompt_ids, request, eos_ids=self.eos_ids, vocab_size=self.config.vocab_size,
                        tokenizer=self.tokenizer, prefill_tokens=prefill_tokens, started_at=started_at)

    @torch.inference_mode()
    def stream(self, prompt_ids: list[int], request: Request = Request(), cache: KVCache | None = None,
               start_pos: int = 0) -> Iterator[Event]:
        """Generate after prompt_ids, yielding a TokenEvent per token and then one Finished.

        With a cache, positions [0, start_pos) must already hold prompt_ids[:start_pos]; only the rest is
        prefilled (chat turns reuse the cache this way).
        """
        seq, cache, logits = self.start(prompt_ids, request, cache, start_pos)
        step = torch.empty((1, 1), dtype=torch.long, device=self.device)
        while True:
            yield from seq.step(logits.float().cpu())
            if seq.done:
                return
            step.fill_(seq.last_token)
            logits = self.model(step, seq.pos, cache)[0, -1]
            seq.advance()

    def start(self, prompt_ids: list[int], request: Request, cache: KVCache | None = None,
              start_pos: int = 0) -> tuple[Sequence, KVCache, torch.Tensor]:
        """Check the context, prefill prompt_ids[start_pos:]: (the sequence, the cache, the last logits (V,))."""
        n_prompt = len(prompt_ids)
        if cache is None:
            self.check_fits(n_prompt, request.max_new_tokens)
            cache = self.new_cache(n_prompt + request.max_new_tokens)
        else:
            prompts.check_fits(n_prompt, request.max_new_tokens, cache.max_seq_len, "the cache's context")
        if not 0 <= start_pos < n_prompt:
            raise ValueError(f"start_pos {start_pos} must be inside the prompt (0..{n_prompt - 1})")
        seq = self.sequence(prompt_ids, request, prefill_tokens=n_prompt - start_pos)
        tokens = torch.tensor([prompt_ids[start_pos:]], device=self.device)
        return seq, cache, self.model(tokens, start_pos, cache, last_only=True)[0, -1]

    def generate(self, prompt_ids: list[int], request: Request = Request()) -> Finished:
        """Run `stream` to the end and return its Finished event."""
        for event in self.stream(prompt_ids, request):
            if isinstance(event, Finished):
                return event
        raise AssertionError("stream ended without Finished")

    def stream_batch(self, items: Iterable[tuple[object, list[int], Request]],
                     batch_size: int = 8) -> Iterator[tuple[object, Finished]]:
        """Generate for many (key, prompt_ids, request) with continuous batching; (key, Finished) as rows end."""
        from llamacli.generation.scheduler import generate_batch

        return generate_batch(self, items, batch_size)

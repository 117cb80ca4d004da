"""A conversation whose KV cache lives across turns: each turn prefills only the ids new since the cache.

The history and its policy (system message, dropping the oldest turn) are `prompts.Conversation`, shared with
the other front ends; this module adds the cache and the prefix bookkeeping.
"""

from __future__ import annotations

from typing import Iterator

from llamacli import prompts
from llamacli.kv_cache import KVCache
from llamacli.request import Event, Finished, Request


MIN_POSITIONS = 256  # the first cache holds at least this many positions (room for a few short turns)


class ChatSession:
    """A conversation on an engine, with one KV cache of at most `max_context` positions (the model's context by
    default), allocated as the conversation grows."""

    def __init__(self, engine, system: str | None = None, max_context: int | None = None, stream=None):
        self.engine = engine
        self.stream = stream or engine.stream  # how a turn decodes: `Engine.stream`'s signature (a Speculator's)
        self.conversation = prompts.Conversation(system=system)
        self.n_positions = min(max_context or engine.config.context_length, engine.config.context_length)
        self.cache: KVCache | None = None
        self.cached_ids: list[int] = []  # ids whose keys/values are in the cache, in order

    @property
    def system(self) -> str | None:
        """The system message (None: none)."""
        return self.conversation.system

    @property
    def messages(self) -> list[dict]:
        """The finished turns as chat messages (after the system message, if any)."""
        return self.conversation.messages()

    def reset(self) -> None:
        """Forget the conversation and the cache contents."""
        self.conversation.reset()
        self.cached_ids = []

    def set_system(self, system: str | None) -> None:
        """Change the system message (the next turn re-prefills from where the prompt differs)."""
        self.conversation.system = system

    def prompt_ids(self, user_text: str) -> list[int]:
        """Ids of the whole conversation plus a new user turn, ready for the assistant's reply."""
        return self.engine.chat_ids(self.conversation.messages(user_text))

    def _reserve(self, need: int) -> None:
        """Make the cache hold `need` positions: it starts at what the first turn needs (never the whole context
        up front: 34 GB for Llama-3.1-8B's 131072 positions in fp32) and at least doubles when a turn needs
        more, up to `n_positions`, keeping the keys/values of the ids already cached."""
        if self.cache is not None and self.cache.max_seq_len >= need:
            return
        old = self.cache
        size = min(self.n_positions, max(need, 2 * old.max_seq_len if old is not None else MIN_POSITIONS))
        cache = self.engine.new_cache(size)
        if old is not None and self.cached_ids:
            cache.copy_prefix(0, old, 0, len(self.cached_ids))
        self.cache = cache

    def turn(self, user_text: str, request: Request = Request()) -> Iterator[Event]:
        """Add a user message and stream the assistant's reply; the turn joins the history when it finishes.

        ContextOverflowError (before anything runs) when the conversation no longer fits: the caller decides
        what to drop (`conversation.drop_oldest()`) or to `reset()`.
        """
        ids = self.prompt_ids(user_text)
        prompts.check_fits(len(ids), request.max_new_tokens, self.n_positions, "the conversation's context")
        self._reserve(len(ids) + request.max_new_tokens)
        common = 0
        for a, b in zip(self.cached_ids, ids):
            if a != b:
                break
            common += 1
        common = min(common, len(ids) - 1)  # at least one token must run to get logits
        # Until this turn completes, only the shared prefix is known to be in the cache (an interrupted turn
        # may have overwritten what followed it).
        self.cached_ids = ids[:common]
        for event in self.stream(ids, request, cache=self.cache, start_pos=common):
            if isinstance(event, Finished):
                # Recorded before Finished is handed out, so a caller that stops reading there loses nothing.
                self.conversation.record(user_text, event.text)
                # The last sampled token was never fed to the model, so its keys/values are not in the cache.
                self.cached_ids = ids + event.token_ids[:-1]
            yield event

"""Prompt and request policy shared by every front end (CLI, batch files, the server): messages and raw
text -> token ids, the system-message rule, sampling defaults from `generation_config.json`, the
`max_new_tokens` default and cap, the one context check, and a conversation's history. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llamacli.errors import ContextOverflowError, TokenizerError, UsageError
from llamacli.request import SamplingParams
from llamacli.text import check_text

DEFAULT_MAX_NEW_TOKENS = 256
# Text longer than this many bytes per position of the context cannot fit, so it is refused before it is
# tokenized (which takes hundreds of bytes of memory per byte). Generous: tokens average 3-5 bytes, the longest
# (runs of spaces or dashes in code vocabularies) a few dozen.
MAX_BYTES_PER_TOKEN = 64


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """`messages` after a system message, unless `system` is None or empty or the messages start with one."""
    if not system or (messages and messages[0].get("role") == "system"):
        return list(messages)
    return [{"role": "system", "content": system}, *messages]


def user_messages(text: str, system: str | None = None) -> list[dict]:
    """The messages of a single user prompt (after the system message, if any)."""
    return with_system([{"role": "user", "content": text}], system)


def check_text_size(text: str, context_length: int, what: str = "the prompt") -> None:
    """ContextOverflowError, with both numbers, when `text` is longer than a context of `context_length`
    positions can use (MAX_BYTES_PER_TOKEN bytes each); checked before tokenizing."""
    limit = MAX_BYTES_PER_TOKEN * context_length
    if len(text) * 4 > limit and len(text.encode("utf-8", "surrogatepass")) > limit:
        raise ContextOverflowError(
            f"{what} is {len(text.encode('utf-8', 'surrogatepass')):,} bytes, more than the model's context of "
            f"{context_length:,} tokens can hold (at most {limit:,} bytes: {MAX_BYTES_PER_TOKEN} per token)")


def check_ids(ids: list[int], vocab_size: int, what: str = "the prompt") -> None:
    """TokenizerError, with the numbers, when the tokenizer gave an id the model has no embedding for."""
    bad = max(ids, default=-1)
    if bad >= vocab_size:
        raise TokenizerError(f"the tokenizer encoded {what} with token id {bad}, beyond the model's vocabulary of "
                             f"{vocab_size} (config.json vocab_size): the tokenizer does not belong to this model")


def _encode(tokenizer, text: str, add_special_tokens: bool, config) -> list[int]:
    # The one way text becomes prompt ids: valid text, a size the context can use, ids the model has.
    check_text(text, "the prompt")
    if config is not None:
        check_text_size(text, config.context_length)
    ids = tokenizer.encode(text, add_special_tokens=add_special_tokens)
    if config is not None:
        check_ids(ids, config.vocab_size)
    return ids


def encode_chat(tokenizer, template: str | None, messages: list[dict], add_generation_prompt: bool = True, *,
                config=None) -> list[int]:
    """Render messages with the chat template and encode them (the template carries its own BOS). With the
    model's `config`, text too long for its context and ids beyond its vocabulary are refused."""
    from llamacli.chat_template import render_chat

    if template is None:
        raise TokenizerError("this model has no chat template: send the prompt raw, or give a chat template file")
    for m in messages:
        if isinstance(m, dict) and isinstance(m.get("content"), str) and config is not None:
            check_text_size(m["content"], config.context_length, f"a {m.get('role', 'chat')} message")
    text = render_chat(template, messages, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                       add_generation_prompt=add_generation_prompt)
    return _encode(tokenizer, text, False, config)


def encode_raw(tokenizer, text: str, *, config=None) -> list[int]:
    """Encode plain text, adding BOS/EOS as the tokenizer does by default (checked as `encode_chat` with config)."""
    return _encode(tokenizer, text, True, config)


def encode_prompt(tokenizer, template: str | None, *, prompt: str | None = None, messages: list[dict] | None = None,
                  system: str | None = None, raw: bool = False, config=None) -> list[int]:
    """Token ids of one prompt: `messages` (always templated) or a `prompt` (a user message, or as it is
    with `raw`), after `system` when given. A system message with a raw prompt is a UsageError."""
    if messages is not None:
        return encode_chat(tokenizer, template, with_system(messages, system), config=config)
    if raw:
        if system:
            raise UsageError("a system message needs the chat template; it cannot be used with a raw prompt")
        return encode_raw(tokenizer, prompt, config=config)
    return encode_chat(tokenizer, template, user_messages(prompt, system), config=config)


def sampling_params(generation: dict, temperature=None, top_k=None, top_p=None, min_p=None,
                    repetition_penalty=None) -> SamplingParams:
    """Explicit values win; unset ones come from generation_config.json when it asks to sample (as
    transformers does), else sampling is off (greedy)."""
    samples = generation.get("do_sample") is True

    def pick(value, key, off):
        if value is not None:
            return value
        if samples and generation.get(key) is not None:
            return generation[key]
        return off

    temperature = pick(temperature, "temperature", 1.0 if samples else 0.0)
    return SamplingParams(temperature=float(temperature), top_k=int(pick(top_k, "top_k", 0)),
                          top_p=float(pick(top_p, "top_p", 1.0)), min_p=float(pick(min_p, "min_p", 0.0)),
                          repetition_penalty=float(repetition_penalty if repetition_penalty is not None
                                                   else generation.get("repetition_penalty") or 1.0))


def default_max_new_tokens(generation: dict, room: int | None = None) -> int:
    """256 (or generation_config's max_new_tokens), capped to `room` positions left in the context (at least 1)."""
    wanted = int(generation.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
    return wanted if room is None else max(1, min(wanted, room))


def check_fits(prompt_len: int, max_new_tokens: int, limit: int, where: str = "the model's context") -> None:
    """The context check: raise ContextOverflowError, with the numbers, when prompt + new tokens exceed
    `limit` positions (`where` names them: the model's context, or what a cache or conversation keeps)."""
    if prompt_len == 0:
        raise UsageError("the prompt is empty (no tokens to start from)")
    if prompt_len + max_new_tokens > limit:
        raise ContextOverflowError(
            f"prompt ({prompt_len} tokens) + max-new-tokens ({max_new_tokens}) = {prompt_len + max_new_tokens} "
            f"exceeds {where} of {limit} tokens"
        )


@dataclass
class Conversation:
    """A chat's history: the system message and the finished user/assistant turns."""

    system: str | None = None
    turns: list[tuple[str, str]] = field(default_factory=list)  # (user text, assistant reply)

    def messages(self, user_text: str | None = None) -> list[dict]:
        """The whole conversation, plus a new user turn when given."""
        msgs: list[dict] = []
        for user, reply in self.turns:
            msgs += [{"role": "user", "content": user}, {"role": "assistant", "content": reply}]
        if user_text is not None:
            msgs.append({"role": "user", "content": user_text})
        return with_system(msgs, self.system)

    def record(self, user_text: str, reply: str) -> None:
        """Add a finished turn."""
        self.turns.append((user_text, reply))

    def drop_oldest(self) -> bool:
        """Forget the oldest turn to make room (the policy when the context is full); False if none is left."""
        if not self.turns:
            return False
        del self.turns[0]
        return True

    def reset(self) -> None:
        """Forget every turn (the system message stays)."""
        self.turns.clear()

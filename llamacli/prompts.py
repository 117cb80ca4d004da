"""Prompt and request policy shared by every front end (CLI, batch files, the server): messages and raw
text -> token ids, the system-message rule, sampling defaults from `generation_config.json`, the
`max_new_tokens` default and cap, the one context check, and a conversation's history. No torch here.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from llamacli.errors import ContextOverflowError, TokenizerError, UsageError
from llamacli.request import SamplingParams

DEFAULT_MAX_NEW_TOKENS = 256


def with_system(messages: list[dict], system: str | None) -> list[dict]:
    """`messages` after a system message, unless `system` is None or empty or the messages start with one."""
    if not system or (messages and messages[0].get("role") == "system"):
        return list(messages)
    return [{"role": "system", "content": system}, *messages]


def user_messages(text: str, system: str | None = None) -> list[dict]:
    """The messages of a single user prompt (after the system message, if any)."""
    return with_system([{"role": "user", "content": text}], system)


def encode_chat(tokenizer, template: str | None, messages: list[dict], add_generation_prompt: bool = True) -> list[int]:
    """Render messages with the chat template and encode them (the template carries its own BOS)."""
    from llamacli.chat_template import render_chat

    if template is None:
        raise TokenizerError("this model has no chat template: send the prompt raw, or give a chat template file")
    text = render_chat(template, messages, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token,
                       add_generation_prompt=add_generation_prompt)
    return tokenizer.encode(text, add_special_tokens=False)


def encode_raw(tokenizer, text: str) -> list[int]:
    """Encode plain text, adding BOS/EOS as the tokenizer does by default."""
    return tokenizer.encode(text, add_special_tokens=True)


def encode_prompt(tokenizer, template: str | None, *, prompt: str | None = None, messages: list[dict] | None = None,
                  system: str | None = None, raw: bool = False) -> list[int]:
    """Token ids of one prompt: `messages` (always templated) or a `prompt` (a user message, or as it is
    with `raw`), after `system` when given. A system message with a raw prompt is a UsageError."""
    if messages is not None:
        return encode_chat(tokenizer, template, with_system(messages, system))
    if raw:
        if system:
            raise UsageError("a system message needs the chat template; it cannot be used with a raw prompt")
        return encode_raw(tokenizer, prompt)
    return encode_chat(tokenizer, template, user_messages(prompt, system))


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

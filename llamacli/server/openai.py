"""The OpenAI API as data, and nothing else: request schemas (pydantic, validated by the library; an unknown
field is an error that names it), OpenAI fields -> (messages or prompt, `Request`s), events -> response and
stream-chunk dicts, and errors in OpenAI's shape. No HTTP, no torch: the app serves what this module builds.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, replace
from typing import Callable, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from llamacli import prompts
from llamacli.errors import LlamaCliError
from llamacli.request import MAX_TOP_LOGPROBS, Finished, Request

MAX_COMPLETION_LOGPROBS = 5  # the legacy completions API's limit on `logprobs`


# -- errors ------------------------------------------------------------------------------------------------------


class ApiError(Exception):
    """An error answered as OpenAI does: an HTTP status and {"error": {message, type, param, code}}."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code
        self.headers = headers or {}

    def body(self) -> dict:
        """The JSON body of the error response."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(exc: LlamaCliError, param: str | None = None) -> ApiError:
    """A domain error about the request (bad value, context overflow) as a 400 naming the field."""
    return ApiError(400, " ".join(str(exc).split()), param=param,
                    code="context_length_exceeded" if "exceeds" in str(exc) else None)


def from_validation(exc: ValidationError) -> ApiError:
    """pydantic's first complaint as a 400: malformed JSON, an unsupported field, or a field's bad value."""
    err = exc.errors()[0]
    loc = [str(p) for p in err.get("loc", ())]
    param = ".".join(loc) or None
    if err["type"] == "json_invalid":
        return ApiError(400, f"malformed JSON: {err['msg']}", code="invalid_json")
    if err["type"] == "extra_forbidden":
        return ApiError(400, f"unsupported field {param!r}: this server does not implement it", param=param,
                        code="unsupported_field")
    if err["type"] == "missing":
        return ApiError(400, f"missing required field {param!r}", param=param)
    where = f"field {param!r}: " if param else "request body: "
    return ApiError(400, where + err["msg"], param=param)


def parse(schema: type[BaseModel], body: bytes) -> BaseModel:
    """Validate a JSON body against a schema; ApiError 400 when it does not fit."""
    try:
        return schema.model_validate_json(body)
    except ValidationError as exc:
        raise from_validation(exc) from None


# -- request schemas ---------------------------------------------------------------------------------------------


class Strict(BaseModel):
    """A schema that refuses fields it does not define (never silently dropped)."""

    model_config = ConfigDict(extra="forbid")


class StreamOptions(Strict):
    include_usage: bool = False


class TextPart(Strict):
    type: Literal["text"]
    text: str


class Message(Strict):
    role: Literal["system", "developer", "user", "assistant"]
    content: Union[str, list[TextPart], None] = None
    name: str | None = None

    def as_dict(self) -> dict:
        """The message as the chat template reads it (text parts joined; `developer` is OpenAI's system)."""
        content = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content or [])
        return {"role": "system" if self.role == "developer" else self.role, "content": content}


class GenerationFields(Strict):
    """The fields both completion endpoints share."""

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0)
    min_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stop: Union[str, list[str], None] = None
    n: int | None = Field(None, ge=1)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    repetition_penalty: float | None = Field(None, gt=0)
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None  # accepted and not used, as OpenAI's own semantics (abuse monitoring) give us nothing

    @property
    def include_usage(self) -> bool:
        """Whether a stream ends with a usage chunk."""
        return bool(self.stream_options and self.stream_options.include_usage)


class ChatRequest(GenerationFields):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)


class CompletionRequest(GenerationFields):
    prompt: Union[str, list[int]]
    logprobs: int | None = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS)


class TokenizeRequest(Strict):
    model: str | None = None
    prompt: str | None = None
    messages: list[Message] | None = None
    add_special_tokens: bool = True


class DetokenizeRequest(Strict):
    model: str | None = None
    tokens: list[int]


# -- OpenAI fields -> requests -----------------------------------------------------------------------------------


def check_body(body: GenerationFields, max_n: int) -> None:
    """The checks one field's schema cannot make alone: stream_options without stream, n beyond the batch."""
    if body.stream_options is not None and not body.stream:
        raise ApiError(400, "stream_options is only allowed when stream is true", param="stream_options")
    if (body.n or 1) > max_n:
        raise ApiError(400, f"n ({body.n}) exceeds the server's batch size of {max_n}", param="n")
    if isinstance(body, ChatRequest) and body.top_logprobs and not body.logprobs:
        raise ApiError(400, "top_logprobs needs logprobs: true", param="top_logprobs")


def build_requests(body: GenerationFields, generation: dict, prompt_len: int, limit: int,
                   where: str = "the model's context") -> list[Request]:
    """One `Request` per choice (n), sampling defaults from generation_config.json as the CLI does.

    No max tokens: the default, capped to the room the prompt leaves; asked-for tokens beyond `limit`
    positions: a 400 with both numbers (never truncated). Choice i samples with seed + i.
    """
    max_new = getattr(body, "max_completion_tokens", None) or body.max_tokens
    param = "max_completion_tokens" if getattr(body, "max_completion_tokens", None) else "max_tokens"
    try:
        if max_new is None:
            max_new = prompts.default_max_new_tokens(generation, limit - prompt_len)
        prompts.check_fits(prompt_len, max_new, limit, where)
        sampling = prompts.sampling_params(generation, body.temperature, body.top_k, body.top_p, body.min_p,
                                           body.repetition_penalty)
        sampling = replace(sampling, presence_penalty=body.presence_penalty or 0.0,
                           frequency_penalty=body.frequency_penalty or 0.0)
    except LlamaCliError as exc:
        raise bad_request(exc, param) from None
    if isinstance(body, ChatRequest):
        logprobs, top = bool(body.logprobs), body.top_logprobs or 0
    else:
        logprobs, top = body.logprobs is not None, body.logprobs or 0
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    out = []
    for i in range(body.n or 1):
        seed = None if body.seed is None else (body.seed + i) % 2**63
        try:
            out.append(Request(max_new_tokens=max_new, sampling=sampling, seed=seed, stop=stop, logprobs=logprobs,
                               top_logprobs=top))
        except LlamaCliError as exc:
            raise bad_request(exc, "stop" if "stop" in str(exc) else None) from None
    return out


# -- events -> responses -----------------------------------------------------------------------------------------


@dataclass
class Reply:
    """What every response and chunk of one request carries: its id, kind, creation time and model name."""

    chat: bool
    model: str
    created: int
    id: str = ""

    def __post_init__(self):
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + uuid.uuid4().hex

    @property
    def object(self) -> str:
        return "chat.completion" if self.chat else "text_completion"

    def head(self, chunk: bool = False) -> dict:
        """id, object, created, model."""
        obj = self.object + (".chunk" if chunk and self.chat else "")
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model}


TokenText = Callable[[int], str]


def usage(prompt_tokens: int, finished: list[Finished]) -> dict:
    """OpenAI's usage: the prompt counted once, completion tokens summed over the choices, and the prompt
    tokens served from cache (not prefilled by any choice)."""
    completion = sum(f.stats.generated_tokens for f in finished)
    prefilled = max((f.stats.prefill_tokens for f in finished), default=prompt_tokens)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion,
            "total_tokens": prompt_tokens + completion,
            "prompt_tokens_details": {"cached_tokens": max(0, prompt_tokens - prefilled)}}


def _entry(token_text: TokenText, token: int, lp: float) -> dict:
    text = token_text(token)
    return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8"))}


def logprobs_block(chat: bool, token_text: TokenText, tokens: list[int], lps: list[float],
                   tops: list[list[tuple[int, float]]] | None, offset: int = 0) -> dict:
    """The `logprobs` of a choice (or a chunk): chat's `content` list, or completions' parallel lists."""
    if chat:
        content = []
        for k, (token, lp) in enumerate(zip(tokens, lps)):
            entry = _entry(token_text, token, lp)
            entry["top_logprobs"] = [_entry(token_text, t, v) for t, v in (tops[k] if tops else [])]
            content.append(entry)
        return {"content": content}
    texts = [token_text(t) for t in tokens]
    offsets = []
    for text in texts:
        offsets.append(offset)
        offset += len(text)
    return {"tokens": texts, "token_logprobs": lps, "text_offset": offsets,
            "top_logprobs": [{token_text(t): v for t, v in top} for top in tops] if tops else None}


def response(reply: Reply, finished: list[Finished], prompt_tokens: int, token_text: TokenText) -> dict:
    """The whole (non-streamed) response of finished choices, in choice order."""
    choices = []
    for index, f in enumerate(finished):
        lp = (logprobs_block(reply.chat, token_text, f.token_ids, f.logprobs, f.top_logprobs)
              if f.logprobs is not None else None)
        choice = {"index": index}
        if reply.chat:
            choice["message"] = {"role": "assistant", "content": f.text}
        else:
            choice["text"] = f.text
        choices.append({**choice, "logprobs": lp, "finish_reason": f.reason})
    return {**reply.head(), "choices": choices, "usage": usage(prompt_tokens, finished)}


def chunk(reply: Reply, index: int, *, text: str | None = None, role: bool = False, finish: str | None = None,
          logprobs: dict | None = None, include_usage: bool = False) -> dict:
    """One stream chunk of one choice: the role (chat, first), a text delta, or the finish reason."""
    if reply.chat:
        delta: dict = {"role": "assistant", "content": ""} if role else {}
        if text is not None:
            delta["content"] = text
        choice = {"index": index, "delta": delta}
    else:
        choice = {"index": index, "text": text or ""}
    out = {**reply.head(chunk=True), "choices": [{**choice, "logprobs": logprobs, "finish_reason": finish}]}
    if include_usage:
        out["usage"] = None  # as OpenAI: null on every chunk but the last one
    return out


def usage_chunk(reply: Reply, prompt_tokens: int, finished: list[Finished]) -> dict:
    """The last chunk with stream_options.include_usage: no choices, the usage."""
    return {**reply.head(chunk=True), "choices": [], "usage": usage(prompt_tokens, finished)}


def model_list(name: str, created: int) -> dict:
    """GET /v1/models: the one model this server serves."""
    return {"object": "list", "data": [{"id": name, "object": "model", "created": created, "owned_by": "llamacli"}]}

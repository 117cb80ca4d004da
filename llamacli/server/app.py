"""The HTTP side of `llamacli serve`: a FastAPI app (and the uvicorn server that runs it) speaking the OpenAI API
over the engine thread, with SSE streaming. The only module that imports the HTTP library; it never touches
tensors: prompts are encoded here (torch-free), generation happens in `worker`, shapes come from `openai`.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import time
from typing import Callable

import uvicorn
from fastapi import FastAPI, Request as HttpRequest
from fastapi.middleware.cors import CORSMiddleware
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException

from llamacli import prompts
from llamacli.errors import LlamaCliError
from llamacli.request import CANCELLED, Finished, TokenEvent
from llamacli.server import openai
from llamacli.server.openai import ApiError
from llamacli.server.worker import NotReady, QueueFull, Submission, Worker

MAX_BODY_BYTES = 8 * 2**20
ROUTES = ("/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions", "/tokenize", "/detokenize")
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def sse(obj) -> str:
    """One server-sent event carrying a JSON object."""
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class _CountRequests:
    """ASGI middleware: count every answer by route and status (streams included)."""

    def __init__(self, app, metrics):
        self.app, self.metrics = app, metrics

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        status = [500]

        async def send_counted(message):
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_counted)
        finally:
            route = scope["path"] if scope["path"] in ROUTES else "other"
            self.metrics.http_requests.labels(route, str(status[0])).inc()


def create_app(worker: Worker, model_name: str, *, api_key: str | None = None, cors_origins: tuple[str, ...] = (),
               max_body_bytes: int = MAX_BODY_BYTES) -> FastAPI:
    """The OpenAI-compatible app over a (started) worker."""
    app = FastAPI(title="llamacli", docs_url=None, redoc_url=None, openapi_url=None)
    started = int(time.time())
    if cors_origins:
        app.add_middleware(CORSMiddleware, allow_origins=list(cors_origins), allow_methods=["*"],
                           allow_headers=["*"])
    app.add_middleware(_CountRequests, metrics=worker.metrics)

    @app.exception_handler(ApiError)
    async def _api_error(_, exc: ApiError):
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def _http_error(request: HttpRequest, exc: HTTPException):
        message = f"no route {request.method} {request.url.path}" if exc.status_code in (404, 405) else exc.detail
        err = ApiError(exc.status_code, str(message), code="not_found" if exc.status_code == 404 else None)
        return JSONResponse(err.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def _unexpected(_, exc: Exception):
        err = ApiError(500, f"{type(exc).__name__}: {exc}", type="server_error")
        return JSONResponse(err.body(), status_code=500)

    def authorize(request: HttpRequest) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        token = given[7:] if given[:7].lower() == "bearer " else ""
        if not hmac.compare_digest(token.encode(), api_key.encode()):
            raise ApiError(401, "invalid API key" if token else "missing API key (Authorization: Bearer KEY)",
                           code="invalid_api_key")

    def ready() -> None:
        if not worker.loaded:
            state = ("failed to load" if worker.load_error else "shutting down" if worker.stopping
                     else "still loading")
            raise ApiError(503, f"the model is {state}", type="server_error", code="unavailable",
                           headers={"Retry-After": "5"})

    def check_model(name: str | None) -> None:
        if name is not None and name != model_name:
            raise ApiError(404, f"model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")

    async def read_body(request: HttpRequest) -> bytes:
        too_big = ApiError(413, f"request body over {max_body_bytes} bytes", code="request_too_large")
        length = request.headers.get("content-length", "")
        if length.isdigit() and int(length) > max_body_bytes:
            raise too_big
        parts, size = [], 0
        async for part in request.stream():
            size += len(part)
            if size > max_body_bytes:
                raise too_big
            parts.append(part)
        return b"".join(parts)

    async def parse(request: HttpRequest, schema):
        authorize(request)
        body = openai.parse(schema, await read_body(request))
        ready()
        check_model(body.model)
        return body

    def encode(body) -> list[int]:
        engine = worker.engine
        try:
            if isinstance(body, openai.ChatRequest) or getattr(body, "messages", None) is not None:
                return prompts.encode_chat(engine.tokenizer, engine.chat_template, [m.as_dict() for m in body.messages])
            if isinstance(body.prompt, list):
                vocab = engine.config.vocab_size
                bad = [t for t in body.prompt if not 0 <= t < vocab]
                if bad:
                    raise ApiError(400, f"prompt token {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                                   param="prompt")
                return list(body.prompt)
            return prompts.encode_raw(engine.tokenizer, body.prompt)
        except LlamaCliError as exc:
            raise openai.bad_request(exc, "messages" if getattr(body, "messages", None) else "prompt") from None

    def token_text(token: int) -> str:
        return worker.engine.tokenizer.decode([token])

    async def generate(request: HttpRequest, chat: bool):
        body = await parse(request, openai.ChatRequest if chat else openai.CompletionRequest)
        openai.check_body(body, worker.batch_size)
        ids = await run_in_threadpool(encode, body)
        reqs = openai.build_requests(body, worker.engine.config.generation, len(ids), worker.context,
                                     worker.context_where)
        try:
            sub = worker.submit(ids, reqs)
        except QueueFull as exc:
            raise ApiError(429, str(exc), type="rate_limit_error", code="queue_full",
                           headers={"Retry-After": "1"}) from None
        except NotReady as exc:
            raise ApiError(503, str(exc), type="server_error", code="unavailable") from None
        except LlamaCliError as exc:
            raise openai.bad_request(exc, "max_tokens") from None
        reply = openai.Reply(chat, model_name, int(time.time()))
        if body.stream:
            return StreamingResponse(stream(sub, reply, len(ids), body.include_usage), media_type="text/event-stream",
                                     headers=SSE_HEADERS)
        finished = await collect(request, sub)
        if finished is None:
            return Response(status_code=499)  # the client went away; nobody reads this
        if any(f.reason == CANCELLED for f in finished):
            raise ApiError(503, "the server shut down before this request finished", type="server_error")
        return JSONResponse(openai.response(reply, finished, len(ids), token_text))

    async def collect(request: HttpRequest, sub: Submission) -> list[Finished] | None:
        """Every choice's Finished; None (and the request cancelled) when the client disconnects first."""
        async def drain():
            async for _ in sub.events():
                pass

        async def disconnected():
            while (await request.receive())["type"] != "http.disconnect":
                pass

        work, watch = asyncio.ensure_future(drain()), asyncio.ensure_future(disconnected())
        try:
            await asyncio.wait({work, watch}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            watch.cancel()
            if not work.done():
                work.cancel()
                sub.cancel()
        if work.cancelled():
            return None
        work.result()  # an engine failure propagates
        return sub.finished

    async def stream(sub: Submission, reply: openai.Reply, n_prompt: int, include_usage: bool):
        n = len(sub.requests)
        offsets = [0] * n
        done = False
        try:
            if reply.chat:
                for i in range(n):
                    yield sse(openai.chunk(reply, i, role=True, include_usage=include_usage))
            async for index, event in sub.events():
                if isinstance(event, Finished):
                    if event.reason == CANCELLED:
                        yield sse(ApiError(503, "the server shut down before this request finished",
                                           type="server_error").body())
                        return
                    yield sse(openai.chunk(reply, index, finish=event.reason, include_usage=include_usage))
                    continue
                lp = None
                if isinstance(event, TokenEvent) and event.logprob is not None:
                    tops = [event.top_logprobs] if event.top_logprobs is not None else None
                    lp = openai.logprobs_block(reply.chat, token_text, [event.token_id], [event.logprob], tops,
                                               offsets[index])
                if event.text or lp is not None:
                    offsets[index] += len(event.text)
                    yield sse(openai.chunk(reply, index, text=event.text, logprobs=lp, include_usage=include_usage))
            if include_usage:
                yield sse(openai.usage_chunk(reply, n_prompt, sub.finished))
            yield "data: [DONE]\n\n"
            done = True
        except Exception as exc:  # the engine failed mid-stream: say so in the stream, OpenAI-shaped
            yield sse(ApiError(500, f"{type(exc).__name__}: {exc}", type="server_error").body())
        finally:
            if not done:
                sub.cancel()  # the client went away (or we stopped): free the slots at the next step

    @app.get("/health")
    async def health():
        if worker.loaded:
            return {"status": "ok"}
        state = f"failed to load: {worker.load_error}" if worker.load_error else \
            "shutting down" if worker.stopping else "loading"
        return JSONResponse({"status": state}, status_code=503)

    @app.get("/metrics")
    async def metrics(request: HttpRequest):
        authorize(request)
        return Response(worker.metrics.text(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/v1/models")
    async def models(request: HttpRequest):
        authorize(request)
        return openai.model_list(model_name, started)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: HttpRequest):
        return await generate(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: HttpRequest):
        return await generate(request, chat=False)

    @app.post("/tokenize")
    async def tokenize(request: HttpRequest):
        body = await parse(request, openai.TokenizeRequest)
        if (body.prompt is None) == (body.messages is None):
            raise ApiError(400, "pass either prompt or messages", param="prompt")
        if body.prompt is not None:
            ids = worker.engine.tokenizer.encode(body.prompt, add_special_tokens=body.add_special_tokens)
        else:
            ids = await run_in_threadpool(encode, body)
        return {"tokens": ids, "count": len(ids), "max_model_len": worker.context}

    @app.post("/detokenize")
    async def detokenize(request: HttpRequest):
        body = await parse(request, openai.DetokenizeRequest)
        vocab = worker.engine.config.vocab_size
        bad = [t for t in body.tokens if not 0 <= t < vocab]
        if bad:
            raise ApiError(400, f"token {bad[0]} is outside the vocabulary (0..{vocab - 1})", param="tokens")
        return {"prompt": worker.engine.tokenizer.decode(body.tokens)}

    return app


class Server(uvicorn.Server):
    """uvicorn, announcing the URL once the model is loaded; a signal drains and returns (no re-raise)."""

    def __init__(self, config: uvicorn.Config, worker: Worker, on_ready: Callable[[str], None]):
        super().__init__(config)
        self.worker, self.on_ready = worker, on_ready
        self.url: str | None = None

    def handle_exit(self, sig, frame) -> None:
        super().handle_exit(sig, frame)
        getattr(self, "_captured_signals", []).clear()  # we drain and exit 0 ourselves

    async def startup(self, sockets=None) -> None:
        await super().startup(sockets)
        if not self.should_exit:
            asyncio.get_running_loop().create_task(self._announce())

    async def _announce(self) -> None:
        while not self.worker.ready.is_set():  # polled, not waited on in a thread: Ctrl-C while loading exits
            if self.should_exit:
                return
            await asyncio.sleep(0.05)
        if self.worker.load_error is not None:
            self.should_exit = True
            return
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        self.url = f"http://{host}:{port}"
        self.on_ready(self.url)


def make_server(app: FastAPI, worker: Worker, host: str = "127.0.0.1", port: int = 8000, *, drain_s: float = 30.0,
                on_ready: Callable[[str], None] = lambda url: None) -> Server:
    """A uvicorn server for `app` (quiet logs; `drain_s` for in-flight requests on shutdown); `.run()` it."""
    config = uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, lifespan="off",
                            timeout_graceful_shutdown=drain_s)
    return Server(config, worker, on_ready)


def bind(host: str, port: int) -> socket.socket:
    """A listening socket on host:port (port 0: any free one); OSError when it cannot be had."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
        sock.listen(2048)
    except OSError:
        sock.close()
        raise
    return sock

"""`llamacli serve`: the OpenAI-compatible HTTP server (`llamacli.server`) on one loaded model."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Optional

import typer

from llamacli.cli.app import (Device, DeviceOpt, Dtype, DtypeOpt, GroupSizeOpt, ModelOpt, QuantizeOpt, RevisionOpt,
                              TemplateOpt, TokenizerOpt, app, errors, note, resolve)
from llamacli.errors import InputError, UsageError

_SERVER = "Server"


def read_api_key(api_key: Optional[str], api_key_file: Optional[Path]) -> Optional[str]:
    """The key clients must send (None: no key), from --api-key or the first line of --api-key-file."""
    if api_key is not None and api_key_file is not None:
        raise UsageError("pass either --api-key or --api-key-file, not both")
    if api_key_file is not None:
        try:
            api_key = api_key_file.read_text(encoding="utf-8").strip()
        except FileNotFoundError:
            raise InputError(f"{api_key_file}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise InputError(f"{api_key_file}: cannot read ({exc})") from None
        if not api_key:
            raise UsageError(f"{api_key_file}: the API key file is empty")
    elif api_key is not None and not api_key.strip():
        raise UsageError("--api-key is empty")
    return api_key


def default_model_name(model: str) -> str:
    """What clients send as `model` unless --model-name says: a folder's or file's name, or the hub id."""
    path = Path(model)
    if not path.exists():
        return model
    if path.name in ("", ".", ".."):  # the folder as named by the user, not a symlink's target
        path = path.resolve()
    return path.stem if path.suffix.lower() == ".gguf" else path.name


@app.command()
def serve(
    model: ModelOpt,
    host: Annotated[str, typer.Option("--host", help="Address to bind; 0.0.0.0 exposes the server to the network.",
                                      rich_help_panel=_SERVER)] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=0, max=65535, help="TCP port (0: any free port).",
                                      rich_help_panel=_SERVER)] = 8000,
    api_key: Annotated[Optional[str], typer.Option(
        "--api-key", help="Clients must send 'Authorization: Bearer KEY' (all routes but /health).",
        show_default=False, rich_help_panel=_SERVER)] = None,
    api_key_file: Annotated[Optional[Path], typer.Option(
        "--api-key-file", help="Read the API key from a file (keeps it out of the process list).",
        show_default=False, rich_help_panel=_SERVER)] = None,
    batch_size: Annotated[int, typer.Option(
        "--batch-size", min=1, help="Requests generated together (batch rows).", rich_help_panel=_SERVER)] = 8,
    max_queue: Annotated[int, typer.Option(
        "--max-queue", min=0, help="Requests that may wait for a row; beyond: 429 with Retry-After.",
        rich_help_panel=_SERVER)] = 64,
    context: Annotated[Optional[int], typer.Option(
        "--context", min=2, help="Positions per row: prompt + max tokens (default: the model's, at most 4096).",
        show_default=False, rich_help_panel=_SERVER)] = None,
    prefix_cache: Annotated[bool, typer.Option(
        "--prefix-cache/--no-prefix-cache", help="Reuse the keys/values of a prompt prefix still in the cache "
                                                 "(rows of finished requests stay until their slot is needed).",
        rich_help_panel=_SERVER)] = True,
    model_name: Annotated[Optional[str], typer.Option(
        "--model-name", help="The model id clients send and /v1/models lists (default: the folder's name).",
        show_default=False, rich_help_panel=_SERVER)] = None,
    cors_origin: Annotated[Optional[list[str]], typer.Option(
        "--cors-origin", help="Allow browser requests from this origin (repeatable; default: none).",
        show_default=False, rich_help_panel=_SERVER)] = None,
    drain_seconds: Annotated[float, typer.Option(
        "--drain-seconds", min=0, help="On Ctrl-C / SIGTERM, let running requests finish for this long.",
        rich_help_panel=_SERVER)] = 30.0,
    dtype: DtypeOpt = Dtype.auto,
    device: DeviceOpt = Device.auto,
    quantize: QuantizeOpt = None,
    group_size: GroupSizeOpt = None,
    revision: RevisionOpt = None,
    tokenizer: TokenizerOpt = None,
    chat_template: TemplateOpt = None,
) -> None:
    """Serve the model over the OpenAI HTTP API (chat and completions, streaming) with continuous batching.

    Requests share the batch rows and decode normally: no speculative decoding (--draft-model and
    --prompt-lookup belong to generate and chat). A prompt that starts like one still in the KV cache (the
    same system prompt, a conversation's earlier turns) reuses those positions (usage.prompt_tokens_details).
    """
    with errors():
        key = read_api_key(api_key, api_key_file)
        from llamacli.weights import check_quantize, load_quantization

        quant = quantize.value if quantize else None
        check_quantize(quant, group_size)  # before a download or a conversion
        folder = resolve(model, revision, dtype)
        quantization = load_quantization(folder, quant, group_size)  # before the port is taken

        from llamacli.generation import Engine
        from llamacli.server.app import bind, create_app, make_server
        from llamacli.server.worker import Worker

        try:
            sock = bind(host, port)
        except OSError as exc:
            raise InputError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None

        def load():
            return Engine.load(folder, dtype=dtype.value, device=device.value, tokenizer=tokenizer,
                               chat_template=chat_template, quantize=quant, group_size=group_size,
                               decode_rows=batch_size)

        name = model_name or default_model_name(model)
        worker = Worker(load, batch_size=batch_size, max_queue=max_queue, context=context,
                        prefix_cache=prefix_cache).start()
        server_app = create_app(worker, name, api_key=key, cors_origins=tuple(cors_origin or ()))

        def announce(url: str) -> None:
            weights = f", {quantization.describe()} weights" if quantization else ""
            note(f"serving {name!r} at {url}/v1 (batch {batch_size}, queue {max_queue}, context {worker.context}"
                 f"{weights}{', API key required' if key else ''}); Ctrl-C to stop")

        server = make_server(server_app, worker, host, port, drain_s=drain_seconds, on_ready=announce)
        try:
            server.run(sockets=[sock])
        finally:
            worker.shutdown(timeout=1.0)
            sock.close()
        if worker.load_error is not None:
            raise worker.load_error
        note("stopped")

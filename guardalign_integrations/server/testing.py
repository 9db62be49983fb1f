"""An OpenAI-compatible upstream imitation and a loopback server runner, for tests, examples and benchmarks.

What: :func:`create_upstream_imitation` is a small Starlette app that answers
``/v1/chat/completions`` (whole or streamed) and ``/v1/models`` like an OpenAI-compatible
API and records every request it receives, so a test can check exactly what the gateway
forwarded. :class:`ServerThread` runs any ASGI app with uvicorn on 127.0.0.1 in a
background thread and stops it on exit.

Why in the package: ``examples/serve_gateway.py`` and ``benchmarks/`` must run offline
with nothing but this repository.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import zlib
from dataclasses import dataclass, field
from typing import Any

from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route


@dataclass
class UpstreamRecord:
    """What the imitation saw and how it should behave."""

    requests: list[dict[str, Any]] = field(default_factory=list)
    """Each request: ``{"path", "headers", "body"}`` (the body as parsed JSON)."""
    stream_chunks: list[str] = field(default_factory=lambda: ["Hello", " from", " the", " upstream", "."])
    chunk_delay_s: float = 0.0
    """Pause before each streamed chunk (after the first)."""
    response_delay_s: float = 0.0
    """Pause before answering at all, chat or models (a slow upstream)."""
    release_last_chunk: threading.Event | None = None
    """When set, the last streamed chunk waits for this event."""
    sent_chunks: int = 0
    cancelled: int = 0
    """Requests whose client (the gateway) went away before the answer was complete."""
    record_bodies: bool = True
    compress: str | None = None
    """Gzip the answers (``content-encoding: gzip``): ``"gzip"`` when the request's ``accept-encoding`` allows
    it, ``"always"`` even when it does not (a misbehaving upstream); ``None``: never."""


def create_upstream_imitation(record: UpstreamRecord | None = None) -> tuple[Starlette, UpstreamRecord]:
    """An OpenAI-compatible imitation and its :class:`UpstreamRecord`.

    The answer echoes facts about the request: the assistant text is the stream chunks
    joined; a request with ``tools`` gets a call of its first tool with ``{"x": 1}``.
    """
    record = record or UpstreamRecord()

    async def chat(request: Request) -> Response:
        body = json.loads(await request.body())
        if record.record_bodies:
            record.requests.append({"path": request.url.path, "headers": dict(request.headers), "body": body})
        deadline = time.monotonic() + record.response_delay_s
        while time.monotonic() < deadline:
            if await request.is_disconnected():  # the gateway gave up on us: stop working
                record.cancelled += 1
                return Response(status_code=499)
            await asyncio.sleep(0.01)
        model = body.get("model", "imitation")
        tool_calls = None
        if body.get("tools"):
            name = body["tools"][0]["function"]["name"]
            tool_calls = [{"id": "call_1", "type": "function", "function": {"name": name, "arguments": "{\"x\": 1}"}}]
        gzip = record.compress == "always" or (record.compress == "gzip" and "gzip" in request.headers.get("accept-encoding", ""))
        if body.get("stream"):
            events = _stream(record, model, tool_calls, request)
            if gzip:
                return StreamingResponse(_gzipped(events), media_type="text/event-stream", headers={"content-encoding": "gzip"})
            return StreamingResponse(events, media_type="text/event-stream")
        message: dict[str, Any] = {"role": "assistant", "content": None if tool_calls else "".join(record.stream_chunks)}
        if tool_calls:
            message["tool_calls"] = tool_calls
        answer = JSONResponse({
            "id": "chatcmpl-imitation", "object": "chat.completion", "created": int(time.time()), "model": model,
            "choices": [{"index": 0, "message": message, "logprobs": None, "finish_reason": "tool_calls" if tool_calls else "stop"}],
            "usage": {"prompt_tokens": 3, "completion_tokens": len(record.stream_chunks), "total_tokens": 3 + len(record.stream_chunks)},
        }, headers={"x-request-id": "req-imitation"})
        if gzip:
            return Response(_gzip(answer.body), media_type="application/json", headers={"x-request-id": "req-imitation", "content-encoding": "gzip"})
        return answer

    async def models(request: Request) -> Response:
        record.requests.append({"path": request.url.path, "headers": dict(request.headers), "body": None})
        deadline = time.monotonic() + record.response_delay_s
        while time.monotonic() < deadline:
            if await request.is_disconnected():
                record.cancelled += 1
                return Response(status_code=499)
            await asyncio.sleep(0.01)
        return JSONResponse({"object": "list", "data": [{"id": "imitation-model", "object": "model", "created": 0, "owned_by": "test"}]})

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models, methods=["GET"])])
    return app, record


def _gzip(data: bytes) -> bytes:
    compressor = zlib.compressobj(wbits=31)  # gzip framing
    return compressor.compress(data) + compressor.flush()


async def _gzipped(chunks: Any) -> Any:
    """A gzip stream of ``chunks``, flushed after each so that it streams."""
    compressor = zlib.compressobj(wbits=31)
    async for chunk in chunks:
        yield compressor.compress(chunk) + compressor.flush(zlib.Z_SYNC_FLUSH)
    yield compressor.flush()


async def _stream(record: UpstreamRecord, model: str, tool_calls: Any, request: Request):
    created = int(time.time())

    def event(delta: dict[str, Any], finish: str | None = None) -> bytes:
        chunk = {"id": "chatcmpl-imitation", "object": "chat.completion.chunk", "created": created, "model": model,
                 "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
        return f"data: {json.dumps(chunk)}\n\n".encode()

    try:
        if tool_calls:
            yield event({"role": "assistant", "tool_calls": [{"index": 0, **tool_calls[0]}]})
            yield event({}, "tool_calls")
        else:
            chunks, release = record.stream_chunks, record.release_last_chunk  # as they were when the request came
            for i, text in enumerate(chunks):
                if i and record.chunk_delay_s:
                    await asyncio.sleep(record.chunk_delay_s)
                if i == len(chunks) - 1 and release is not None:
                    while not release.is_set():
                        await asyncio.sleep(0.005)
                yield event({"role": "assistant", "content": text} if i == 0 else {"content": text})
                record.sent_chunks += 1
            yield event({}, "stop")
        yield b"data: [DONE]\n\n"
    except (asyncio.CancelledError, GeneratorExit):
        record.cancelled += 1
        raise


class ServerThread:
    """Serve an ASGI app with uvicorn on 127.0.0.1 in a daemon thread (a context manager).

    Args:
        app: the ASGI app.
        port: the port (0: a free one, see :attr:`url`).
        **uvicorn_options: more ``uvicorn.Config`` options.

    Example:
        >>> with ServerThread(app) as server:  # doctest: +SKIP
        ...     httpx.get(server.url + "/healthz")
    """

    def __init__(self, app: Any, *, port: int = 0, **uvicorn_options: Any) -> None:
        import uvicorn

        self._socket = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._socket.bind(("127.0.0.1", port))
        self.port = self._socket.getsockname()[1]
        options = {"log_level": "warning", "access_log": False, "lifespan": "on", **uvicorn_options}
        self.server = uvicorn.Server(uvicorn.Config(app, **options))
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "ServerThread":
        self.thread.start()
        deadline = time.monotonic() + 30
        while not self.server.started:
            if not self.thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("the test server did not start")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=30)
        self._socket.close()

    def __enter__(self) -> "ServerThread":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()

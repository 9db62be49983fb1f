"""The ASGI application: :func:`create_app` wires the guard, the limits and the endpoints.

Endpoints: ``POST /v1/chat/completions`` (gateway or local model), ``GET /v1/models``,
``POST /v1/scan``, ``POST /beta/litellm_basic_guardrail_api`` and the operations endpoints
``/healthz``, ``/readyz``, ``/metrics``. The app adds no detection logic: screening is
:mod:`._openai_content` on the core guard. Start-up warms the CLIP backbone (and the local
model) in the background; ``/readyz`` says ready when it is done.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import io
import logging
import threading
import time
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, AsyncIterator, Awaitable, TypeVar

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import JSONResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from guardalign_core.guard import ContentImage, ImageGuard

from ._admission import AdmissionGate, QueueFull, Slot
from ._batching import ScanBatcher
from ._errors import ServerError, error_response, from_server_error
from ._json_body import INLINE_PARSE_BYTES, parse_body
from ._metrics import ServerMetrics
from .config import ServerConfig

logger = logging.getLogger(__name__)
access_logger = logging.getLogger("guardalign_integrations.server.access")
T = TypeVar("T")


class ClientGone(Exception):
    """The client disconnected before the answer was ready; the work for it was cancelled."""


@dataclass
class Admitted:
    """A request past the preamble (:meth:`ServerState.serving`): its processing slot, its body and, for JSON endpoints, the parsed object."""

    slot: Slot
    raw: bytes
    body: dict[str, Any] | None


def detector_on_gpu(guard: ImageGuard) -> bool:
    """Whether the guard's detector runs on a CUDA device (``device: auto`` resolved as the encoder will resolve it)."""
    from guardalign_core.encoders import resolve_device

    return resolve_device(guard.config.detector.device).startswith("cuda")


class ServerState:
    """What every endpoint shares: config, guard, batcher, limits, metrics, upstream or local model."""

    def __init__(self, config: ServerConfig, guard: ImageGuard, pipeline: Any = None, transport: Any = None) -> None:
        self.config = config
        self.guard = guard
        self.pipeline = pipeline
        self.transport = transport
        self.metrics = ServerMetrics()
        self.gate: AdmissionGate | None = None  # made on the serving event loop
        batching = config.batching
        enabled = batching.enabled if batching.enabled is not None else detector_on_gpu(guard)
        self.batcher = ScanBatcher(guard, enabled=enabled, window_ms=batching.window_ms, max_images=batching.max_images,
                                   on_batch=self.metrics.batch_images.observe)
        self.upstream: Any = None
        self.ready = threading.Event()
        self.warm_error: str | None = None

    # -- auth and admission ------------------------------------------------------------------
    def authenticate(self, request: Request) -> None:
        """Accept a configured key from ``x-guardalign-api-key``, ``x-api-key`` or ``Authorization: Bearer``.

        In ``passthrough`` key mode the Authorization header belongs to the upstream and is
        not read as a server key.

        Raises:
            ServerError: 401 when keys are configured and none of the headers holds one.
        """
        keys = self.config.api_keys
        if not keys:
            return
        offered = [request.headers.get("x-guardalign-api-key"), request.headers.get("x-api-key")]
        passthrough = self.config.upstream is not None and self.config.upstream.key_mode == "passthrough"
        auth = request.headers.get("authorization", "")
        if not passthrough and auth[:7].lower() == "bearer ":
            offered.append(auth[7:].strip())
        for candidate in offered:
            if candidate and any(hmac.compare_digest(candidate.encode(), key.encode()) for key in keys):
                return
        self.metrics.rejections.labels("auth").inc()
        raise ServerError(401, "missing or invalid API key", "invalid_api_key")

    async def admit(self) -> Slot:
        """A processing slot, or a 429 with Retry-After when the queue is full."""
        if self.gate is None:
            raise RuntimeError("the app's lifespan has not run (serve it with uvicorn or an ASGI lifespan)")
        gate = self.gate
        self.metrics.queued.set(gate.waiting + 1 if gate.active >= gate.max_active else gate.waiting)
        try:
            slot = await gate.acquire()
        except QueueFull:
            self.metrics.rejections.labels("queue_full").inc()
            raise ServerError(429, "the server is at capacity; retry after the indicated delay", "server_busy",
                              headers={"retry-after": str(self.config.retry_after_s)}) from None
        finally:
            self.metrics.queued.set(gate.waiting)
        self.metrics.in_flight.set(gate.active)
        return slot

    def release(self, slot: Slot) -> None:
        slot.release()
        if self.gate is not None:
            self.metrics.in_flight.set(self.gate.active)

    async def read_body(self, request: Request) -> bytes:
        """The whole request body (size-limited by :class:`EdgeMiddleware`), within ``body_read_timeout_s``.

        Read before a processing slot is taken: a client that sends its body slowly (or never
        finishes it) holds a connection, never a slot, and loses even that at the deadline.

        Raises:
            ServerError: 408 ``request_timeout`` when the body is not complete in time (the
                connection is then closed).
            ClientGone: the client disconnected before its body was complete.
        """
        timeout = self.config.body_read_timeout_s
        try:
            async with asyncio.timeout(timeout):
                raw = await request.body()
        except TimeoutError:
            self.metrics.rejections.labels("body_timeout").inc()
            raise ServerError(408, f"the request body did not arrive within body_read_timeout_s={timeout:g} s",
                              "request_timeout", headers={"connection": "close"}) from None
        except ClientDisconnect:
            raise ClientGone() from None
        request.scope["state"]["body_bytes"] = len(raw)
        return raw

    async def parse(self, raw: bytes) -> dict[str, Any]:
        """:func:`._json_body.parse_body` with the configured limit; a large body is parsed off the event loop.

        Small bodies (:data:`INLINE_PARSE_BYTES`) are parsed in place: a thread hop would cost
        more than the parse (the text-only path's overhead budget is a few hundred µs).
        """
        limit = self.config.max_json_values
        try:
            if len(raw) <= INLINE_PARSE_BYTES:
                return parse_body(raw, max_values=limit)
            return await run_in_threadpool(parse_body, raw, max_values=limit)
        except ServerError as err:
            self.metrics.rejections.labels(err.code).inc()
            raise

    @asynccontextmanager
    async def serving(self, request: Request, endpoint: str, *, parse_json: bool = True) -> AsyncIterator[Admitted]:
        """The shared preamble: name the endpoint, authenticate, read the body, hold a processing slot, parse.

        The order is the defence: the body is read (under its deadline) before a slot is
        taken, so slow or stalled uploads cannot lock the slots and the queue; the JSON is
        parsed inside the slot, so the parsing CPU is bounded by ``max_concurrency``. The slot
        is released on exit unless the endpoint handed it to a streaming response
        (:meth:`Slot.hand_over`), which releases it when the stream ends.

        Raises:
            ServerError: 401 (no valid key), 408 (body too slow), 413 (body too large or its
                JSON too complex), 429 (queue full), 400 (not a JSON object: see
                :func:`._json_body.parse_body`).
            ClientGone: the client left during the body.
        """
        request.scope["state"]["endpoint"] = endpoint
        self.authenticate(request)
        raw = await self.read_body(request)
        slot = await self.admit()
        try:
            body = await self.parse(raw) if parse_json else None
            yield Admitted(slot, raw, body)
        finally:
            if not slot.handed_over:
                self.release(slot)

    def record_decision(self, request: Request, decision: Any, images: int) -> None:
        """Count a request verdict (decision, images scanned) and note it for the access log."""
        value = decision.decision.value
        self.metrics.decisions.labels(value).inc()
        if images:
            self.metrics.images.inc(images)
        request.scope["state"].update(decision=value, images=images)

    # -- warm-up -----------------------------------------------------------------------------
    def warm(self) -> None:
        """Load the CLIP backbone and its text embeddings (one tiny scan), and the local model."""
        try:
            if self.config.warm_up:
                from PIL import Image

                buffer = io.BytesIO()
                Image.new("RGB", (64, 64), (128, 128, 128)).save(buffer, format="PNG")
                self.guard.screen([ContentImage("warm-up", source=buffer.getvalue())], reuse=False)
                if self.pipeline is not None:
                    self.pipeline.lvlm.load()
        except Exception as err:  # noqa: BLE001 (reported by /readyz; requests then fail with their own error)
            self.warm_error = f"{type(err).__name__}: {err}"
            logger.error("warm-up failed: %s", self.warm_error)
            return
        if self.config.gc_freeze:
            # torch and the models leave ~350k tracked objects: every full collection walked them
            # (measured ~95 µs of CPU per text request, amortised, and the latency tail)
            gc.collect()
            gc.freeze()
        self.ready.set()
        logger.info("guardalign server ready (%s mode)", self.config.mode)


async def until_disconnect(request: Request, awaitable: Awaitable[T]) -> T:
    """Await ``awaitable`` unless the client disconnects first; then cancel it and raise :class:`ClientGone`.

    One watcher task reads the ASGI channel (after the body, the next message is the
    disconnect) and, if the client leaves while ``awaitable`` is pending, cancels the
    handler's own task, which cancels ``awaitable`` where it waits (the upstream request).
    Why not two tasks and ``asyncio.wait``: that cost ~70 µs a call on the text-only path.
    Once ``awaitable`` is done, the watcher can no longer cancel anything (no suspension point
    lies between its end and the watcher's cancellation).
    """
    task = asyncio.current_task()
    if task is None:  # not in a task (never under an ASGI server): nothing to cancel
        return await awaitable
    flags = {"gone": False, "done": False}

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        if not flags["done"]:
            flags["gone"] = True
            task.cancel()

    watcher = asyncio.get_running_loop().create_task(watch())
    try:
        return await awaitable
    except asyncio.CancelledError:
        if flags["gone"]:
            task.uncancel()
            raise ClientGone() from None
        raise
    finally:
        flags["done"] = True
        watcher.cancel()


class _BodyTooLarge(Exception):
    pass


class EdgeMiddleware:
    """Pure ASGI: the body size limit (413) and one access-log line per request (decision, never content)."""

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.state.config.max_body_bytes
        start = time.perf_counter()
        status = {"code": 500, "started": False}
        scope.setdefault("state", {})
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length")
        # Whether the request body has been read to its end. An answer sent before that (413,
        # 401, 404, ...) closes the connection: uvicorn would otherwise keep it open and discard
        # whatever the client keeps sending, and each byte re-arms no timer (measured: open for
        # ever after one late byte, without an API key), so such connections fill max_connections.
        body_done = {"done": b"transfer-encoding" not in headers and (length is None or length.strip() in (b"", b"0"))}

        async def closing_send(message: Message) -> None:
            if message["type"] == "http.response.start" and not body_done["done"]:
                present = [(k, v) for k, v in message.get("headers", []) if k.lower() != b"connection"]
                message = {**message, "headers": [*present, (b"connection", b"close")]}
            await send(message)

        if length is not None and length.isdigit() and int(length) > limit:
            await self._too_large(scope, receive, closing_send, limit)
            self._log(scope, 413, start)
            return
        seen = 0

        async def limited_receive() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise _BodyTooLarge()
                if not message.get("more_body", False):
                    body_done["done"] = True
            return message

        async def tracking_send(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"], status["started"] = message["status"], True
            await closing_send(message)

        try:
            await self.app(scope, limited_receive, tracking_send)
        except _BodyTooLarge:
            if not status["started"]:
                await self._too_large(scope, receive, tracking_send, limit)
        finally:
            self._log(scope, status["code"], start)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send, limit: int) -> None:
        self.state.metrics.rejections.labels("body_too_large").inc()
        response = error_response(413, f"the request body is over the limit of {limit} bytes", "request_too_large")
        await response(scope, receive, send)

    def _log(self, scope: Scope, code: int, start: float) -> None:
        path = scope.get("path", "")
        state = scope.get("state") or {}
        endpoint = state.get("endpoint", path if path in _KNOWN_PATHS else "other")
        self.state.metrics.requests.labels(endpoint, str(code)).inc()
        access_logger.info(
            "%s %s %d decision=%s images=%s %.1fms", scope.get("method", "-"), path, code, state.get("decision", "-"),
            state.get("images", 0), (time.perf_counter() - start) * 1000,
        )


_KNOWN_PATHS = {"/v1/chat/completions", "/v1/models", "/v1/scan", "/beta/litellm_basic_guardrail_api", "/healthz", "/readyz", "/metrics"}


def create_app(config: ServerConfig, *, guard: ImageGuard | None = None, pipeline: Any = None, transport: Any = None) -> FastAPI:
    """Build the server for ``config``.

    Args:
        config: the validated :class:`ServerConfig`.
        guard: a core guard to use (default: built from ``config.guard``; shared with the
            local pipeline in local mode).
        pipeline: a ready :class:`~guardalign_core.pipeline.GuardAlignPipeline` (local
            mode; default: built from ``config.model``).
        transport: an ``httpx`` transport for the upstream client (tests).

    Returns:
        A FastAPI (ASGI) app; serve it with uvicorn.

    Example:
        >>> app = create_app(ServerConfig(upstream={"base_url": "http://127.0.0.1:9000/v1"}, guard="tiny-random"))  # doctest: +SKIP
    """
    guard = guard or (pipeline.guard if pipeline is not None else ImageGuard(config.guard))
    if config.mode == "local" and pipeline is None:
        from ._local import build_pipeline

        pipeline = build_pipeline(config, guard)
    state = ServerState(config, guard, pipeline, transport)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state.gate = AdmissionGate(config.max_concurrency, config.max_queue)
        if config.upstream is not None:
            from ._upstream import UpstreamClient

            state.upstream = UpstreamClient(config.upstream, transport=transport)
        warm = asyncio.get_running_loop().run_in_executor(None, state.warm)
        try:
            yield
        finally:
            warm.cancel()
            await asyncio.get_running_loop().run_in_executor(None, state.batcher.close)
            if state.upstream is not None:
                await state.upstream.aclose()
            if config.gc_freeze:
                gc.unfreeze()  # an embedding process (tests, notebooks) gets its collector back

    app = FastAPI(title="GuardAlign", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.guardalign = state

    @app.exception_handler(ServerError)
    async def _server_error(request: Request, err: ServerError) -> Response:
        return from_server_error(err)

    @app.exception_handler(ClientGone)
    async def _client_gone(request: Request, err: ClientGone) -> Response:
        state.metrics.rejections.labels("client_disconnected").inc()
        return Response(status_code=499)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, err: StarletteHTTPException) -> Response:
        code = {404: "not_found", 405: "method_not_allowed"}.get(err.status_code, "http_error")
        return error_response(err.status_code, str(err.detail), code)

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request: Request, err: RequestValidationError) -> Response:
        return error_response(400, "the request is not valid", "invalid_request")

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz() -> Response:
        if state.ready.is_set():
            return JSONResponse({"status": "ready", "mode": config.mode})
        status = "failed" if state.warm_error else "warming"
        return JSONResponse({"status": status, "mode": config.mode}, status_code=503)

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        state.authenticate(request)
        return Response(state.metrics.render(), media_type=state.metrics.content_type)

    from . import _gateway, _litellm, _scan

    _gateway.register(app, state)
    _scan.register(app, state)
    _litellm.register(app, state)
    app.add_middleware(EdgeMiddleware, state=state)
    return app

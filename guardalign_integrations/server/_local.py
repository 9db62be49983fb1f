"""Local mode: ``/v1/chat/completions`` answered by a local LVLM with the full method.

What: the request is screened exactly as in gateway mode; the messages become Hugging
Face chat messages with image placeholders and the checked (masked or allowed) pixels;
:class:`~guardalign_core.pipeline.GuardAlignPipeline` adds the safety prefix and generates
with calibrated attention. The answer is an OpenAI ``chat.completion`` (or a token stream
of chunks) with usage; ``max_tokens``/``max_completion_tokens``, ``temperature``,
``top_p``, ``seed`` and ``stop`` are honoured. Tool calls and structured outputs are
refused with a clear 400 until the local runner supports them.

Generation runs in a worker thread that checks a stop flag after every token, so a client
that disconnects (or leaves a stream) ends the generation within one token.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any, AsyncIterator

from fastapi import Request
from pydantic import ValidationError
from starlette.background import BackgroundTask
from starlette.responses import JSONResponse, Response, StreamingResponse

from guardalign_core.errors import ImageError
from guardalign_core.lvlm import GenerationOptions
from guardalign_core.pipeline import CheckedRequest, GuardAlignPipeline
from guardalign_core.runners import get_local_lvlm

from . import _chat_format
from ._errors import ServerError
from ._openai_content import ScreenedBody, decision_header

_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}


def build_pipeline(config: Any, guard: Any) -> GuardAlignPipeline:
    """The pipeline for ``config.model``, sharing the server's guard (nothing loads until warm-up)."""
    model = config.model
    lvlm = get_local_lvlm(model.model_id, device=model.device, dtype=model.dtype, trust_remote_code=model.trust_remote_code,
                          max_concurrent=model.max_concurrent)
    return GuardAlignPipeline(lvlm, guard, refusal=config.refusal_text)


def generation_options(body: dict[str, Any], max_new_tokens: int) -> GenerationOptions:
    """The decoding options of a request; refuses what the local runner cannot do.

    Raises:
        ServerError: 400 for tools, ``n`` > 1, logprobs, non-text ``response_format`` or bad values.
    """
    if body.get("tools") or body.get("functions") or body.get("tool_choice") not in (None, "none"):
        raise ServerError(400, "tool calls are not supported by the local model yet; send the request without tools",
                          "unsupported_parameter", param="tools")
    if (body.get("n") or 1) != 1:
        raise ServerError(400, "n > 1 is not supported by the local model", "unsupported_parameter", param="n")
    if body.get("logprobs"):
        raise ServerError(400, "logprobs are not supported by the local model", "unsupported_parameter", param="logprobs")
    fmt = body.get("response_format")
    if fmt is not None and (not isinstance(fmt, dict) or fmt.get("type") != "text"):
        raise ServerError(400, "structured outputs (response_format) are not supported by the local model", "unsupported_parameter",
                          param="response_format")
    limit_name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    requested, stop = body.get(limit_name), body.get("stop")
    values = {
        "max_new_tokens": max_new_tokens if requested is None else requested,
        "temperature": 0.0 if body.get("temperature") is None else body["temperature"],
        "top_p": 1.0 if body.get("top_p") is None else body["top_p"],
        "stop": [] if stop is None else [stop] if isinstance(stop, str) else stop,
        "seed": body.get("seed"),
    }
    try:
        options = GenerationOptions.model_validate(values, strict=True)  # JSON types as sent: no bool for an int, no str for a list
    except ValidationError as err:
        first = err.errors()[0]
        field = str(first["loc"][0]) if first["loc"] else "request"
        param = limit_name if field == "max_new_tokens" else field
        raise ServerError(400, f"{param}: {first['msg']}", "invalid_request", param=param) from None
    if len(options.stop) > 4:
        raise ServerError(400, "stop: at most 4 stop sequences", "invalid_request", param="stop")
    return options.model_copy(update={"max_new_tokens": min(options.max_new_tokens, max_new_tokens)})


def hf_request(body: dict[str, Any], screened: ScreenedBody) -> CheckedRequest:
    """Hugging Face chat messages with one image placeholder per forwardable image, and those images."""
    images_by_position: dict[tuple[int, int], Any] = {}
    for ref, verdict in zip(screened.refs, screened.verdicts):
        try:
            image = verdict.pixels()  # the checked (masked) pixels; None when nothing may be shown
        except ImageError:
            continue
        if image is None:
            continue  # fail_open let an unchecked image through, or it was dropped: a local model never sees it
        images_by_position[(ref.message, ref.part)] = image
    messages, images = [], []
    for m, message in enumerate(body["messages"]):
        role = _ROLES.get(message["role"])
        if role is None:
            raise ServerError(400, f"messages[{m}]: role {message['role']!r} is not supported by the local model", "unsupported_parameter")
        content = message.get("content")
        parts: list[dict[str, Any]] = []
        if isinstance(content, str):
            parts.append({"type": "text", "text": content})
        for p, part in enumerate(content if isinstance(content, list) else []):
            kind = part["type"]
            if kind == "text" or kind == "refusal":
                parts.append({"type": "text", "text": str(part.get(kind) or "")})
            elif kind == "image_url":
                if (m, p) in images_by_position:
                    parts.append({"type": "image"})
                    images.append(images_by_position[(m, p)])
            else:
                raise ServerError(400, f"messages[{m}].content[{p}]: part type {kind!r} is not supported by the local model",
                                  "unsupported_parameter")
        messages.append({"role": role, "content": parts})
    return CheckedRequest(messages, images, screened.decision)


def _produce(pipeline: GuardAlignPipeline, checked: CheckedRequest, options: GenerationOptions, extra: dict[str, Any],
             loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, stop: threading.Event) -> None:
    """Worker thread: generate and push ("delta", text) items, then ("end", record) or ("error", exc)."""
    def push(item: tuple[str, Any]) -> None:
        loop.call_soon_threadsafe(queue.put_nowait, item)

    try:
        stream = pipeline.stream(checked, options=options, **extra)
        iterator = iter(stream)
        try:
            for delta in iterator:
                if stop.is_set():
                    break
                push(("delta", delta))
        finally:
            iterator.close()  # an early exit cancels the generation (PipelineStream's contract)
        push(("end", stream.record))
    except BaseException as err:  # noqa: BLE001 (handed to the event loop, answered as an error)
        push(("error", err))


async def local_chat(state: Any, request: Request, body: dict[str, Any], slot: Any) -> Response:
    """Answer a chat request with the local pipeline (see the module docstring)."""
    from ._gateway import blocked_response, screen
    from .app import until_disconnect

    config = state.config.model
    options = generation_options(body, config.max_new_tokens)
    screened = await screen(state, request, body, safety_prompt=False)
    if screened.blocked:
        return blocked_response(state, body, screened)
    checked = hf_request(body, screened)
    pipeline = state.pipeline
    extra: dict[str, Any] = {}
    if config.suppress_special_tokens:
        extra["suppress_tokens"] = list(pipeline.lvlm.tokenizer.all_special_ids)
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue = asyncio.Queue()
    stop = threading.Event()
    threading.Thread(target=_produce, args=(pipeline, checked, options, extra, loop, queue, stop), daemon=True,
                     name="guardalign-local-generation").start()
    model = config.name
    headers = {"x-guardalign-decision": decision_header(screened.decision)}

    def finish_reason(record: Any) -> str:
        return "length" if record is not None and record.output_tokens >= options.max_new_tokens else "stop"

    def usage(record: Any) -> dict[str, int]:
        return _chat_format.usage(record.input_tokens, record.output_tokens) if record is not None else _chat_format.usage()

    if body.get("stream") is True:
        include_usage = bool((body.get("stream_options") or {}).get("include_usage"))
        id_, created = _chat_format.completion_id(), int(time.time())

        async def events() -> AsyncIterator[bytes]:
            try:
                yield _chat_format.sse(_chat_format.chunk(model, id_, created, delta={"role": "assistant", "content": ""}))
                while True:
                    kind, value = await queue.get()
                    if kind == "delta":
                        yield _chat_format.sse(_chat_format.chunk(model, id_, created, delta={"content": value}))
                    elif kind == "end":
                        yield _chat_format.sse(_chat_format.chunk(model, id_, created, finish_reason=finish_reason(value)))
                        if include_usage:
                            yield _chat_format.sse(_chat_format.chunk(model, id_, created, usage_=usage(value), choices=False))
                        break
                    else:
                        yield _chat_format.sse({"error": {"message": f"generation failed ({type(value).__name__})", "type": "api_error",
                                                          "param": None, "code": "generation_failed"}})
                        break
                yield _chat_format.sse("[DONE]")
            finally:
                stop.set()
                state.release(slot)

        def cleanup() -> None:  # also when the client left before the stream started
            stop.set()
            state.release(slot)

        slot.hand_over()  # events()/cleanup() release it; a blocked stream (above) does not, so it is not handed over
        return StreamingResponse(events(), media_type="text/event-stream", headers=headers, background=BackgroundTask(cleanup))

    async def collect() -> tuple[str, Any]:
        text = ""
        while True:
            kind, value = await queue.get()
            if kind == "delta":
                text += value
            elif kind == "end":
                return text, value
            else:
                raise ServerError(500, f"generation failed ({type(value).__name__})", "generation_failed")

    try:
        text, record = await until_disconnect(request, collect())
    finally:
        stop.set()  # a client gone (or an error): the worker ends the generation at its next token
    summary = {**screened.decision.summary(), "prefix_applied": bool(record and record.prefix_used),
               "calibration": record.calibration if record is not None else None}
    completion = _chat_format.completion(model, text, finish_reason=finish_reason(record), usage_=usage(record), guardalign=summary)
    return JSONResponse(completion, headers=headers)

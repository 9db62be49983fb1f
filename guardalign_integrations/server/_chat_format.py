"""OpenAI chat-completion objects built by the server itself: refusals and local-model answers.

What: ``chat.completion`` and ``chat.completion.chunk`` dictionaries in the exact shape the
OpenAI SDKs parse, and SSE framing. Why: a blocked request, or an answer from the local
model, must look to a client like any other answer (``finish_reason="content_filter"`` for
a refusal), so agent frameworks need no special case.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any


def completion_id() -> str:
    return f"chatcmpl-guardalign-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int = 0, completion_tokens: int = 0) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens, "total_tokens": prompt_tokens + completion_tokens}


def completion(
    model: str, text: str, *, finish_reason: str = "stop", usage_: dict[str, int] | None = None, id_: str | None = None,
    guardalign: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A non-streaming ``chat.completion`` with one assistant message."""
    body: dict[str, Any] = {
        "id": id_ or completion_id(),
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": text, "refusal": None}, "logprobs": None,
                     "finish_reason": finish_reason}],
        "usage": usage_ or usage(),
    }
    if guardalign is not None:
        body["guardalign"] = guardalign
    return body


def chunk(model: str, id_: str, created: int, *, delta: dict[str, Any] | None = None, finish_reason: str | None = None,
          usage_: dict[str, int] | None = None, choices: bool = True) -> dict[str, Any]:
    """One ``chat.completion.chunk``; ``choices=False`` gives the final usage-only chunk."""
    body: dict[str, Any] = {"id": id_, "object": "chat.completion.chunk", "created": created, "model": model,
                            "choices": [{"index": 0, "delta": delta or {}, "logprobs": None, "finish_reason": finish_reason}] if choices else []}
    if usage_ is not None:
        body["usage"] = usage_
    return body


def sse(data: dict[str, Any] | str) -> bytes:
    """One server-sent event (``data: ...`` and a blank line); a string is sent as is (``[DONE]``)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


def refusal_events(model: str, text: str, *, include_usage: bool = False) -> list[bytes]:
    """The SSE stream of a refusal: the role and text, then ``finish_reason="content_filter"``, then ``[DONE]``."""
    id_, created = completion_id(), int(time.time())
    events = [
        sse(chunk(model, id_, created, delta={"role": "assistant", "content": text})),
        sse(chunk(model, id_, created, finish_reason="content_filter")),
    ]
    if include_usage:
        events.append(sse(chunk(model, id_, created, usage_=usage(), choices=False)))
    events.append(sse("[DONE]"))
    return events

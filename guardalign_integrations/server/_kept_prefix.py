"""The safety prefill put back at the start of the gateway's answer (``prefix.keep_in_output``).

What: when the gateway delivered the safety prefix as an assistant prefill (DESIGN §1C,
``prefix.prefill``), the upstream's answer is the *continuation* of that prefill, as with
ETA's response prefill. With ``keep_in_output`` (the default) the answer a client gets starts
with the prefix, as every other adapter returns it (``GuardedChatModel``,
``GuardAlignLLM``): :func:`prefixed_completion` puts it before the message content of a
``chat.completion``; :func:`prefixed_stream` sends it as the first content delta, before
the upstream's first chunk, with that chunk's ``id``/``created``/``model``.

Why here and not in the relay: the pass-through path stays byte-for-byte when no prefill was
sent (the common case): these functions run only for requests whose ``delivery.prefill`` is
set, and they leave anything they do not recognise (an error body, a non-JSON event) as the
upstream sent it.
"""

from __future__ import annotations

import json
from typing import Any, AsyncIterator, Callable

from . import _chat_format

_MAX_FIRST_EVENT = 256 * 1024
"""How much of a stream is held back looking for its first event; beyond it the stream is relayed unchanged."""

_SEPARATORS = (b"\n\n", b"\r\n\r\n", b"\r\r")


def _prepend(content: Any, text: str) -> Any:
    """``content`` (a string, ``None``, or a list of parts) with ``text`` at the start of its text."""
    if content is None or isinstance(content, str):
        return text + (content or "")
    if isinstance(content, list):
        parts = list(content)
        for i, part in enumerate(parts):
            if isinstance(part, dict) and part.get("type") == "text":
                parts[i] = {**part, "text": text + str(part.get("text") or "")}
                return parts
        return [{"type": "text", "text": text}, *parts]
    return content


def _answer_start(content: Any) -> str:
    if isinstance(content, str):
        return content[:1]
    if isinstance(content, list):
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text":
                return str(part.get("text") or "")[:1]
    return ""


def prefixed_completion(data: bytes, kept_prefix: Callable[[str], str]) -> dict[str, Any] | None:
    """The ``chat.completion`` in ``data`` with the kept prefix before each choice's message content.

    Args:
        data: the upstream's answer body.
        kept_prefix: ``ScreenedBody.kept_prefix`` (the answer's first character in, the text to put before it out).

    Returns:
        The changed answer object, or ``None`` when ``data`` is not a completion with choices
        (left as sent).
    """
    try:
        body = json.loads(data)
    except ValueError:
        return None
    choices = body.get("choices") if isinstance(body, dict) else None
    if not isinstance(choices, list) or not choices:
        return None
    out = []
    for choice in choices:
        message = choice.get("message") if isinstance(choice, dict) else None
        if isinstance(message, dict) and message.get("role", "assistant") == "assistant":
            text = kept_prefix(_answer_start(message.get("content")))
            if text:
                choice = {**choice, "message": {**message, "content": _prepend(message.get("content"), text)}}
        out.append(choice)
    return {**body, "choices": out}


def _first_event(buffer: bytes) -> tuple[bytes, bytes] | None:
    """``(first event, rest)`` when ``buffer`` holds a whole SSE event, else ``None``."""
    ends = [(buffer.find(sep), sep) for sep in _SEPARATORS]
    found = [(at, sep) for at, sep in ends if at >= 0]
    if not found:
        return None
    at, sep = min(found)
    return buffer[: at + len(sep)], buffer[at + len(sep):]


def _event_chunk(event: bytes) -> dict[str, Any] | None:
    """The ``chat.completion.chunk`` an SSE event carries (``None``: another kind of event)."""
    lines = [line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")]
    if not lines:
        return None
    try:
        chunk = json.loads(b"\n".join(lines))
    except ValueError:  # "[DONE]" or not JSON
        return None
    if not isinstance(chunk, dict) or not isinstance(chunk.get("choices"), list) or not chunk["choices"]:
        return None
    return chunk


def prefix_events(chunk: dict[str, Any], kept_prefix: Callable[[str], str], choices: int) -> bytes:
    """SSE chunks carrying the kept prefix as the first content delta of each choice (``b""``: nothing to keep).

    The answer's start is read from the upstream's first chunk (usually empty: OpenAI sends the
    role first), which is how the other adapters decide whether to put the prefix's space back.
    """
    first = chunk["choices"][0]
    delta = first.get("delta") if isinstance(first, dict) else None
    text = kept_prefix(_answer_start(delta.get("content")) if isinstance(delta, dict) else "")
    if not text:
        return b""
    model = str(chunk.get("model") or "")
    id_ = str(chunk.get("id") or _chat_format.completion_id())
    created = chunk.get("created") if isinstance(chunk.get("created"), int) else 0
    out = b""
    for index in range(choices):
        event = _chat_format.chunk(model, id_, created, delta={"role": "assistant", "content": text})
        event["choices"][0]["index"] = index
        out += _chat_format.sse(event)
    return out


async def prefixed_stream(chunks: AsyncIterator[bytes], kept_prefix: Callable[[str], str], choices: int = 1) -> AsyncIterator[bytes]:
    """The upstream's SSE stream with the kept prefix sent first; everything else relayed as it arrives.

    The first event is held back until it is complete (its ``id`` names the prefix chunk);
    then the prefix, that event and every later chunk go out unchanged. A stream whose first
    event is not a completion chunk (an error event, ``[DONE]``) is relayed without a prefix.
    """
    buffer, holding = b"", True
    async for chunk in chunks:
        if not holding:
            yield chunk
            continue
        buffer += chunk
        split = _first_event(buffer)
        if split is None and len(buffer) <= _MAX_FIRST_EVENT:
            continue
        parsed = _event_chunk(split[0]) if split is not None else None
        prefix = prefix_events(parsed, kept_prefix, choices) if parsed is not None else b""
        if prefix:
            yield prefix
        yield buffer
        buffer, holding = b"", False
    if buffer:
        yield buffer

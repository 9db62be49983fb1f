"""Pure helpers between LangChain messages and the core: input conversion, safety prompt, refusals.

Nothing here touches a model, a detector or a callback. Finding images lives in
:mod:`._content` (:func:`find_images`), writing the verdict back in :mod:`._write_back`
(:func:`write_back`); both are re-exported here, the one import point of the adapters.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    BaseMessageChunk,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.utils import convert_to_messages
from langchain_core.prompt_values import PromptValue

from guardalign_core.verdicts import SafetyDelivery, SafetyPrompt

from ._content import TEXT_ONLY_TYPES, FoundImage, find_images
from ._write_back import write_back

__all__ = [
    "TEXT_ONLY_TYPES",
    "FoundImage",
    "apply_safety_prompt",
    "combine_input_chunks",
    "find_images",
    "hf_turns",
    "merge_system_text",
    "prepend_text",
    "refusal_message",
    "role_of",
    "to_messages",
    "write_back",
]


# -- input conversion ---------------------------------------------------------------------


def to_messages(value: Any) -> list[BaseMessage]:
    """Turn any ``LanguageModelInput`` (str, message list, ``PromptValue``) into messages.

    Raises:
        TypeError: for anything else.

    Example:
        >>> to_messages("hi")[0].type
        'human'
    """
    if isinstance(value, PromptValue):
        return value.to_messages()
    if isinstance(value, str):
        return [HumanMessage(content=value)]
    if isinstance(value, BaseMessage):
        return [value]
    if isinstance(value, Sequence):
        return convert_to_messages(value)
    raise TypeError(f"expected a str, a PromptValue or a sequence of messages, got {type(value).__name__}")


def combine_input_chunks(chunks: Iterable[Any]) -> Any:
    """Assemble a streamed input into one value (for ``transform``).

    Raises:
        ValueError: if the stream is empty.
    """
    final: Any = None
    seen = False
    for chunk in chunks:
        if not seen:
            final, seen = chunk, True
        elif isinstance(final, str) and isinstance(chunk, str):
            final = final + chunk
        elif isinstance(final, BaseMessageChunk) and isinstance(chunk, BaseMessageChunk):
            final = final + chunk
        else:
            final = chunk
    if not seen:
        raise ValueError("the guard received an empty input stream")
    return final


# -- safety prompt (black-box delivery, DESIGN §1C) -----------------------------------------


def role_of(message: BaseMessage) -> str:
    """The chat role of a message (streamed chunks count as their message type)."""
    if isinstance(message, ChatMessage):
        return message.role
    if isinstance(message, SystemMessage):
        return "system"
    if isinstance(message, AIMessage):
        return "assistant"
    if isinstance(message, ToolMessage):
        return "tool"
    return "user"


def merge_system_text(system: SystemMessage | None, text: str) -> SystemMessage:
    """Add ``text`` to a system message (or make one), keeping its id and metadata.

    Example:
        >>> merge_system_text(SystemMessage(content="Be brief."), "Be safe.").content
        'Be brief.\\n\\nBe safe.'
    """
    if system is None:
        return SystemMessage(content=text)
    if isinstance(system.content, str):
        content: Any = f"{system.content}\n\n{text}" if system.content else text
    else:
        content = [*system.content, {"type": "text", "text": text}]
    return system.model_copy(update={"content": content})


def apply_safety_prompt(messages: Sequence[BaseMessage], safety: SafetyPrompt) -> tuple[list[BaseMessage], SafetyDelivery]:
    """Deliver the safety prefix by prompt alone, through the core's one delivery rule.

    Returns:
        The new messages (system text merged into the leading system message or put first,
        the prefill appended as an assistant message) and the delivery used.
    """
    out = list(messages)
    delivery = safety.delivery(role_of(out[-1]) if out else None)
    if delivery.system_text:
        if out and isinstance(out[0], SystemMessage):
            out[0] = merge_system_text(out[0], delivery.system_text)
        else:
            out.insert(0, merge_system_text(None, delivery.system_text))
    if delivery.prefill:
        out.append(AIMessage(content=delivery.prefill))
    return out, delivery


def prepend_text(message: AIMessage, text: str) -> AIMessage:
    """A copy of an answer whose text starts with ``text`` (the kept prefill), whatever its content shape."""
    if not text:
        return message
    content = message.content
    if isinstance(content, str):
        return message.model_copy(update={"content": text + content})
    items = list(content)
    for i, item in enumerate(items):
        if isinstance(item, str):
            items[i] = text + item
            break
        if isinstance(item, Mapping) and item.get("type") == "text":
            items[i] = {**item, "text": text + str(item.get("text") or "")}
            break
    else:
        items.insert(0, {"type": "text", "text": text})
    return message.model_copy(update={"content": items})


def answer_start(message: BaseMessage) -> str:
    """The first characters of an answer's text (to know whether it begins with a space)."""
    return message.text[:1] if message.text else ""


def refusal_message(text: str, *, metadata: Mapping[str, Any] | None = None, chunk: bool = False) -> AIMessage:
    """An assistant message that refuses: a text block plus LangChain's standard refusal block."""
    content: list[str | dict[str, Any]] = [{"type": "text", "text": text}, {"type": "refusal", "refusal": text}]
    response_metadata = {"finish_reason": "content_filter", **(metadata or {})}
    if chunk:
        return AIMessageChunk(content=content, response_metadata=response_metadata, chunk_position="last")
    return AIMessage(content=content, response_metadata=response_metadata)


# -- to a local model (ChatGuardAlign) ------------------------------------------------------


def hf_turns(messages: Sequence[BaseMessage], found: Sequence[FoundImage]) -> list[dict[str, Any]]:
    """Framework-free chat turns for :func:`guardalign_core.pipeline.to_checked_request`.

    Text items become text parts and each image an ``{"type": "image", "index": i}`` part (its
    position in the verdict), in content order; nested images (tool results) follow their item.
    """
    where: dict[tuple[int, int], list[int]] = {}
    for i, image in enumerate(found):
        where.setdefault((image.path[0], image.path[1]), []).append(i)
    turns = []
    for m, message in enumerate(messages):
        parts: list[dict[str, Any]] = []
        items = [message.content] if isinstance(message.content, str) else message.content
        for c, item in enumerate(items):
            if isinstance(item, str):
                parts.append({"type": "text", "text": item})
            elif isinstance(item, Mapping) and item.get("type") == "text":
                parts.append({"type": "text", "text": str(item.get("text") or "")})
            for i in where.get((m, c), []) if not isinstance(message.content, str) else []:
                parts.append({"type": "image", "index": i})
        name = (message.name or getattr(message, "tool_call_id", None)) if isinstance(message, ToolMessage) else None
        turns.append({"role": role_of(message), "name": name, "content": parts})
    return turns

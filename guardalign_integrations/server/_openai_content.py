"""Every decision about OpenAI chat-message content, in one place.

What: :func:`screen_chat_body` takes an OpenAI ``/v1/chat/completions`` body, finds its
images (``image_url`` parts), hands them to the core screening step
(:meth:`guardalign_core.guard.ImageGuard.screen`: one reader, the per-request budget, the
memory of checked images, one detector batch, the policy) and writes back what its verdict
says to forward: allowed images as they came when the forwarded bytes are exactly the
inline bytes that were checked, otherwise a data URL of the verdict's bytes and MIME type
(masked images, remote images as the exact bytes that were checked; ``detail`` and other
keys kept), plus the black-box safety prompt.

Why one module: the rest of the server only sees :class:`ScreenedBody`. Default deny: a
content part or message field this module does not understand and that carries data, a
URL, a path or a file id is refused (:class:`ContentError`, a 400 naming the part type)
before anything is read, never forwarded.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Sequence

from guardalign_core._payloads import base64_head, carries_media, inline_media
from guardalign_core.guard import ContentImage, ImageGuard, RequestVerdict, SafetyPrompt
from guardalign_core.results import Status
from guardalign_core.screening import sniff_mime
from guardalign_core.verdicts import Forward, ImageVerdict, SafetyDelivery

ScreenFn = Callable[[Sequence[ContentImage]], RequestVerdict]
"""Screens one request's images: ``guard.screen`` or the server's micro-batcher (``ScanBatcher.screen``)."""

_TEXT_PARTS = {"text": ("text",), "refusal": ("refusal",), "input_audio": ("input_audio",)}
"""Part types that cannot carry an image, with the keys they may hold besides ``type``."""

_MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id", "function_call", "refusal", "audio", "reasoning_content"}
"""Message fields understood (none of them carries an image except ``content``)."""

_PLAIN_MESSAGE_KEYS = {"role", "content", "name", "tool_calls", "tool_call_id"}
"""Message fields not looked into here (``content`` is walked part by part); the other known ones must hold no inline media."""

BODY_KEYS = frozenset({
    "model", "messages", "stream", "stream_options", "temperature", "top_p", "n", "stop", "max_tokens",
    "max_completion_tokens", "presence_penalty", "frequency_penalty", "logit_bias", "logprobs", "top_logprobs",
    "user", "seed", "tools", "tool_choice", "parallel_tool_calls", "response_format", "functions", "function_call",
    "metadata", "store", "service_tier", "reasoning_effort", "modalities", "prediction", "audio",
    "web_search_options", "verbosity", "safety_identifier", "prompt_cache_key", "prompt_cache_retention",
    "prompt_cache_options", "moderation",
})
"""Top-level fields of an OpenAI chat-completions request (``openai.types.chat.completion_create_params``).

Any other top-level field (``input``, ``images``, ``prompt``, provider extensions) is forwarded
only when it carries no data, URL, path or base64 payload: upstreams such as Ollama read
images from fields this module does not screen.
"""

_DATA_KEYS = {"url", "data", "file_id", "file_data", "path", "image", "image_url", "file", "base64", "b64_json", "source", "uri", "bytes"}


class ContentError(ValueError):
    """The request cannot be screened as sent (a 400): unknown data-carrying part, malformed messages, over budget.

    ``code`` is a stable machine-readable code; the message names the position and the part
    type, never the content.
    """

    def __init__(self, message: str, *, code: str = "guardalign_invalid_content", param: str | None = None) -> None:
        self.code = code
        self.param = param
        super().__init__(message)


@dataclass
class ImageRef:
    """One image part of the request: where it sits and the URL string it was given as."""

    message: int
    part: int
    label: str
    url: str

    def content_image(self) -> ContentImage:
        return ContentImage(self.label, source=self.url, mime=declared_mime(self.url))


@dataclass
class ScreenedBody:
    """The outcome of :func:`screen_chat_body`.

    ``body`` is what to forward (``None`` when blocked); ``changed`` is false when it is the
    input object untouched (so the raw request bytes can be forwarded as they came).
    ``decision.images[i]`` is the verdict on ``refs[i]``; ``delivery`` is how the safety prompt
    was put into ``body`` (a prefill there is what :meth:`kept_prefix` puts back in the answer).
    """

    body: dict[str, Any] | None
    decision: RequestVerdict
    refs: list[ImageRef] = field(default_factory=list)
    changed: bool = False
    delivery: SafetyDelivery = SafetyDelivery(None, None)

    def kept_prefix(self, answer_start: str) -> str:
        """The text to put before the model's answer (``""``: none): the prefill, when the guard keeps it in the output.

        ``answer_start`` is the answer's first characters (``""`` when not known yet: read as
        a continuation that starts with a space, as every adapter does).
        """
        if not self.delivery.prefill:
            return ""
        return self.decision.safety_prompt.kept_prefix(self.delivery, answer_start or " ")

    @property
    def blocked(self) -> bool:
        return self.body is None

    @property
    def verdicts(self) -> list[ImageVerdict]:
        return self.decision.images

    @property
    def unreadable(self) -> bool:
        """Blocked because an image could not be checked (fail-closed), not because it was unsafe."""
        return self.blocked and self.decision.status == Status.ERROR and not self.decision.unsafe


def _carries_data(value: Any, depth: int = 0) -> bool:
    """Whether an unknown part/field holds something that could be (or point to) an image."""
    if depth > 8:
        return True
    if isinstance(value, dict):
        return any(k in _DATA_KEYS or _carries_data(v, depth + 1) for k, v in value.items())
    if isinstance(value, (list, tuple)):
        return any(_carries_data(v, depth + 1) for v in value)
    if isinstance(value, str):
        text = value.strip().lower()
        return len(text) > 256 or text.startswith(("data:", "http:", "https:", "file:", "/", "\\", "~"))
    return isinstance(value, (bytes, bytearray))


def _suspicious(value: Any) -> bool:
    """Whether an unknown field holds data, a URL, a path or a base64 payload (any length) anywhere."""
    return _carries_data(value) or carries_media(value)


def check_body_fields(body: dict[str, Any], known: Collection[str] = BODY_KEYS, kind: str = "chat-completions") -> None:
    """Refuse top-level fields outside ``known`` that carry data (default deny).

    Args:
        body: the parsed request body.
        known: the fields this API defines (default :data:`BODY_KEYS`); the LiteLLM guardrail
            endpoint passes its own request's fields.
        kind: the API's name, for the error message.

    Raises:
        ContentError: such a field is present.
    """
    for key, value in body.items():
        if key not in known and _suspicious(value):
            raise ContentError(
                f"top-level field {key!r} is not a {kind} field GuardAlign screens and carries data; "
                "it is refused, not forwarded",
                code="guardalign_unsupported_content",
                param=key,
            )


def _image_url(part: dict[str, Any], where: str) -> str:
    value = part.get("image_url")
    url = value.get("url") if isinstance(value, dict) else value
    if not isinstance(url, str) or not url.strip():
        raise ContentError(f"{where}: image_url part without a url string", param=where)
    return url


def collect_images(messages: Any) -> list[ImageRef]:
    """Find every image part of the messages (nothing is read yet), refusing what cannot be screened.

    Raises:
        ContentError: messages malformed, or an unknown part type or message field carrying data.
    """
    if not isinstance(messages, list) or not messages:
        raise ContentError("messages: expected a non-empty list of messages", param="messages")
    refs: list[ImageRef] = []
    for m, message in enumerate(messages):
        where = f"messages[{m}]"
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise ContentError(f"{where}: expected an object with a string 'role'", param=where)
        for key in message:
            if key not in _MESSAGE_KEYS and _suspicious(message[key]):
                raise ContentError(f"{where}: field {key!r} is not understood and carries data; it is refused, not forwarded", param=f"{where}.{key}")
            if key in _MESSAGE_KEYS and key not in _PLAIN_MESSAGE_KEYS and inline_media(message[key]):
                raise ContentError(
                    f"{where}: field {key!r} holds inline media, which GuardAlign does not screen there; it is refused, not forwarded",
                    code="guardalign_unsupported_content",
                    param=f"{where}.{key}",
                )
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise ContentError(f"{where}.content: expected a string or a list of parts", param=f"{where}.content")
        for p, part in enumerate(content):
            pwhere = f"{where}.content[{p}]"
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise ContentError(f"{pwhere}: expected an object with a string 'type'", param=pwhere)
            kind = part["type"]
            known = _TEXT_PARTS.get(kind, ("image_url",) if kind == "image_url" else None)
            if known is not None:
                extra = {k: v for k, v in part.items() if k != "type" and k not in known}
                inner = part.get("image_url") if kind == "image_url" and isinstance(part.get("image_url"), dict) else {}
                extra.update({f"image_url.{k}": v for k, v in inner.items() if k not in ("url", "detail")})
                if _suspicious(extra):
                    raise ContentError(
                        f"{pwhere}: a {kind!r} part with extra fields that carry data ({', '.join(sorted(extra))}); refused, not forwarded",
                        code="guardalign_unsupported_content",
                        param=pwhere,
                    )
            if kind == "input_audio" and _audio_is_an_image(part.get("input_audio")):
                raise ContentError(
                    f"{pwhere}: an 'input_audio' part whose data are image bytes; refused, not forwarded",
                    code="guardalign_unsupported_content",
                    param=pwhere,
                )
            if kind in _TEXT_PARTS:
                continue
            if kind != "image_url":
                if _suspicious({k: v for k, v in part.items() if k != "type"}):
                    raise ContentError(
                        f"{pwhere}: content part type {kind!r} is not screened by GuardAlign and carries data; "
                        "it is refused, not forwarded",
                        code="guardalign_unsupported_content",
                        param=pwhere,
                    )
                continue
            url = _image_url(part, pwhere)
            refs.append(ImageRef(m, p, pwhere, url))
    return refs


def _audio_is_an_image(audio: Any) -> bool:
    """Whether an ``input_audio`` part's base64 ``data`` starts like an image file (PNG, JPEG, GIF, WebP, ...).

    Only the first bytes are decoded; audio containers (WAV, MP3, M4A, ...) have signatures of
    their own, so real audio is never mistaken for an image.
    """
    data = audio.get("data") if isinstance(audio, dict) else None
    if not isinstance(data, str):
        return False
    head = base64_head(data.lstrip(), max_chars=64)
    return head is not None and sniff_mime(head) is not None


def data_url(data: bytes, mime: str) -> str:
    """A ``data:`` URL for bytes the guard said to forward, with the MIME type it read from them."""
    return f"data:{mime};base64,{base64.b64encode(data).decode('ascii')}"


def declared_mime(url: str) -> str | None:
    """The MIME type a ``data:`` URL declares (``None`` for anything else)."""
    if not url[:5].lower() == "data:":
        return None
    header = url[5:].split(",", 1)[0]
    return header.split(";", 1)[0].strip().lower() or None


def _set_url(part: dict[str, Any], url: str) -> dict[str, Any]:
    value = part.get("image_url")
    new = dict(part)
    new["image_url"] = {**value, "url": url} if isinstance(value, dict) else {"url": url}
    return new


def apply_safety_prompt(messages: list[dict[str, Any]], safety: SafetyPrompt) -> tuple[list[dict[str, Any]], SafetyDelivery]:
    """Add the planned safety prompt as :meth:`SafetyPrompt.delivery` says for this request.

    The system text goes into the leading system/developer message (or a new first one);
    a prefill becomes a trailing assistant turn, unless the request already ends with one.

    Returns:
        The messages and the delivery used (what the answer may need put back: the prefill).
    """
    if not safety.applied:
        return messages, SafetyDelivery(None, None)
    out = list(messages)
    last = out[-1].get("role") if out else None
    delivery = safety.delivery(last if isinstance(last, str) else None)
    text, prefill = delivery
    if text:
        first = out[0] if out else None
        if first is not None and first.get("role") in ("system", "developer"):
            content = first.get("content")
            if isinstance(content, list):
                merged: Any = [*content, {"type": "text", "text": text}]
            else:
                merged = f"{content}\n\n{text}" if content else text
            out[0] = {**first, "content": merged}
        else:
            out.insert(0, {"role": "system", "content": text})
    if prefill:
        out.append({"role": "assistant", "content": prefill})
    return out, delivery


def forwarded_url(url: str, verdict: ImageVerdict) -> str | None:
    """The URL to forward for an image sent as ``url``, as its verdict says (``None``: nothing).

    ``Forward.BYTES``: ``url`` itself only when the core says it may go as it came
    (:attr:`~guardalign_core.verdicts.ImageVerdict.verbatim`: it inlines exactly the bytes to
    forward, under the MIME type read from them, in canonical base64); otherwise a data URL
    of those bytes (the model gets exactly what was checked: never what a remote URL serves
    later, nor what a lenient decoder reads from a URL-safe payload). ``AS_SENT``
    (``fail_open`` only): ``url``.
    """
    if verdict.forward == Forward.NOTHING:
        return None
    if verdict.forward == Forward.AS_SENT:
        return url
    if verdict.verbatim:  # the core's call: unchanged bytes, declared type right, canonical base64
        return url
    return data_url(verdict.data, verdict.mime)  # type: ignore[arg-type]


def rewrite_messages(messages: list[dict[str, Any]], refs: Sequence[ImageRef], verdicts: Sequence[ImageVerdict]) -> tuple[list[dict[str, Any]], bool]:
    """The messages with each image part replaced as its verdict says; unchanged parts are the same objects.

    ``Forward.BYTES``: a data URL of the verdict's bytes (kept as sent when it already is
    exactly that); ``AS_SENT`` (``fail_open`` only): kept; ``NOTHING``: the part is dropped.
    """
    if len(refs) != len(verdicts):
        raise RuntimeError("the guard returned a verdict count that does not match the request's images")
    replacements: dict[tuple[int, int], str | None] = {}
    for ref, verdict in zip(refs, verdicts):
        url = forwarded_url(ref.url, verdict)
        if url is not ref.url:
            replacements[(ref.message, ref.part)] = url
    if not replacements:
        return messages, False
    out = list(messages)
    for (m, p), url in replacements.items():
        if out[m] is messages[m]:
            out[m] = {**messages[m], "content": list(messages[m]["content"])}
        if url is not None:
            out[m]["content"][p] = _set_url(out[m]["content"][p], url)
    dropped = {key for key, url in replacements.items() if url is None}
    for m in {m for m, _ in dropped}:
        out[m]["content"] = [part for p, part in enumerate(out[m]["content"]) if (m, p) not in dropped]
    return out, True


def screen_images(refs: Sequence[ImageRef], guard: ImageGuard, screen: ScreenFn | None = None) -> RequestVerdict:
    """The core's verdict on the request's images (the budget included).

    Raises:
        ContentError: the request goes over its image budget (``ImageLimits.max_images`` /
            ``max_total_bytes`` / ``max_total_pixels``) or was refused as a whole.
    """
    images = [ref.content_image() for ref in refs]
    verdict = (screen or guard.screen)(images) if images else guard.screen([])
    if verdict.refused is not None:
        raise ContentError(verdict.refused, code="guardalign_image_budget")
    return verdict


def screen_chat_body(
    body: dict[str, Any], guard: ImageGuard, *, screen: ScreenFn | None = None, safety_prompt: bool = True
) -> ScreenedBody:
    """Screen an OpenAI chat-completions body and return what may be forwarded.

    Args:
        body: the parsed request body (not modified).
        guard: the core guard (policy, limits, prefix settings).
        screen: how the images are screened (default ``guard.screen``; the server passes
            its micro-batcher's ``screen``).
        safety_prompt: add the black-box safety prompt the guard plans.

    Returns:
        A :class:`ScreenedBody`; ``body`` is ``None`` when the request is blocked.

    Raises:
        ContentError: the request cannot be screened as sent (see :func:`collect_images`,
            :func:`screen_images`).

    Example:
        >>> screen_chat_body({"model": "m", "messages": [{"role": "user", "content": "hi"}]}, guard).changed  # doctest: +SKIP
        False
    """
    check_body_fields(body)
    messages = body.get("messages")
    refs = collect_images(messages)
    decision = screen_images(refs, guard, screen)
    if decision.blocked:
        return ScreenedBody(None, decision, refs)
    new_messages, changed = rewrite_messages(messages, refs, decision.images)
    delivery = SafetyDelivery(None, None)
    if safety_prompt and decision.safety_prompt.applied:
        (new_messages, delivery), changed = apply_safety_prompt(new_messages, decision.safety_prompt), True
    if not changed:
        return ScreenedBody(body, decision, refs, changed=False)
    return ScreenedBody({**body, "messages": new_messages}, decision, refs, changed=True, delivery=delivery)


def decision_header(decision: RequestVerdict) -> str:
    """The ``x-guardalign-decision`` value: the decision, plus ``; status=error`` when a check could not run."""
    return decision.decision.value + ("; status=error" if decision.status == Status.ERROR else "")


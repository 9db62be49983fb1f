"""The one verdict vocabulary: what the guard decided for each image and for the request.

:meth:`ImageGuard.screen <guardalign_core.guard.ImageGuard.screen>` returns a
:class:`RequestVerdict`; its :class:`ImageVerdict` entries say exactly what an adapter may
forward for each image (nothing, these bytes with this MIME type, or, only under
``fail_open``, the block as it was sent). Every adapter reports a decision through
:meth:`RequestVerdict.summary` (response metadata, callback and instrumentation events), refuses
with :data:`DEFAULT_REFUSAL` and :meth:`RequestVerdict.blocked_reason`, and delivers the
black-box safety prompt through :meth:`SafetyPrompt.delivery`, so the adapters cannot drift
apart on any of them.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, NamedTuple

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from .results import Decision, ScanResult, Status

__all__ = [
    "DEFAULT_REFUSAL",
    "Forward",
    "ImageVerdict",
    "RequestVerdict",
    "SafetyDelivery",
    "SafetyPrompt",
]

DEFAULT_REFUSAL = "I can't help with this request: an image in it was blocked by the safety guard."
"""The assistant text every adapter returns instead of an answer when a request is blocked."""


class Forward(str, Enum):
    """What an adapter forwards in place of one image."""

    NOTHING = "nothing"  # blocked (or refused): the image, and its block, are not forwarded
    BYTES = "bytes"  # exactly ImageVerdict.data, as ImageVerdict.mime (sanitised, or the bytes that were checked)
    AS_SENT = "as_sent"  # only under fail_open: the check could not run; the block goes on as it came


class ImageVerdict:
    """The guard's verdict on one image of a request, and what to forward for it.

    Attributes:
        index: the image's position in the request.
        label: a content-free name of where it sits (``"messages[0].content[1]"``).
        result: the detector's verdict with the policy applied (no pixels for a reused one).
        forward: :class:`Forward`: nothing, :attr:`data`, or the block as sent.
        data: the bytes to forward (``forward == BYTES``): the sanitised re-encode, or exactly
            the bytes that were checked.
        mime: the MIME type of :attr:`data`, read from its bytes (not from what the block claimed).
        checked: the exact bytes that were checked (``None`` when the image could not be read).
        sanitised: :attr:`data` is the guard's re-encode of the checked pixels (masked, or an
            image whose original bytes cannot be forwarded as sent).
        reused: the verdict came from the guard's memory (this image was checked before).
        verbatim: the carrier may be forwarded exactly as it came: :attr:`data` are the
            checked bytes unchanged, the carrier declared their real MIME type, and it spells
            them canonically (raw bytes, or strictly valid standard base64 inline), so every
            decoder reads what was checked. Otherwise an adapter writes :attr:`data` back in
            its carrier's shape (a URL-safe or line-wrapped payload, a remote URL, a wrong
            declared type are all replaced by the checked bytes).

    Example:
        >>> verdict = guard.screen([ContentImage("upload", source=png_bytes)])  # doctest: +SKIP
        >>> entry = verdict.images[0]  # doctest: +SKIP
        >>> entry.forward, entry.mime, entry.data == png_bytes  # doctest: +SKIP
        (<Forward.BYTES: 'bytes'>, 'image/png', True)
    """

    __slots__ = ("index", "label", "result", "forward", "data", "mime", "checked", "sanitised", "reused", "verbatim", "_limits", "_pixels",
                 "_lock")

    def __init__(
        self,
        index: int,
        label: str,
        result: ScanResult,
        forward: Forward,
        *,
        data: bytes | None = None,
        mime: str | None = None,
        checked: bytes | None = None,
        sanitised: bool = False,
        reused: bool = False,
        pixels: Image.Image | None = None,
        limits: Any = None,
        verbatim: bool = False,
    ) -> None:
        if forward == Forward.BYTES and (data is None or not mime):
            raise ValueError("forward=BYTES needs the bytes and their MIME type")
        if verbatim and (forward != Forward.BYTES or sanitised or data != checked):
            raise ValueError("verbatim: only unchanged checked bytes may go as they came")
        self.index, self.label, self.result, self.forward = index, label, result, forward
        self.data, self.mime, self.checked = data, mime, checked
        self.sanitised, self.reused, self.verbatim = sanitised, reused, verbatim
        self._limits = limits
        self._pixels = pixels
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        size = len(self.data) if self.data is not None else None
        return f"ImageVerdict(index={self.index}, label={self.label!r}, decision={self.result.decision.value!r}, forward={self.forward.value!r}, mime={self.mime!r}, bytes={size})"

    @property
    def decision(self) -> Decision:
        return self.result.decision

    def pixels(self) -> Image.Image | None:
        """The checked (and, when masked, sanitised) RGB pixels, for a local model; ``None`` when nothing may be shown.

        A fresh verdict already holds the pixels the detector decoded; a reused one decodes
        :attr:`data` on the first call, once. An image forwarded ``AS_SENT`` (unchecked) or
        not at all has no pixels: a local model is never shown what was not checked.
        """
        if self.forward != Forward.BYTES:
            return None
        if self._pixels is None:
            with self._lock:
                if self._pixels is None:
                    from .images import load_image

                    self._pixels = load_image(self.data, self._limits, source=self.label)  # type: ignore[arg-type]
        return self._pixels

    def summary(self) -> dict[str, Any]:
        """The per-image part of :meth:`RequestVerdict.summary` (no pixels, no content)."""
        return {**self.result.summary(), "forward": self.forward.value, "mime": self.mime, "sanitised": self.sanitised, "reused": self.reused}


class SafetyDelivery(NamedTuple):
    """How the safety prompt is put into one request (see :meth:`SafetyPrompt.delivery`)."""

    system_text: str | None
    """Text to add to the leading system message (or as a new one)."""
    prefill: str | None
    """A trailing assistant message to append (no trailing whitespace: providers reject it)."""


class SafetyPrompt(BaseModel):
    """How the safety prefix reaches a black-box model (DESIGN §1C). Empty when not applied."""

    model_config = ConfigDict(frozen=True)

    applied: bool = False
    system_instruction: str | None = Field(None, description="A safety instruction to add as (or to) the system message.")
    prefill: str | None = Field(None, description="The prefix as an assistant prefill, for providers that accept one.")
    begin_with: str | None = Field(None, description="An instruction to begin the answer with the prefix (no prefill).")
    keep_in_output: bool = Field(True, description="Put a prefilled prefix back at the start of the answer.")

    def system_text(self) -> str | None:
        """The full system text to add: the safety instruction plus, without prefill, the begin-with request."""
        parts = [p for p in (self.system_instruction, self.begin_with) if p]
        return "\n\n".join(parts) if parts else None

    def delivery(self, last_role: str | None) -> SafetyDelivery:
        """What to add to a request whose last message has ``last_role`` (``"assistant"``, ``"user"``, ...).

        The prefill goes out without trailing whitespace (Anthropic answers 400 "final
        assistant content cannot end with trailing whitespace" otherwise). A request that
        already ends with an assistant turn cannot take a second one: the prefix is then asked
        for by instruction instead.

        Example:
            >>> plan = SafetyPrompt(applied=True, system_instruction="Be safe.", prefill="As an AI assistant, ")
            >>> plan.delivery("user").prefill
            'As an AI assistant,'
            >>> plan.delivery("assistant").prefill is None
            True
        """
        if not self.applied:
            return SafetyDelivery(None, None)
        prefill = (self.prefill or "").rstrip() or None
        if prefill is None:
            return SafetyDelivery(self.system_text(), None)
        if last_role == "assistant":
            begin = f'Begin your answer with "{prefill}".'
            return SafetyDelivery("\n\n".join(p for p in (self.system_instruction, begin) if p), None)
        return SafetyDelivery(self.system_instruction or None, prefill)

    def kept_prefix(self, delivery: SafetyDelivery, answer_start: str = " ") -> str:
        """What to put before the model's answer so the returned text starts with the prefill (``""`` if none).

        The prefill was sent without its trailing whitespace; a continuation normally starts
        with a space, and when it does not the space the prefix had is put back.
        """
        if not delivery.prefill or not self.keep_in_output:
            return ""
        original = self.prefill or ""
        if original != original.rstrip() and answer_start[:1] and not answer_start[:1].isspace():
            return original
        return delivery.prefill


class RequestVerdict(BaseModel):
    """The guard's verdict on one request: per-image entries combined, plus the safety prompt it planned.

    ``decision`` is the most severe per-image decision (block > mask > flag > allow);
    ``status`` is ``error`` if any image could not be checked.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    decision: Decision
    status: Status
    policy: str
    reason: str
    images: list[ImageVerdict] = Field(default_factory=list, description="One entry per image, in request order.")
    safety_prompt: SafetyPrompt = Field(default_factory=SafetyPrompt)
    refused: str | None = Field(None, description="Why the request was refused as a whole (budget, a block type not understood).")

    @property
    def results(self) -> list[ScanResult]:
        """The per-image scan results, in order."""
        return [entry.result for entry in self.images]

    @property
    def blocked(self) -> bool:
        return self.decision == Decision.BLOCK

    @property
    def unsafe(self) -> bool:
        return any(entry.result.unsafe for entry in self.images)

    @property
    def score(self) -> float | None:
        scores = [entry.result.score for entry in self.images if entry.result.score is not None]
        return min(scores) if scores else None

    def summary(self) -> dict[str, Any]:
        """The one JSON summary of a decision: every adapter's metadata and every event carry exactly this."""
        return {
            "decision": self.decision.value,
            "status": self.status.value,
            "policy": self.policy,
            "blocked": self.blocked,
            "unsafe": self.unsafe,
            "reason": self.reason,
            "refused": self.refused,
            "prefix_applied": self.safety_prompt.applied,
            "images": [entry.summary() for entry in self.images],
        }

    def blocked_reason(self) -> str:
        """Why the request was blocked, naming each blocked image by label and what was wrong (never its content)."""
        parts = []
        for entry in self.images:
            result = entry.result
            if result.decision != Decision.BLOCK:
                continue
            label = result.source or entry.label
            part = f"{label}: {result.reason}"
            if result.error:
                detail = result.error[len(label) + 2 :] if result.error.startswith(f"{label}: ") else result.error
                part += f" ({detail})"
            parts.append(part)
        detail = "; ".join(parts) or self.reason
        return f"GuardAlign blocked the request — {self.reason}. {detail}" if parts else f"GuardAlign blocked the request — {detail}"

"""What a guard remembers about the images it has checked or produced.

Chat histories and agent loops resend the same images at every step, and a guarded LLM
behind a RAG postprocessor receives images that the postprocessor already sanitised.
Looking them up here saves a CLIP pass each time, and keeps pixels stable: masking is not
idempotent (each patch's OT weight depends on every patch), so the guard's own output must
be recognised and never masked again.

Entries are keyed by ``(config fingerprint, SHA-256 of the image bytes)``: a config change
invalidates them, the same picture is recognised whether it came as bytes, a file or a
``data:`` URL, and only bytes this process has seen can hit, so an input cannot forge an
entry. Remote URLs are never remembered (their content can change).
"""

from __future__ import annotations

import hashlib
from typing import Any, NamedTuple

from ._lru import BoundedLRU
from .config import GuardConfig
from .results import Decision, ScanResult

DEFAULT_MAX_ENTRIES = 64
"""How many images a guard remembers by default."""

DEFAULT_MAX_BYTES = 64 * 1024 * 1024
"""How many bytes of sanitised PNGs a guard keeps by default."""

MemoryKey = tuple[str, str]
"""``(config fingerprint, SHA-256 of the image bytes)``."""


class CheckedImage(NamedTuple):
    """What a guard remembers about one image."""

    result: ScanResult
    """The verdict without pixels; its reason says it was reused or is the guard's own output."""
    png: bytes | None
    """The sanitised PNG to forward in its place, or ``None``: forward the image as sent."""


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def config_fingerprint(config: GuardConfig, detector: Any = None) -> str:
    """A digest of what decides a verdict, so that any change invalidates what was remembered.

    That is the guard's config and, when given, the detector that actually scans (its own
    config, class and concept-bank contents: a detector passed in, or a bank file edited on
    disk, must not inherit another's verdicts).
    """
    parts = [config.model_dump_json()]
    if detector is not None:
        parts.append(type(detector).__qualname__)
        detector_config = getattr(detector, "config", None)
        if detector_config is not None:
            parts.append(detector_config.model_dump_json())
        for attribute in ("bank", "reference"):  # the unsafe bank and the contrast rule's reference bank
            bank = getattr(detector, attribute, None)
            if bank is not None and hasattr(bank, "fingerprint"):
                parts.append(f"{attribute}:{bank.fingerprint()}")
    return _digest("\n".join(parts).encode())


class CheckedImageMemory(BoundedLRU[MemoryKey, CheckedImage]):
    """Images one guard has checked or produced: bounded in entries and in stored PNG bytes, thread-safe.

    The least recently used entries go first once there are more than ``max_entries`` or
    their PNGs add up to more than ``max_bytes``.

    Args:
        max_entries: the most images remembered (default 64).
        max_bytes: the most bytes of sanitised PNGs kept (default 64 MiB).

    Raises:
        ValueError: a negative bound.

    Example:
        >>> memory = CheckedImageMemory(max_entries=8)
        >>> memory.recall("fingerprint", b"unseen bytes") is None
        True
    """

    def __init__(self, max_entries: int = DEFAULT_MAX_ENTRIES, max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        for name, value in (("max_entries", max_entries), ("max_bytes", max_bytes)):
            if value < 0:
                raise ValueError(f"{name}: must be at least 0, got {value}")
        super().__init__(max_entries, max_bytes, size=lambda entry: len(entry[1] or b""))

    def recall(self, fingerprint: str, content: bytes) -> CheckedImage | None:
        """What was remembered about these bytes under this config, if anything."""
        return self.get((fingerprint, _digest(content)))

    def remember(self, fingerprint: str, content: bytes | None, result: ScanResult, png: bytes | None) -> None:
        """Remember a fresh verdict on ``content`` (if known), and its sanitised ``png`` as already sanitised.

        A ``mask`` verdict without its PNG is not remembered: reusing it would forward the
        original pixels.
        """
        if result.decision == Decision.MASK and png is None:
            return
        if content is not None:
            reused = result.model_copy(update={"masked_image": None, "reason": f"{result.reason} (reused)"})
            self.put((fingerprint, _digest(content)), CheckedImage(reused, png))
        if png is not None:
            done = result.model_copy(update={"masked_image": None, "reason": f"already sanitised by this guard: {result.reason}"})
            self.put((fingerprint, _digest(png)), CheckedImage(done, None))

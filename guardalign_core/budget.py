"""Per-request accounting of images, encoded bytes and decoded pixels.

One :class:`RequestBudget` per request (a list of messages, a RAG query's nodes). Every
image is charged before the work it stands for: its count and encoded bytes when they are
read, its pixels from the header before they are decoded (``decode_image(..., budget=...)``).
A charge that would go over any budget raises :class:`~guardalign_core.errors.RequestBudgetError`
and changes nothing, so the caller can refuse the request with nothing half-counted.

The defaults follow Bedrock Guardrails' spirit (at most 20 images a request) and keep a
request's decoded pixels at ~100 MP (~300 MB of RGB), whatever the per-image limits allow.
"""

from __future__ import annotations

import threading

from ._limits import ImageLimits
from .errors import RequestBudgetError


class RequestBudget:
    """Counts what one request has used of ``max_images``, ``max_total_bytes`` and ``max_total_pixels``.

    Args:
        limits: the limits whose per-request fields are enforced (default :class:`ImageLimits`).

    Example:
        >>> from guardalign_core.budget import RequestBudget
        >>> from guardalign_core.images import ImageLimits
        >>> budget = RequestBudget(ImageLimits(max_images=1))
        >>> budget.charge(images=1, nbytes=1000)
        >>> budget.images, budget.total_bytes
        (1, 1000)
        >>> budget.charge(images=1)
        Traceback (most recent call last):
        ...
        guardalign_core.errors.RequestBudgetError: image 2 of this request is over the limit of 1 images per request; raise ImageLimits.max_images to accept more
    """

    def __init__(self, limits: ImageLimits | None = None) -> None:
        self.limits = limits or ImageLimits()
        self.images = 0
        self.total_bytes = 0
        self.total_pixels = 0
        self._lock = threading.Lock()  # one request's images may be read from several threads

    def charge(self, *, images: int = 0, nbytes: int = 0, pixels: int = 0, source: str | None = None) -> None:
        """Add to the request's totals, or raise without adding anything.

        Args:
            images: images to count (1 when an image is first read, 0 when charging its pixels).
            nbytes: encoded bytes read for it.
            pixels: decoded pixels (width × height) it will cost.
            source: a short label for the error message (``"message 2, image 1"``).

        Raises:
            RequestBudgetError: the charge would exceed a budget; ``err.budget`` names the
                ``ImageLimits`` field to raise.
            ValueError: a negative amount.
        """
        for name, value in (("images", images), ("nbytes", nbytes), ("pixels", pixels)):
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"{name} must be a non-negative int, got {value!r}")
        limits = self.limits
        with self._lock:
            if self.images + images > limits.max_images:
                raise RequestBudgetError(
                    f"image {self.images + images} of this request is over the limit of {limits.max_images} images "
                    "per request; raise ImageLimits.max_images to accept more",
                    budget="max_images",
                    source=source,
                )
            if self.total_bytes + nbytes > limits.max_total_bytes:
                raise RequestBudgetError(
                    f"this request's images add up to more than {limits.max_total_bytes} encoded bytes; "
                    "raise ImageLimits.max_total_bytes to accept more",
                    budget="max_total_bytes",
                    source=source,
                )
            if self.total_pixels + pixels > limits.max_total_pixels:
                raise RequestBudgetError(
                    f"this request's images add up to more than {limits.max_total_pixels} pixels; "
                    "raise ImageLimits.max_total_pixels to accept more",
                    budget="max_total_pixels",
                    source=source,
                )
            self.images += images
            self.total_bytes += nbytes
            self.total_pixels += pixels

    def remaining(self) -> dict[str, int]:
        """What is left of each budget, keyed by its ``ImageLimits`` field."""
        with self._lock:
            return {
                "max_images": self.limits.max_images - self.images,
                "max_total_bytes": self.limits.max_total_bytes - self.total_bytes,
                "max_total_pixels": self.limits.max_total_pixels - self.total_pixels,
            }

    def __repr__(self) -> str:
        return f"RequestBudget(images={self.images}, total_bytes={self.total_bytes}, total_pixels={self.total_pixels})"

"""Exception hierarchy. Bad arguments raise ``ValueError``/``TypeError``; runtime failures a ``GuardAlignError``."""

from __future__ import annotations

from typing import Any


class GuardAlignError(Exception):
    """Base class for runtime failures raised by GuardAlign."""


class ImageError(GuardAlignError, ValueError):
    """An input could not be turned into a checked RGB image.

    ``source`` names the input (its position in a batch or a short, non-sensitive label),
    never its content.
    """

    def __init__(self, message: str, *, source: str | None = None) -> None:
        self.source = source
        super().__init__(f"{source}: {message}" if source else message)


class EmptyImageError(ImageError):
    """The input holds no bytes."""


class UnsupportedImageFormatError(ImageError):
    """The bytes are not a raster image format we decode (e.g. SVG, PDF, text)."""


class CorruptImageError(ImageError):
    """The bytes look like an image but are truncated or damaged."""


class ImageTooLargeError(ImageError):
    """The image is over the configured byte or pixel limit (decompression-bomb guard)."""


class ImageAspectRatioError(ImageTooLargeError):
    """The image's long side is too many times its short side (``ImageLimits.max_aspect_ratio``).

    A subclass of :class:`ImageTooLargeError` because it guards the same thing: a legal pixel
    count in an extreme shape (1×500,000) costs seconds and gigabytes in every resize after it.
    """


class RequestBudgetError(ImageError):
    """One request holds more images, bytes or pixels than its per-request budget allows.

    Attributes:
        budget: the ``ImageLimits`` field that was exceeded (``"max_images"``,
            ``"max_total_bytes"`` or ``"max_total_pixels"``).
    """

    def __init__(self, message: str, *, budget: str, source: str | None = None) -> None:
        self.budget = budget
        super().__init__(message, source=source)


class InvalidImageSourceError(ImageError):
    """The input is not a path, bytes, base64 string, data URL or PIL image, or is malformed."""


class LocalFileRefusedError(InvalidImageSourceError):
    """Message content named a local file, and local files are not read (or this one cannot be).

    The message is the same whether or not the file exists, whatever its size or content.
    """


class RemoteImageError(ImageError):
    """A remote URL was given but fetching is off, the host is not allowed, or the fetch failed."""


class ModelLoadError(GuardAlignError):
    """A model or checkpoint could not be loaded."""


class UnsupportedModelError(GuardAlignError):
    """The model lacks what a feature needs (e.g. no attention layers on the expected path)."""


class ConceptBankError(GuardAlignError, ValueError):
    """The unsafe-concept bank file is malformed."""


class GuardAlignViolation(GuardAlignError):
    """Raised by the ``block`` policy: the request was not forwarded.

    Attributes:
        decision: the inspectable decision (per-image results, policy, reason).
    """

    def __init__(self, message: str, decision: Any = None) -> None:
        self.decision = decision
        super().__init__(message)

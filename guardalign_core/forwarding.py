"""The one encoder of images forwarded to a model: provider-sized, honestly labelled.

A masked or fetched image used to be re-encoded as lossless PNG whatever it was: a 1.9 MB
4000×3000 JPEG with two patches masked became 11.1 MB of PNG (≈14.8 MB of base64), over
Anthropic's 5 MB limit, so the provider refused what the guard had let through. Here:

- the input's format is kept where that is safe: JPEG stays JPEG (quality 95, no chroma
  subsampling, so a masked box stays black to within a few levels), PNG stays PNG, WebP
  becomes lossless WebP (PNG where Pillow lacks WebP), anything else becomes PNG;
- the result never exceeds ``max_bytes``: if it would, the image is downscaled (area-
  averaging, which an image-scaling attack cannot steer) until it fits, and the result says so;
- the declared MIME type is read back from the bytes written, never assumed.
"""

from __future__ import annotations

import io
import math
from dataclasses import dataclass

from PIL import Image, features

from ._decode import DecodedImage
from ._limits import ImageLimits
from .errors import ImageTooLargeError

JPEG_QUALITY = 95
_MIN_SIDE = 16
_MAX_ATTEMPTS = 8


@dataclass(frozen=True)
class EncodedImage:
    """Bytes ready to forward.

    Attributes:
        data: the encoded image.
        mime: its MIME type, sniffed from ``data``.
        size: ``(width, height)`` of the encoded pixels.
        downscaled: True when the pixels were shrunk to fit the byte budget.
        reencoded: False when ``data`` are the caller's original bytes, unchanged.
    """

    data: bytes
    mime: str
    size: tuple[int, int]
    downscaled: bool = False
    reencoded: bool = True

    @property
    def nbytes(self) -> int:
        """``len(data)``."""
        return len(self.data)


def sniff_image_mime(data: bytes) -> str | None:
    """The MIME type of encoded image bytes, from their signature (None when unknown).

    Example:
        >>> sniff_image_mime(b"\\x89PNG\\r\\n\\x1a\\n...")
        'image/png'
    """
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "image/png"
    if data.startswith(b"\xff\xd8\xff"):
        return "image/jpeg"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "image/gif"
    return None


def _target_format(like_format: str | None) -> str:
    fmt = (like_format or "").upper()
    if fmt in ("JPEG", "JPG", "MPO") or fmt == "IMAGE/JPEG":
        return "JPEG"
    if fmt in ("WEBP", "IMAGE/WEBP"):
        return "WEBP" if features.check("webp") else "PNG"
    return "PNG"


def _encode(image: Image.Image, fmt: str) -> bytes:
    buffer = io.BytesIO()
    if fmt == "JPEG":
        image.save(buffer, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False)
    elif fmt == "WEBP":
        image.save(buffer, format="WEBP", lossless=True, quality=50, method=4)
    else:
        image.save(buffer, format="PNG", compress_level=6)
    return buffer.getvalue()


def encode_for_forwarding(image: Image.Image, *, like_format: str | None = None, max_bytes: int | None = None) -> EncodedImage:
    """Encode checked (possibly masked) pixels for a model, within a byte budget.

    Args:
        image: the pixels to forward (RGB; other modes are converted).
        like_format: the input's format (``DecodedImage.format``, or a MIME type); decides
            the output format as described in the module docstring. None means PNG.
        max_bytes: the largest acceptable result (default ``ImageLimits().max_output_bytes``).

    Returns:
        An :class:`EncodedImage` whose ``mime`` matches its bytes; ``downscaled`` says
        whether it had to be shrunk.

    Raises:
        ImageTooLargeError: even a ``16``-pixel-side version does not fit ``max_bytes``.

    Example:
        >>> from PIL import Image
        >>> out = encode_for_forwarding(Image.new("RGB", (64, 64)), like_format="JPEG")
        >>> out.mime, out.downscaled
        ('image/jpeg', False)
    """
    max_bytes = ImageLimits().max_output_bytes if max_bytes is None else max_bytes
    if max_bytes <= 0:
        raise ValueError(f"max_bytes must be positive, got {max_bytes}")
    if image.mode != "RGB":
        image = image.convert("RGB")
    fmt = _target_format(like_format)
    current, downscaled = image, False
    for _attempt in range(_MAX_ATTEMPTS):
        data = _encode(current, fmt)
        if len(data) <= max_bytes:
            mime = sniff_image_mime(data)
            if mime is None:  # pragma: no cover - Pillow wrote a format we do not recognise
                raise RuntimeError(f"encoded {fmt} bytes have no known signature")
            return EncodedImage(data=data, mime=mime, size=current.size, downscaled=downscaled)
        # Bytes scale roughly with pixels: shrink the area by the overshoot, with 10% margin.
        factor = math.sqrt(max_bytes / len(data)) * 0.9
        width, height = current.size
        new_size = (max(1, int(width * factor)), max(1, int(height * factor)))
        if min(new_size) < _MIN_SIDE:
            break
        current, downscaled = image.resize(new_size, Image.Resampling.BOX), True
    raise ImageTooLargeError(
        f"the image cannot be encoded within {max_bytes} bytes; raise ImageLimits.max_output_bytes"
    )


def prepare_forwarding(
    decoded: DecodedImage, limits: ImageLimits | None = None, *, image: Image.Image | None = None
) -> EncodedImage:
    """What to send a model for a decoded image: its original bytes when safe, else re-encoded pixels.

    The original bytes are forwarded only when ``decoded.forward_as_sent`` (a model would
    decode exactly the scanned pixels), no other pixels are given (nothing was masked), and
    they fit ``limits.max_output_bytes``. Otherwise ``image`` (the masked pixels) or
    ``decoded.rgb`` is encoded by :func:`encode_for_forwarding` in the input's format.

    Args:
        decoded: the result of ``decode_image``.
        limits: ``max_output_bytes`` applies (default :class:`ImageLimits`).
        image: the pixels to forward instead of ``decoded.rgb`` (e.g. the masked image);
            must have ``decoded.rgb``'s size.

    Returns:
        An :class:`EncodedImage` (``reencoded=False`` when the original bytes are sent).

    Raises:
        ValueError: ``image`` has another size than the scanned pixels.
        ImageTooLargeError: the pixels cannot fit ``max_output_bytes``.
    """
    limits = limits or ImageLimits()
    if image is not None and image.size != decoded.rgb.size:
        raise ValueError(f"image has size {image.size}, but the scanned pixels are {decoded.rgb.size}")
    if image is None and decoded.forward_as_sent and decoded.data and len(decoded.data) <= limits.max_output_bytes:
        mime = sniff_image_mime(decoded.data)
        if mime is not None and mime == decoded.mime:
            return EncodedImage(data=decoded.data, mime=mime, size=decoded.rgb.size, downscaled=False, reencoded=False)
    return encode_for_forwarding(image if image is not None else decoded.rgb, like_format=decoded.format, max_bytes=limits.max_output_bytes)

"""The only place where bytes become pixels.

Every image that reaches a detector or a model passes through :func:`load_image`: paths,
raw bytes, base64 strings, ``data:`` URLs and PIL images come out as a checked RGB
``PIL.Image`` (EXIF orientation applied, every mode converted), or a specific
:class:`~guardalign_core.errors.ImageError` says what was wrong. Remote ``http(s)`` URLs are
fetched only when :class:`ImageLimits` allows it, with a timeout, a size cap and a host
allow-list.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import urllib.parse
import urllib.request
import warnings
from pathlib import Path
from typing import Union

from PIL import Image, ImageOps, UnidentifiedImageError
from pydantic import BaseModel, ConfigDict, Field

from .errors import (
    CorruptImageError,
    EmptyImageError,
    ImageTooLargeError,
    InvalidImageSourceError,
    RemoteImageError,
    UnsupportedImageFormatError,
)

ImageSource = Union[str, bytes, bytearray, memoryview, os.PathLike, Image.Image]
"""Anything :func:`load_image` accepts."""

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[\w.+-]+)*)(?P<b64>;base64)?,(?P<data>.*)$", re.S)
_BASE64_CHARS = re.compile(r"^[A-Za-z0-9+/=\s_-]+$")
_RASTER_FORMATS = {"PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO", "MPO", "TGA"}
_RASTER_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*")
_NON_IMAGE_SNIFFS = (
    (b"%PDF", "PDF document"),
    (b"<svg", "SVG (vector) image"),
    (b"<?xml", "XML/SVG document"),
    (b"<!DOCTYPE", "HTML/XML document"),
    (b"<html", "HTML document"),
)


class ImageLimits(BaseModel):
    """Limits and remote-fetch rules applied to every decoded image."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    max_bytes: int = Field(20 * 1024 * 1024, gt=0, description="Largest encoded input accepted, in bytes.")
    max_pixels: int = Field(40_000_000, gt=0, description="Largest width×height accepted (decompression-bomb guard).")
    allow_remote: bool = Field(False, description="Fetch http(s) URLs. Off by default: a guard should not make requests on a user's behalf.")
    allowed_hosts: tuple[str, ...] = Field((), description="Hosts that may be fetched when allow_remote is on; empty means none.")
    fetch_timeout_s: float = Field(10.0, gt=0, description="Timeout for one remote fetch, in seconds.")
    max_images: int = Field(20, ge=0, description="Most images accepted in one request (per-request budget).")
    max_total_bytes: int = Field(
        64 * 1024 * 1024, gt=0, description="Most encoded image bytes accepted in one request, all images together."
    )
    max_total_pixels: int = Field(
        100_000_000, gt=0, description="Most decoded pixels (width×height) accepted in one request, all images together."
    )
    allow_local_files: bool = Field(
        False,
        description="Read local files named in message content (paths, file:// URLs). Off by default: message "
        "content is untrusted, and a guard must not read the server's files on its behalf.",
    )


def _sniff_non_image(data: bytes) -> str | None:
    head = data[:512].lstrip().lower()
    for magic, name in _NON_IMAGE_SNIFFS:
        if head.startswith(magic.lower()):
            return name
    if b"<svg" in head:
        return "SVG (vector) image"
    return None


def _decode_bytes(data: bytes, limits: ImageLimits, source: str | None) -> Image.Image:
    if len(data) == 0:
        raise EmptyImageError("the image holds no bytes", source=source)
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(
            f"{len(data)} bytes is over the limit of {limits.max_bytes}; raise ImageLimits.max_bytes to accept it",
            source=source,
        )
    kind = _sniff_non_image(data)
    if kind is not None:
        raise UnsupportedImageFormatError(f"{kind} is not a raster image; convert it to PNG or JPEG first", source=source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(data))
            _check_pixels(image.size, limits, source)
            if image.format not in _RASTER_FORMATS:
                raise UnsupportedImageFormatError(f"format {image.format!r} is not accepted", source=source)
            image.load()
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        raise ImageTooLargeError(f"decompression bomb refused ({err})", source=source) from None
    except UnidentifiedImageError:
        if data.startswith(_RASTER_MAGIC):
            raise CorruptImageError("the image header is valid but its data cannot be decoded (truncated or damaged)", source=source) from None
        raise UnsupportedImageFormatError(
            "the bytes are not an image format Pillow recognises (is it text, SVG or PDF?)", source=source
        ) from None
    except (OSError, SyntaxError, ValueError) as err:
        if isinstance(err, (ImageTooLargeError, UnsupportedImageFormatError)):
            raise
        raise CorruptImageError(f"the image is truncated or damaged ({err})", source=source) from None
    return to_rgb(image)


def _check_pixels(size: tuple[int, int], limits: ImageLimits, source: str | None) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise CorruptImageError(f"the image has an empty size {width}x{height}", source=source)
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            f"{width}x{height} = {width * height} pixels is over the limit of {limits.max_pixels}; "
            "raise ImageLimits.max_pixels to accept it",
            source=source,
        )


def to_rgb(image: Image.Image) -> Image.Image:
    """Return an 8-bit RGB copy with EXIF orientation applied.

    Palette and LA/RGBA images are composited on white (a transparent pixel is not black);
    16-bit and float greyscale are rescaled to 8 bits; CMYK and YCbCr are converted.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        import numpy as np

        array = np.asarray(image, dtype=np.float64)
        lo, hi = float(array.min()), float(array.max())
        scaled = (array - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(array)
        image = Image.fromarray(scaled.round().astype("uint8"), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        background = Image.new("RGB", image.size, (255, 255, 255))
        background.paste(image.convert("RGBA"), mask=image.convert("RGBA").getchannel("A"))
        return background
    return image.convert("RGB") if image.mode != "RGB" else image.copy()


def decode_data_url(url: str, *, source: str | None = None) -> bytes:
    """Return the bytes of a ``data:`` URL, or raise :class:`InvalidImageSourceError`."""
    match = _DATA_URL.match(url.strip())
    if not match:
        raise InvalidImageSourceError("malformed data URL (expected 'data:<mime>;base64,<data>')", source=source)
    if match.group("mime") and not match.group("mime").startswith("image/"):
        raise UnsupportedImageFormatError(f"data URL has MIME type {match.group('mime')!r}, not image/*", source=source)
    payload = match.group("data")
    if match.group("b64"):
        return _b64decode(payload, source=source)
    return urllib.parse.unquote_to_bytes(payload)


def _b64decode(text: str, *, source: str | None) -> bytes:
    try:  # the common case, strictly valid standard base64, without a regex pass over the payload
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        pass
    compact = re.sub(r"\s+", "", text)
    if not compact or not _BASE64_CHARS.match(compact):
        raise InvalidImageSourceError("not valid base64", source=source)
    try:
        if "-" in compact or "_" in compact:
            return base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4))
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise InvalidImageSourceError("not valid base64", source=source) from None


def _fetch(url: str, limits: ImageLimits, source: str | None) -> bytes:
    host = urllib.parse.urlparse(url).hostname or ""
    if not limits.allow_remote:
        raise RemoteImageError(
            "remote URLs are not fetched; set ImageLimits(allow_remote=True, allowed_hosts=(...)) "
            "or pass the image bytes",
            source=source,
        )
    if host not in limits.allowed_hosts:
        raise RemoteImageError(f"host {host!r} is not in ImageLimits.allowed_hosts", source=source)
    try:
        with urllib.request.urlopen(url, timeout=limits.fetch_timeout_s) as response:  # noqa: S310 (host allow-listed)
            data = response.read(limits.max_bytes + 1)
    except OSError as err:
        raise RemoteImageError(f"fetch failed ({err})", source=source) from None
    return data


def read_image_bytes(source_obj: ImageSource, limits: ImageLimits | None = None, *, source: str | None = None) -> bytes:
    """Return the encoded bytes behind a path, URL, base64 string or bytes (not PIL)."""
    limits = limits or ImageLimits()
    if isinstance(source_obj, (bytes, bytearray, memoryview)):
        return bytes(source_obj)
    if isinstance(source_obj, os.PathLike):
        return _read_path(Path(source_obj), limits, source)
    if not isinstance(source_obj, str):
        raise InvalidImageSourceError(
            f"expected a path, bytes, base64 string, data URL or PIL image, got {type(source_obj).__name__}",
            source=source,
        )
    text = source_obj.strip()
    if not text:
        raise EmptyImageError("the image string is empty", source=source)
    if text.startswith("data:"):
        return decode_data_url(text, source=source)
    scheme = urllib.parse.urlparse(text).scheme.lower()
    if scheme in ("http", "https"):
        return _fetch(text, limits, source)
    if scheme == "file":
        return _read_path(Path(urllib.parse.unquote(urllib.parse.urlparse(text).path)), limits, source)
    if len(text) < 4096 and ("/" in text or "\\" in text or "." in text[-6:]) and _is_file(text):
        return _read_path(Path(text), limits, source)
    if len(text) >= 16 and _BASE64_CHARS.match(text):
        return _b64decode(text, source=source)
    if len(text) < 4096 and not _BASE64_CHARS.match(text):
        raise InvalidImageSourceError("no such file, and not a data URL or base64 string", source=source)
    raise InvalidImageSourceError("not a path, data URL or valid base64 string", source=source)


def read_content_bytes(source_obj: ImageSource, limits: ImageLimits | None = None, *, source: str | None = None) -> bytes:
    """The encoded bytes of an image that came from *message content* (untrusted).

    Like :func:`read_image_bytes`, but local files (paths, ``PathLike``, ``file://`` URLs)
    are read only when ``limits.allow_local_files`` is on, and errors never say whether a
    path exists. Every adapter turns content images into bytes through this function.

    Raises:
        ImageError: a subclass naming the problem (never the file system's state).
    """
    limits = limits or ImageLimits()
    if isinstance(source_obj, (bytes, bytearray, memoryview)):
        return bytes(source_obj)
    if isinstance(source_obj, Image.Image):
        raise InvalidImageSourceError("expected encoded image bytes, a data URL or base64, got a decoded PIL image", source=source)
    if limits.allow_local_files:
        return read_image_bytes(source_obj, limits, source=source)
    refusal = (
        "local file paths in message content are not read; send the image inline (base64 or a data URL), "
        "or set ImageLimits(allow_local_files=True) if the content is trusted"
    )
    if isinstance(source_obj, os.PathLike):
        raise InvalidImageSourceError(refusal, source=source)
    if not isinstance(source_obj, str):
        raise InvalidImageSourceError(f"expected bytes, a data URL, a URL or base64, got {type(source_obj).__name__}", source=source)
    text = source_obj.strip()
    if not text:
        raise EmptyImageError("the image string is empty", source=source)
    if text.startswith("data:"):
        return decode_data_url(text, source=source)
    scheme = urllib.parse.urlparse(text).scheme.lower()
    if scheme in ("http", "https"):
        return _fetch(text, limits, source)
    if scheme == "file":
        raise InvalidImageSourceError(refusal, source=source)
    # Anything else is base64 or nothing: a string is never looked up on disk (a JPEG's
    # base64 starts with "/9j/", so the two cannot be told apart by shape).
    try:
        return _b64decode(text, source=source)
    except InvalidImageSourceError:
        raise InvalidImageSourceError("not a data URL, an http(s) URL or valid base64 (" + refusal + ")", source=source) from None


def _is_file(text: str) -> bool:
    """Whether a string names an existing file; base64 payloads can be invalid paths (too long)."""
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


def _read_path(path: Path, limits: ImageLimits, source: str | None) -> bytes:
    label = source or path.name
    if not path.is_file():
        raise InvalidImageSourceError(f"no such file: {path}", source=label)
    size = path.stat().st_size
    if size > limits.max_bytes:
        raise ImageTooLargeError(f"file is {size} bytes, over the limit of {limits.max_bytes}", source=label)
    return path.read_bytes()


def load_image(image: ImageSource, limits: ImageLimits | None = None, *, source: str | None = None) -> Image.Image:
    """Decode any accepted input into a checked 8-bit RGB image.

    Args:
        image: a file path (str or ``PathLike``), raw bytes, a base64 string, a ``data:``
            URL, an ``http(s)`` URL (only if ``limits.allow_remote``), or a PIL image.
        limits: byte/pixel limits and remote-fetch rules (default :class:`ImageLimits`).
        source: a short label for error messages (e.g. ``"image 3"``); never the content.

    Returns:
        An RGB ``PIL.Image.Image`` of the input's size (after EXIF orientation).

    Raises:
        ImageError: a subclass naming the problem (empty, corrupt, too large, unsupported
            format, malformed source, remote fetch refused).

    Example:
        >>> from guardalign_core.images import load_image
        >>> load_image("photo.jpg").mode  # doctest: +SKIP
        'RGB'
    """
    limits = limits or ImageLimits()
    if isinstance(image, Image.Image):
        _check_pixels(image.size, limits, source)
        try:
            image.load()
        except OSError as err:
            raise CorruptImageError(f"the image is truncated or damaged ({err})", source=source) from None
        return to_rgb(image)
    return _decode_bytes(read_image_bytes(image, limits, source=source), limits, source)


def encode_png(image: Image.Image) -> bytes:
    """Return PNG bytes of an image (lossless, so masked pixels stay exactly zero).

    Compression level 1: the same pixels about three times faster than PIL's default, for
    somewhat larger files (these are forwarded once, not stored for long).
    """
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def to_base64_png(image: Image.Image) -> str:
    """Return an image as a base64 PNG string (for v1 ``{"type": "image", "base64": ...}`` blocks)."""
    return base64.b64encode(encode_png(image)).decode("ascii")

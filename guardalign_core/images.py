"""The only place where bytes become pixels.

Every image that reaches a detector or a model passes through here: paths, raw bytes, base64
strings, ``data:`` URLs and PIL images come out as checked RGB pixels (EXIF orientation
applied, every mode converted), or a specific :class:`~guardalign_core.errors.ImageError`
says what was wrong. Message content is read with :func:`read_content_bytes` (no local files
unless allowed, remote URLs only from allow-listed hosts), decoded with :func:`decode_image`
(which also says whether the original bytes may be forwarded), and what is forwarded is
encoded by :func:`~guardalign_core.forwarding.encode_for_forwarding`. Sizes are checked
before anything is allocated for them: base64 from its text length, images from their header.
"""

from __future__ import annotations

import base64
import binascii
import io
import os
import re
import stat
import urllib.parse
from pathlib import Path
from typing import Union

from PIL import Image

from ._decode import DecodedImage, check_shape, decode_image, looks_like_raster, to_rgb
from ._fetch import fetch_url
from ._limits import ImageLimits
from .budget import RequestBudget
from .errors import (
    CorruptImageError,
    EmptyImageError,
    ImageTooLargeError,
    InvalidImageSourceError,
    LocalFileRefusedError,
    UnsupportedImageFormatError,
)
from .forwarding import EncodedImage, encode_for_forwarding, prepare_forwarding, sniff_image_mime

__all__ = [
    "DecodedImage",
    "EncodedImage",
    "ImageLimits",
    "ImageSource",
    "RequestBudget",
    "decode_data_url",
    "decode_image",
    "encode_for_forwarding",
    "encode_png",
    "load_image",
    "prepare_forwarding",
    "read_content",
    "read_content_bytes",
    "read_image_bytes",
    "sniff_image_mime",
    "to_base64_png",
    "to_rgb",
]

ImageSource = Union[str, bytes, bytearray, memoryview, os.PathLike, Image.Image]
"""Anything :func:`load_image` accepts."""

_DATA_URL = re.compile(r"^data:(?P<mime>[\w.+-]+/[\w.+-]+)?(?P<params>(;[\w-]+=[\w.+-]+)*)(?P<b64>;base64)?$", re.S)
_BASE64_CHARS = re.compile(r"^[A-Za-z0-9+/=\s_-]+$")
_WHITESPACE = " \t\r\n\v\f"
_LOCAL_REFUSAL = (
    "local file paths in message content are not read; send the image inline (base64 or a data URL), "
    "or set ImageLimits(allow_local_files=True) if the content is trusted"
)
_LOCAL_UNUSABLE = "this local file cannot be used as an image (it is not readable, not a regular file, too large or not an image)"


def _check_encoded_size(nbytes: int, limits: ImageLimits, source: str | None) -> None:
    if nbytes > limits.max_bytes:
        raise ImageTooLargeError(
            f"{nbytes} bytes is over the limit of {limits.max_bytes}; raise ImageLimits.max_bytes to accept it",
            source=source,
        )


def _check_base64_length(text: str, limits: ImageLimits, source: str | None, start: int = 0) -> None:
    """Refuse base64 (``text[start:]``) that would decode to over ``max_bytes``, before decoding or copying it."""
    longest = 4 * ((limits.max_bytes + 2) // 3)  # base64 characters that decode to max_bytes
    length = len(text) - start
    if length <= longest:
        return
    if length <= 2 * longest:  # MIME-style line breaks add ~3%; count them without copying
        payload = length - sum(text.count(c, start) for c in _WHITESPACE)
        if payload <= longest:
            return
    raise ImageTooLargeError(
        f"the base64 text decodes to more than {limits.max_bytes} bytes; raise ImageLimits.max_bytes to accept it",
        source=source,
    )


def decode_data_url(url: str, *, source: str | None = None, limits: ImageLimits | None = None) -> bytes:
    """Return the bytes of a ``data:`` URL, refusing an oversized payload before decoding it.

    Raises:
        InvalidImageSourceError: malformed URL or payload.
        UnsupportedImageFormatError: a MIME type other than ``image/*``.
        ImageTooLargeError: the payload decodes to more than ``limits.max_bytes``.
    """
    return _decode_data_url(url, source=source, limits=limits)[0]


def _decode_data_url(url: str, *, source: str | None, limits: ImageLimits | None) -> tuple[bytes, bool]:
    """:func:`decode_data_url`, and whether the URL spells its bytes canonically (see :func:`_b64decode_spelled`).

    Canonical: ``data:<type>;base64,`` with no parameters and a strictly valid standard
    base64 payload. Percent-encoded payloads and parameters never are (decoders disagree).
    """
    limits = limits or ImageLimits()
    comma = url.find(",", 0, 512)
    header = url[:comma].strip() if comma >= 0 else ""
    match = _DATA_URL.match(header) if comma >= 0 else None
    if not match:
        raise InvalidImageSourceError("malformed data URL (expected 'data:<mime>;base64,<data>')", source=source)
    if match.group("mime") and not match.group("mime").lower().startswith("image/"):
        raise UnsupportedImageFormatError(f"data URL has MIME type {match.group('mime')[:40]!r}, not image/*", source=source)
    payload_length = len(url) - comma - 1
    if match.group("b64"):
        _check_base64_length(url, limits, source, start=comma + 1)  # before the payload is sliced out
        data, canonical = _b64decode_spelled(url[comma + 1 :], source=source, limits=limits)
        return data, canonical and not match.group("params") and header == url[:comma]
    if payload_length > 3 * limits.max_bytes:  # percent-encoding: at most 3 characters per byte
        _check_encoded_size(payload_length // 3, limits, source)
    data = urllib.parse.unquote_to_bytes(url[comma + 1 :])
    _check_encoded_size(len(data), limits, source)
    return data, False


def _b64decode(text: str, *, source: str | None, limits: ImageLimits | None = None) -> bytes:
    return _b64decode_spelled(text, source=source, limits=limits)[0]


def _b64decode_spelled(text: str, *, source: str | None, limits: ImageLimits | None = None) -> tuple[bytes, bool]:
    """The bytes of base64 ``text``, and whether it is *canonical*: strictly valid standard base64.

    The guard also reads the spellings people send (the URL-safe alphabet, line breaks,
    missing padding), but only a canonical payload may be forwarded as it came: decoders
    differ on everything else (one that skips characters outside its alphabet reads a
    different image from a URL-safe payload than the guard did), so a non-canonical payload
    is forwarded as the standard base64 of the bytes that were checked.
    """
    _check_base64_length(text, limits or ImageLimits(), source)
    try:  # the common case, strictly valid standard base64, without a regex pass over the payload
        return binascii.a2b_base64(text, strict_mode=True), True
    except (binascii.Error, ValueError):
        pass
    compact = re.sub(r"\s+", "", text)
    if not compact or not _BASE64_CHARS.match(compact):
        raise InvalidImageSourceError("not valid base64", source=source)
    try:
        if "-" in compact or "_" in compact:
            return base64.urlsafe_b64decode(compact + "=" * (-len(compact) % 4)), False
        return base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True), False
    except (binascii.Error, ValueError):
        raise InvalidImageSourceError("not valid base64", source=source) from None


def _inline_bytes(source_obj: bytes | bytearray | memoryview, limits: ImageLimits, source: str | None) -> bytes:
    _check_encoded_size(len(source_obj), limits, source)  # before copying a bytearray/memoryview
    return bytes(source_obj)


def read_image_bytes(source_obj: ImageSource, limits: ImageLimits | None = None, *, source: str | None = None) -> bytes:
    """Return the encoded bytes behind a path, URL, base64 string or bytes (not PIL).

    For inputs the *caller* chose (a developer's own paths): strings that name an existing
    file are read. Message content goes through :func:`read_content_bytes` instead.

    Raises:
        ImageError: a subclass naming the problem; file errors never name the path or its size.
    """
    limits = limits or ImageLimits()
    if isinstance(source_obj, (bytes, bytearray, memoryview)):
        return _inline_bytes(source_obj, limits, source)
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
        return decode_data_url(text, source=source, limits=limits)
    scheme = urllib.parse.urlparse(text[:2048]).scheme.lower()
    if scheme in ("http", "https"):
        return fetch_url(text, limits, source)
    if scheme == "file":
        return _read_path(Path(urllib.parse.unquote(urllib.parse.urlparse(text).path)), limits, source)
    if len(text) < 4096 and ("/" in text or "\\" in text or "." in text[-6:]) and _is_file(text):
        return _read_path(Path(text), limits, source)
    if len(text) >= 16 and _BASE64_CHARS.match(text[:4096]):
        return _b64decode(text, source=source, limits=limits)
    if len(text) < 4096 and not _BASE64_CHARS.match(text):
        raise InvalidImageSourceError("no such file, and not a data URL or base64 string", source=source)
    raise InvalidImageSourceError("not a path, data URL or valid base64 string", source=source)


def read_content_bytes(source_obj: ImageSource, limits: ImageLimits | None = None, *, source: str | None = None) -> bytes:
    """The encoded bytes of an image that came from *message content* (untrusted).

    Like :func:`read_image_bytes`, but local files (paths, ``PathLike``, ``file://`` URLs)
    are read only when ``limits.allow_local_files`` is on, and then every failure (missing,
    unreadable, a directory or device, too large, not an image) gives the same
    :class:`~guardalign_core.errors.LocalFileRefusedError`: an error never tells whether a
    path exists, what it holds or how big it is. Remote URLs follow
    :func:`~guardalign_core._fetch.fetch_url` (allow-listed hosts on every redirect, one
    deadline). Base64 is size-checked from its length before it is decoded. Every adapter
    turns content images into bytes through this function.

    Args:
        source_obj: bytes, a ``data:`` URL, an ``http(s)`` URL, base64 text, or (only with
            ``allow_local_files``) a path or ``file://`` URL.
        limits: the limits (default :class:`ImageLimits`).
        source: a short label for error messages (``"message 2, image 1"``).

    Returns:
        The encoded bytes, at most ``limits.max_bytes`` of them.

    Raises:
        ImageError: a subclass naming the problem (never the file system's state).

    Example:
        >>> read_content_bytes("/etc/passwd")  # doctest: +SKIP
        Traceback (most recent call last):
        LocalFileRefusedError: local file paths in message content are not read; ...
    """
    return read_content(source_obj, limits, source=source)[0]


def read_content(source_obj: ImageSource, limits: ImageLimits | None = None, *, source: str | None = None) -> tuple[bytes, bool]:
    """:func:`read_content_bytes`, and whether the source spells those bytes *canonically*.

    Canonical: raw bytes, or base64 (bare or in a ``data:<type>;base64,`` URL without
    parameters) that is strictly valid standard base64 with nothing around it. Only a
    canonical inline source may be forwarded as it came (every decoder reads the bytes the
    guard checked from it); fetched URLs and files never are.
    """
    limits = limits or ImageLimits()
    if isinstance(source_obj, (bytes, bytearray, memoryview)):
        return _inline_bytes(source_obj, limits, source), True
    if isinstance(source_obj, Image.Image):
        raise InvalidImageSourceError("expected encoded image bytes, a data URL or base64, got a decoded PIL image", source=source)
    if isinstance(source_obj, os.PathLike):
        if not limits.allow_local_files:
            raise LocalFileRefusedError(_LOCAL_REFUSAL, source=source)
        return _read_content_file(os.fspath(source_obj), limits, source), False
    if not isinstance(source_obj, str):
        raise InvalidImageSourceError(f"expected bytes, a data URL, a URL or base64, got {type(source_obj).__name__}", source=source)
    text = source_obj.strip()
    if not text:
        raise EmptyImageError("the image string is empty", source=source)
    bare = len(text) == len(source_obj)  # surrounding whitespace: not canonical
    if text.startswith("data:"):
        data, canonical = _decode_data_url(text, source=source, limits=limits)
        return data, canonical and bare
    scheme = urllib.parse.urlparse(text[:2048]).scheme.lower()
    if scheme in ("http", "https"):
        return fetch_url(text, limits, source), False
    if scheme == "file":
        if not limits.allow_local_files:
            raise LocalFileRefusedError(_LOCAL_REFUSAL, source=source)
        return _read_content_file(urllib.parse.unquote(urllib.parse.urlparse(text).path), limits, source), False
    # Anything else is base64 or (when allowed) a path. A string is never looked up on disk
    # to decide which it is: that lookup would tell the sender whether the path exists.
    try:
        data, canonical = _b64decode_spelled(text, source=source, limits=limits)
    except InvalidImageSourceError:
        if limits.allow_local_files and len(text) < 4096:
            return _read_content_file(text, limits, source), False
        raise InvalidImageSourceError("not a data URL, an http(s) URL or valid base64 (" + _LOCAL_REFUSAL + ")", source=source) from None
    if limits.allow_local_files and not _looks_like_image(data) and len(text) < 4096 and ("/" in text or "\\" in text):
        return _read_content_file(text, limits, source), False  # "/tmp/x.png" is also valid base64
    return data, canonical and bare


def _looks_like_image(data: bytes) -> bool:
    return looks_like_raster(data) or data[:2] in (b"P1", b"P2", b"P3", b"P4", b"P5", b"P6") or data[:4] == b"\x00\x00\x01\x00"


def _read_content_file(path: str, limits: ImageLimits, source: str | None) -> bytes:
    """Read a local file named by message content; every failure reads the same."""
    try:
        data = _read_regular_file(path, limits.max_bytes)
    except (OSError, ValueError, _TooLarge):
        data = None
    if data is None or not _looks_like_image(data):
        raise LocalFileRefusedError(_LOCAL_UNUSABLE, source=source)
    return data


class _TooLarge(Exception):
    pass


def _read_regular_file(path: str | Path, max_bytes: int) -> bytes:
    """Read at most ``max_bytes`` of a regular file; never block on a FIFO or device."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise IsADirectoryError("not a regular file")
        with os.fdopen(fd, "rb", closefd=False) as handle:
            data = handle.read(max_bytes + 1)
    finally:
        os.close(fd)
    if len(data) > max_bytes:
        raise _TooLarge
    return data


def _is_file(text: str) -> bool:
    """Whether a string names an existing file; base64 payloads can be invalid paths (too long)."""
    try:
        return Path(text).is_file()
    except (OSError, ValueError):
        return False


def _read_path(path: Path, limits: ImageLimits, source: str | None) -> bytes:
    """Read a caller-named file; errors name neither the path nor the file's size."""
    label = source or "local file"
    try:
        return _read_regular_file(path, limits.max_bytes)
    except FileNotFoundError:
        raise InvalidImageSourceError("no such file", source=label) from None
    except _TooLarge:
        raise ImageTooLargeError(f"the file is over the limit of {limits.max_bytes} bytes (ImageLimits.max_bytes)", source=label) from None
    except (OSError, ValueError):
        raise InvalidImageSourceError("the file cannot be read (not a readable regular file)", source=label) from None


def load_image(image: ImageSource, limits: ImageLimits | None = None, *, source: str | None = None) -> Image.Image:
    """Decode any accepted input into a checked 8-bit RGB image.

    The pixels are those of :func:`decode_image` (which also tells how to forward them);
    this is the shortcut for callers that only need the pixels.

    Args:
        image: a file path (str or ``PathLike``), raw bytes, a base64 string, a ``data:``
            URL, an ``http(s)`` URL (only if ``limits.allow_remote``), or a PIL image.
        limits: byte/pixel/shape limits and remote-fetch rules (default :class:`ImageLimits`).
        source: a short label for error messages (e.g. ``"image 3"``); never the content.

    Returns:
        An RGB ``PIL.Image.Image`` of the input's size (after EXIF orientation).

    Raises:
        ImageError: a subclass naming the problem (empty, corrupt, too large or too
            elongated, unsupported format, malformed source, remote fetch refused).

    Example:
        >>> from guardalign_core.images import load_image
        >>> load_image("photo.jpg").mode  # doctest: +SKIP
        'RGB'
    """
    limits = limits or ImageLimits()
    if isinstance(image, Image.Image):
        return _checked_pil(image, limits, source)
    return decode_image(read_image_bytes(image, limits, source=source), limits, source=source).rgb


def _checked_pil(image: Image.Image, limits: ImageLimits, source: str | None) -> Image.Image:
    check_shape(image.size, limits, source)
    try:
        image.load()
        return to_rgb(image)
    except (ImageTooLargeError, UnsupportedImageFormatError, CorruptImageError):
        raise
    except MemoryError:
        raise ImageTooLargeError("converting the image needed more memory than is available", source=source) from None
    except Exception as err:  # noqa: BLE001 - a decoder failure fails this image, closed (see decode_image)
        raise CorruptImageError(f"the image is truncated or damaged ({type(err).__name__})", source=source) from None


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

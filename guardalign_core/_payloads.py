"""Does a piece of message content carry media? Framework-free checks for the adapters' walkers.

Default deny needs one answer, the same in every adapter, to "might a provider find an image
in this structure?". Two strengths:

- :func:`carries_media`: anything that could *be* or *name* media: binary data, a base64
  payload (standard or URL-safe, line-wrapped or not), a ``data:``/``file:``/``http(s):`` URL,
  an absolute path, a byte list, or a non-empty value under a media key (``data``, ``url``,
  ``file_id``, ...). Used for blocks of a type the adapter does not know.
- :func:`inline_media`: only what could *be* an image inline (binary data, a base64 payload,
  a ``data:`` URL, a byte list, a nested block of a media type). Used inside blocks known to
  carry text, where URLs and file ids are citations, not images.

A base64 payload is recognised without decoding it whole: a string of at least
:data:`MIN_PAYLOAD_CHARS` base64 characters and no spaces (line breaks allowed), or any
shorter one whose decoded head is an image or document signature. Hexadecimal strings (hashes)
are not payloads. Opaque provider tokens (Anthropic ``signature``, OpenAI
``encrypted_content``) are encrypted by the provider and never decoded as media; callers name
the keys that hold them.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections.abc import Mapping
from typing import Any

MIN_PAYLOAD_CHARS = 64
"""Shortest run of base64 characters treated as a payload whatever it decodes to (48 bytes)."""
MAX_DEPTH = 16
"""Deeper structures are treated as carrying media (default deny), not walked."""

MEDIA_KEYS = frozenset({
    "data", "base64", "url", "image_url", "file_id", "path", "source", "image", "bytes", "uri", "file_uri",
    "file_data", "inline_data", "file", "audio", "video", "document",
})
"""Keys under which content blocks carry or name media."""
INLINE_MEDIA_KEYS = frozenset({"data", "base64", "image", "image_url", "bytes", "file_data", "inline_data", "audio", "video"})
"""Keys under which media travels inline (a URL or file id under them is refused too)."""
MEDIA_BLOCK_TYPES = frozenset({
    "image", "image_url", "input_image", "file", "input_file", "media", "document", "audio", "input_audio", "video",
})
"""Block types that carry media; found nested inside a text block, they are hidden media."""

_MEDIA_PREFIXES = ("data:", "http://", "https://", "file:", "/", "\\\\", "s3://", "gs://")
_BASE64 = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
_HEX = re.compile(r"[0-9a-fA-F]+")
_SIGNATURES = (
    b"\x89PNG", b"\xff\xd8\xff", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF", b"%PDF", b"\x00\x00\x01\x00",
    b"\x00\x00\x00", b"<svg", b"<?xml", b"\xff\x0a", b"\x00\x00\x00\x0cjP",
)


def is_base64_payload(text: str) -> bool:
    """Whether ``text`` looks like base64-encoded binary data (see the module docstring).

    Example:
        >>> is_base64_payload("iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAYAAAAfFcSJAAAADUlEQVR42mNk+M9QDwADhgGAWjR9awAAAABJRU5ErkJggg==")
        True
        >>> is_base64_payload("a plain sentence, not data")
        False
    """
    compact = text.replace("\r", "").replace("\n", "")
    if len(compact) < 8 or not _BASE64.fullmatch(compact):
        return False
    if _HEX.fullmatch(compact):
        return False  # a hash or a hex id: no provider decodes hex as an image
    if len(compact) >= MIN_PAYLOAD_CHARS:
        return True
    decoded = base64_head(compact)
    return decoded is not None and decoded.startswith(_SIGNATURES)


def base64_head(text: str, max_chars: int | None = None) -> bytes | None:
    """The bytes the first whole base64 quanta of ``text`` encode (standard or URL-safe alphabet,
    whitespace ignored), or ``None`` if they are not base64; at most ``max_chars`` characters are
    decoded, so a caller can sniff a file signature without decoding a large payload.
    """
    window = text if max_chars is None else text[: 2 * max_chars]  # room for line breaks
    compact = "".join(window.split())
    head = compact if max_chars is None else compact[:max_chars]
    head = head[: len(head) - len(head) % 4]
    try:
        return base64.b64decode(head, altchars=b"-_" if ("-" in head or "_" in head) else None, validate=True)
    except (binascii.Error, ValueError):
        return None


def _byte_list(value: list | tuple) -> bool:
    return len(value) >= 16 and all(isinstance(v, int) and not isinstance(v, bool) and 0 <= v <= 255 for v in value[:64])


def inline_media(value: Any, *, opaque_keys: frozenset[str] = frozenset(), depth: int = 0) -> bool:
    """Whether ``value`` holds media inline anywhere: bytes, a base64 payload, a ``data:`` URL,
    a byte list, a value under an inline media key, or a nested block of a media type.

    Args:
        value: any JSON-like structure (mappings, lists, strings, bytes).
        opaque_keys: keys whose values are provider tokens, not looked into (``signature``).
    """
    if depth > MAX_DEPTH:
        return True
    if isinstance(value, (bytes, bytearray, memoryview)):
        return len(value) > 0
    if isinstance(value, str):
        return value.lstrip().lower().startswith("data:") or is_base64_payload(value)
    if isinstance(value, Mapping):
        if str(value.get("type") or "") in MEDIA_BLOCK_TYPES:
            return True
        for key, item in value.items():
            if key in opaque_keys:
                continue
            if key in INLINE_MEDIA_KEYS and item not in (None, "", [], {}):
                return True
            if inline_media(item, opaque_keys=opaque_keys, depth=depth + 1):
                return True
        return False
    if isinstance(value, (list, tuple)):
        return _byte_list(value) or any(inline_media(item, opaque_keys=opaque_keys, depth=depth + 1) for item in value)
    return False


def carries_media(value: Any, depth: int = 0) -> bool:
    """Whether ``value`` holds binary data, a base64 payload, a URL, a path or a file id anywhere (default deny)."""
    if depth > MAX_DEPTH:
        return True
    if isinstance(value, (bytes, bytearray, memoryview)):
        return True
    if isinstance(value, str):
        return value.strip().lower().startswith(_MEDIA_PREFIXES) or is_base64_payload(value)
    if isinstance(value, Mapping):
        for key, item in value.items():
            if key in MEDIA_KEYS and item not in (None, "", [], {}):
                return True
            if carries_media(item, depth + 1):
                return True
        return False
    if isinstance(value, (list, tuple)):
        return _byte_list(value) or any(carries_media(item, depth + 1) for item in value)
    return False

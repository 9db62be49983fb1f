"""A base64 payload that decodes to two different JPEGs, depending on the decoder (for attack tests).

A module of its own (not ``conftest``), imported by the server and LangChain attack tests.
"""

from __future__ import annotations

import base64
import io
import struct

from PIL import Image


def jpeg(colour: tuple[int, int, int], size: int = 64) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), colour).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def pixel(data: bytes) -> tuple[int, int, int]:
    return Image.open(io.BytesIO(data)).convert("RGB").getpixel((32, 32))


def polyglot() -> tuple[str, bytes, bytes]:
    """Base64 that reads as JPEG A with the URL-safe alphabet and as JPEG B to a decoder that skips ``_``.

    Two COM segments are laid out so that dropping one aligned ``____`` quad (3 bytes) shifts
    the parse: the first comment swallows A's header in one reading and B's in the other
    (what Python's default ``base64.b64decode``, Ruby's ``decode64`` or PHP's ``base64_decode``
    do with characters outside the standard alphabet). Returns the payload, the bytes a
    URL-safe-aware decoder reads and the bytes a lenient standard decoder reads.
    """
    a, b = jpeg((20, 200, 20)), jpeg((220, 10, 10))
    com1 = b"\xff\xfe" + struct.pack(">H", 32) + b"\xff\xff\xff" + b"\x00" * 27
    length = 0x0AFF  # low byte 0xFF: in the shifted reading it becomes the next marker's prefix
    com2 = b"\xff\xfe" + struct.pack(">H", length) + b[3:] + b"\x00" * (length - 2 - len(b[3:]))
    x = b"\xff\xd8" + com1 + com2 + a[2:]
    standard = base64.b64encode(x).decode()
    assert standard[8:12] == "////"
    payload = standard[:8] + "____" + standard[12:]
    return payload, base64.urlsafe_b64decode(payload), base64.b64decode(payload)  # validate=False: skips '_'

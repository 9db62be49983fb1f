"""Encoded bytes → checked RGB pixels, and whether a model would see the same pixels.

Every check that can be made from the header (format, pixel count, aspect ratio, ICO entry
sizes, the request's pixel budget) runs before a single pixel is decoded, so a hostile header
costs nothing. Every failure of the decoders, whatever Python exception they raise on hostile
input, becomes an :class:`~guardalign_core.errors.ImageError` subclass for that image alone.

The detector scans ``DecodedImage.rgb``. ``DecodedImage.forward_as_sent`` says whether a
model decoding the *original bytes* would see exactly those pixels; when it is False the
screening step must forward the re-encoded checked pixels instead (see
:mod:`guardalign_core.forwarding`). Multi-frame inputs (animated GIF/PNG/WebP, multi-page
TIFF, MPO) are decoded at frame 0 only and always forwarded re-encoded, as that one frame:
scanning every frame would multiply the cost by an attacker-chosen count, and most
model loaders read frame 0 anyway.
"""

from __future__ import annotations

import io
import struct
import warnings
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from PIL import Image, ImageOps, UnidentifiedImageError

from ._colour import ColourInfo, convert_cmyk_profile, normalise_colour, read_colour_info
from ._limits import ImageLimits
from .errors import (
    CorruptImageError,
    EmptyImageError,
    ImageAspectRatioError,
    ImageError,
    ImageTooLargeError,
    UnsupportedImageFormatError,
)

if TYPE_CHECKING:
    from .budget import RequestBudget

RASTER_FORMATS = ("PNG", "JPEG", "GIF", "BMP", "TIFF", "WEBP", "PPM", "ICO", "MPO", "TGA")
"""Pillow formats decoded; no other plugin is ever tried on untrusted bytes."""
_OPEN_FORMATS = tuple(f for f in RASTER_FORMATS if f != "MPO")  # Pillow's JPEG opener yields MPO itself

_MIME = {
    "PNG": "image/png",
    "JPEG": "image/jpeg",
    "MPO": "image/jpeg",
    "GIF": "image/gif",
    "BMP": "image/bmp",
    "TIFF": "image/tiff",
    "WEBP": "image/webp",
    "PPM": "image/x-portable-anymap",
    "ICO": "image/vnd.microsoft.icon",
    "TGA": "image/x-tga",
}
_AS_SENT_FORMATS = ("PNG", "JPEG", "WEBP")
_RASTER_MAGIC = (b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")
_NON_IMAGE_SNIFFS = (
    (b"%PDF", "PDF document"),
    (b"<svg", "SVG (vector) image"),
    (b"<?xml", "XML/SVG document"),
    (b"<!DOCTYPE", "HTML/XML document"),
    (b"<html", "HTML document"),
)
_SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I", "F")
_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")
_STRETCH_CHUNK = 1 << 20  # pixels per block when rescaling 16-bit/float data (bounded temporaries)


@dataclass(frozen=True, eq=False)
class DecodedImage:
    """A decoded, checked image and how it may be forwarded.

    Attributes:
        rgb: the checked 8-bit sRGB pixels (EXIF orientation applied, an ICC profile or PNG
            gamma applied as a colour-managed viewer would, transparency composited on white,
            frame 0 of a multi-frame input), with an empty ``info``. This is what the detector scans.
        format: the Pillow format of the input (``"PNG"``, ``"JPEG"``, ...).
        mime: the MIME type of the input bytes, from their decoded format (not from any
            declared type, which may lie).
        frames: how many frames the input holds (1 for a still image); only frame 0 is decoded.
        forward_as_sent: True only when a model decoding the original bytes would see exactly
            ``rgb``: an opaque 8-bit RGB/L single-frame JPEG, PNG or WebP without EXIF
            rotation. Otherwise forward the re-encoded ``rgb`` (or its masked version).
        why_reencode: why ``forward_as_sent`` is False (``""`` when it is True); names the
            property of the input, never its content.
        data: the original encoded bytes (kept so that they can be forwarded unchanged).
    """

    rgb: Image.Image
    format: str
    mime: str
    frames: int
    forward_as_sent: bool
    why_reencode: str = ""
    data: bytes = field(default=b"", repr=False)

    @property
    def size(self) -> tuple[int, int]:
        """``(width, height)`` of the checked pixels."""
        return self.rgb.size


def sniff_non_image(data: bytes) -> str | None:
    """Name the non-raster document ``data`` starts as (PDF, SVG, HTML), or None."""
    head = data[:512].lstrip().lower()
    for magic, name in _NON_IMAGE_SNIFFS:
        if head.startswith(magic.lower()):
            return name
    if b"<svg" in head:
        return "SVG (vector) image"
    return None


def looks_like_raster(data: bytes) -> bool:
    """Whether ``data`` starts with the signature of a common raster format."""
    return data.startswith(_RASTER_MAGIC) or (data[:4] == b"RIFF" and data[8:12] == b"WEBP")


def check_shape(size: tuple[int, int], limits: ImageLimits, source: str | None) -> None:
    """Refuse an empty size, more than ``max_pixels`` or an aspect ratio over ``max_aspect_ratio``.

    Raises:
        CorruptImageError: a zero or negative side.
        ImageTooLargeError: too many pixels.
        ImageAspectRatioError: too elongated.
    """
    width, height = size
    if width <= 0 or height <= 0:
        raise CorruptImageError(f"the image has an empty size {width}x{height}", source=source)
    if width * height > limits.max_pixels:
        raise ImageTooLargeError(
            f"{width}x{height} = {width * height} pixels is over the limit of {limits.max_pixels}; "
            "raise ImageLimits.max_pixels to accept it",
            source=source,
        )
    ratio = max(width, height) / min(width, height)
    if ratio > limits.max_aspect_ratio:
        raise ImageAspectRatioError(
            f"{width}x{height} has an aspect ratio of {ratio:.1f}:1, over the limit of "
            f"{limits.max_aspect_ratio:g}:1; raise ImageLimits.max_aspect_ratio to accept it",
            source=source,
        )


def decode_image(
    data: bytes,
    limits: ImageLimits | None = None,
    *,
    source: str | None = None,
    budget: RequestBudget | None = None,
) -> DecodedImage:
    """Decode encoded image bytes into checked RGB pixels, refusing what is not safe to decode.

    Args:
        data: the encoded image (as read by ``read_content_bytes`` or ``read_image_bytes``).
        limits: per-image limits (default :class:`ImageLimits`).
        source: a short label for error messages (``"message 2, image 1"``); never the content.
        budget: the request's :class:`~guardalign_core.budget.RequestBudget`; when given, the
            image's pixels are charged from its header, before they are decoded.

    Returns:
        A :class:`DecodedImage`: the pixels to scan and whether the original bytes may be
        forwarded as they are.

    Raises:
        ImageError: a subclass for every failure, including any exception of the decoders
            on hostile input (``CorruptImageError``), and an allocation failure
            (``ImageTooLargeError``). Nothing else escapes.

    Example:
        >>> from guardalign_core.images import decode_image
        >>> decoded = decode_image(open("photo.jpg", "rb").read())  # doctest: +SKIP
        >>> decoded.rgb.mode, decoded.forward_as_sent  # doctest: +SKIP
        ('RGB', True)
    """
    limits = limits or ImageLimits()
    if not isinstance(data, (bytes, bytearray, memoryview)):
        raise TypeError(f"decode_image expects encoded bytes, got {type(data).__name__}")
    if len(data) == 0:
        raise EmptyImageError("the image holds no bytes", source=source)
    if len(data) > limits.max_bytes:
        raise ImageTooLargeError(
            f"{len(data)} bytes is over the limit of {limits.max_bytes}; raise ImageLimits.max_bytes to accept it",
            source=source,
        )
    data = bytes(data)
    kind = sniff_non_image(data)
    if kind is not None:
        raise UnsupportedImageFormatError(f"{kind} is not a raster image; convert it to PNG or JPEG first", source=source)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            warnings.simplefilter("ignore", UserWarning)  # Pillow's "corrupt EXIF" chatter; failures raise
            return _decode(data, limits, source, budget)
    except ImageError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ImageTooLargeError("decompression bomb refused (the header declares too many pixels)", source=source) from None
    except MemoryError:
        raise ImageTooLargeError("decoding the image needed more memory than is available", source=source) from None
    except UnidentifiedImageError:
        if looks_like_raster(data):
            raise CorruptImageError("the image header is valid but its data cannot be decoded (truncated or damaged)", source=source) from None
        raise UnsupportedImageFormatError(
            "the bytes are not an image format accepted here (PNG, JPEG, GIF, WebP, BMP, TIFF, ...)", source=source
        ) from None
    except Exception as err:  # noqa: BLE001 - see below
        # Pillow's parsers raise whatever Python raises on hostile input (SyntaxError from a bad
        # EXIF header, struct.error and TypeError from mistyped tags, OSError, ValueError, ...).
        # Each means "this image cannot be decoded": it fails this image, closed, and names
        # the kind of failure without echoing the bytes (some messages quote the header).
        raise CorruptImageError(f"the image is truncated or damaged ({type(err).__name__} in the decoder)", source=source) from None


def _decode(data: bytes, limits: ImageLimits, source: str | None, budget: RequestBudget | None) -> DecodedImage:
    if data.startswith(b"\x00\x00\x01\x00"):
        _check_ico_entries(data, limits, source)  # Pillow decodes an ICO inside Image.open
    image = Image.open(io.BytesIO(data), formats=_OPEN_FORMATS)
    fmt = image.format or ""
    if fmt not in RASTER_FORMATS:  # defensive: formats= already restricts the plugins
        raise UnsupportedImageFormatError(f"format {fmt!r} is not accepted", source=source)
    check_shape(image.size, limits, source)
    if budget is not None:
        budget.charge(pixels=image.size[0] * image.size[1], images=0, source=source)
    frames = _frame_count(image)
    image.load()
    check_shape(image.size, limits, source)  # a container may hold other than its header says
    colour = read_colour_info(image, data, source)  # refuses what renderers would show inconsistently
    mode, transparent = image.mode, "transparency" in image.info
    try:
        orientation = image.getexif().get(0x0112)
        ImageOps.exif_transpose(image, in_place=True)  # before a colour transform, which drops the EXIF
    except (SyntaxError, struct.error, TypeError, ValueError, KeyError, IndexError, OSError) as err:
        raise CorruptImageError(
            f"its EXIF metadata is malformed ({type(err).__name__}); re-save the image without metadata and send it again",
            source=source,
        ) from None
    raw = to_rgb(convert_cmyk_profile(image, colour, source), in_place=True)
    rgb = normalise_colour(raw, mode, colour, source)
    # Metadata that only declares sRGB (an sRGB chunk or profile, a matching gAMA) renders as
    # the raw samples do: the original may still go as sent. Anything else must not.
    renders_alike = rgb is raw or _max_difference(rgb, raw) <= 1
    why = _why_reencode(mode, transparent, fmt, frames, orientation, colour if not renders_alike else None, data)
    rgb.info = {}  # nothing that changes rendering (a profile, tRNS, EXIF) may travel with the checked pixels
    return DecodedImage(rgb=rgb, format=fmt, mime=_MIME[fmt], frames=frames, forward_as_sent=not why, why_reencode=why, data=data)


def _frame_count(image: Image.Image) -> int:
    """Frames in the input without walking them all (GIF's ``n_frames`` parses every frame)."""
    if not getattr(image, "is_animated", False):
        return 1
    if image.format == "GIF":
        return 2  # "at least two": counting would parse an attacker-chosen number of frames
    return max(int(getattr(image, "n_frames", 2)), 2)


def _max_difference(a: Image.Image, b: Image.Image) -> int:
    """The largest per-channel difference between two RGB images of one size (C code, one temporary image)."""
    from PIL import ImageChops

    return max(high for _low, high in ImageChops.difference(a, b).getextrema())


def _why_reencode(
    mode: str, transparent: bool, fmt: str, frames: int, orientation: object, colour: ColourInfo | None, data: bytes
) -> str:
    """Why a model decoding ``data`` might not see the checked pixels ("" if it would)."""
    if fmt not in _AS_SENT_FORMATS:
        return f"{fmt} is forwarded as PNG"
    if frames > 1:
        return "multi-frame image: only frame 0 was scanned, so only frame 0 is forwarded"
    if mode not in ("RGB", "L"):
        return f"mode {mode} is converted to RGB differently by other decoders"
    if transparent:
        return "transparency was composited on white; a loader that drops it would see hidden pixels"
    if orientation not in (None, 1):
        return "EXIF rotation was applied; a loader that ignores it would see other pixels"
    if colour is not None and colour.chunks:
        return f"rendering metadata ({', '.join(colour.chunks)}) was applied; a viewer that applies it differently would see other pixels"
    if fmt == "PNG" and (len(data) < 26 or data[24] != 8 or data[25] not in (0, 2)):
        return "not an 8-bit greyscale or RGB PNG"
    idat = data.find(b"IDAT")
    if fmt == "PNG" and (idat < 0 or b"acTL" in data[:idat]):
        return "APNG animation control present"
    return ""


def _check_ico_entries(data: bytes, limits: ImageLimits, source: str | None) -> None:
    """Check every image an ICO holds, from the raw bytes, before Pillow opens (and decodes) it.

    An ICO directory stores sizes in one byte each; the embedded PNG or DIB says its real
    size, and Pillow's ICO plugin decodes it inside ``Image.open`` under Pillow's own global
    bomb limit (89 MP), not ours.
    """
    if len(data) < 6:
        return  # Pillow will refuse it
    (count,) = struct.unpack("<H", data[4:6])
    for i in range(count):
        entry = data[6 + 16 * i : 22 + 16 * i]
        if len(entry) < 16:
            raise CorruptImageError("the ICO directory is truncated", source=source)
        (offset,) = struct.unpack("<I", entry[12:16])
        head = data[offset : offset + 24]
        if head.startswith(b"\x89PNG\r\n\x1a\n") and len(head) >= 24:
            width, height = struct.unpack(">II", head[16:24])
        elif len(head) >= 12:
            width, height = struct.unpack("<ii", head[4:12])
            width, height = abs(width), abs(height) // 2  # a DIB in an ICO stacks the XOR and AND masks
        else:
            raise CorruptImageError("an ICO entry points outside the file", source=source)
        check_shape((width, height), limits, source)


def to_rgb(image: Image.Image, *, in_place: bool = False) -> Image.Image:
    """Return an 8-bit RGB version with EXIF orientation applied.

    Palette, LA/RGBA and RGB/L-with-transparency-key images are composited on white (a
    transparent pixel is not black); 16-bit and float greyscale are stretched from their
    minimum to their maximum, in blocks so that the temporaries stay a few MB whatever the
    image size; CMYK, YCbCr and the rest are converted by Pillow.

    Args:
        image: a loaded PIL image.
        in_place: apply the EXIF rotation to ``image`` itself (saves one copy when the
            caller owns it).
    """
    if in_place:
        ImageOps.exif_transpose(image, in_place=True)
    else:
        image = ImageOps.exif_transpose(image)
    if image.mode in _SIXTEEN_BIT_MODES:
        image = _stretch_to_8bit(image)
    if image.mode == "1":
        image = image.convert("L")
    if image.mode in ("P", *_ALPHA_MODES) or (image.mode in ("L", "RGB") and "transparency" in image.info):
        rgba = image if image.mode == "RGBA" else image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, (0, 0), rgba)
        return background
    if image.mode == "RGB":
        return image  # exif_transpose already copied unless in_place (the caller owns it)
    try:
        return image.convert("RGB")
    except ValueError:
        raise UnsupportedImageFormatError(f"colour mode {image.mode} cannot be converted to RGB") from None


def _stretch_to_8bit(image: Image.Image) -> Image.Image:
    """Min–max stretch 16-bit/32-bit/float greyscale to 8-bit ``L``, block by block.

    The old whole-image float64 conversion allocated 8 bytes per pixel, three times over (a
    40 MP image: ~1 GB of temporaries); this allocates the output (1 byte per pixel), one
    copy of the input's raw data, and float32 blocks of ``_STRETCH_CHUNK`` pixels.
    """
    import numpy as np

    lo, hi = image.getextrema()
    lo, hi = float(lo), float(hi)
    width, height = image.size
    out = np.zeros((height, width), dtype=np.uint8)
    if hi > lo and np.isfinite(lo) and np.isfinite(hi):
        array = np.asarray(image)  # (height, width), the input's own dtype: no widening
        rows = max(1, _STRETCH_CHUNK // max(width, 1))
        scale = np.float32(255.0 / (hi - lo))
        for start in range(0, height, rows):
            block = array[start : start + rows].astype(np.float32)  # (rows, width)
            block -= np.float32(lo)
            block *= scale
            np.nan_to_num(block, copy=False, nan=0.0, posinf=255.0, neginf=0.0)
            np.clip(block, 0.0, 255.0, out=block)
            out[start : start + rows] = np.rint(block)
        del array
    return Image.fromarray(out)  # uint8 (height, width) -> mode L

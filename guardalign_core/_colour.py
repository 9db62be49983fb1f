"""Rendering metadata → the pixels a colour-managed viewer shows, or a refusal.

Pillow decodes an image's raw samples. A browser or a provider's renderer also applies what the
file says about *how to show* them: a PNG gamma (``gAMA``), chromaticities (``cHRM``), an sRGB
intent (``sRGB``), a coding-independent colour description (``cICP``), an ICC profile (PNG
``iCCP``, JPEG ``APP2``, WebP ``ICCP``, TIFF). An attacker can use them to make the samples the
detector scans differ from what a model is shown: a ``gAMA`` of 0.01 turns near-white samples,
which scan as a blank page, into a visible picture; an ICC profile with extreme tone curves does
the same. Here each one is either applied to the checked pixels (so the detector scans what a
colour-managed renderer shows, and the re-encoded pixels, forwarded without any of these chunks,
show the same thing everywhere) or, where renderers disagree about it, refused:

- an ICC profile is converted to sRGB with LittleCMS (:mod:`PIL.ImageCms`); one that cannot be
  read, is over :data:`MAX_ICC_BYTES`, or does not match the image's colours is refused;
- a PNG ``gAMA`` alone is applied as the PNG specification says (``sample^(1/(gamma·2.2))``);
- ``sRGB``, and ``cHRM``/``cICP`` that describe sRGB, mean the samples are sRGB already;
- a ``gAMA`` beside an ``sRGB`` chunk or an ICC profile that contradicts it (decoders that know
  only ``gAMA`` would show other pixels than those that honour the profile), ``cHRM`` with
  other than sRGB primaries and no profile, ``cICP`` other than sRGB, and a colour chunk
  Pillow could not read are refused.

The original bytes may still be forwarded only when applying the metadata changed no pixel by
more than one level (it only declares sRGB); otherwise the checked pixels go out re-encoded,
without any of it (see ``_decode``).
"""

from __future__ import annotations

import io
import struct
from dataclasses import dataclass

from PIL import Image

from .errors import CorruptImageError, UnsupportedImageFormatError

SRGB_GAMMA = 0.45455
"""The ``gAMA`` value (file gamma) of sRGB-like data, as PNG encoders write it."""
_GAMMA_TOLERANCE = 0.02
_SRGB_CHROMATICITY = (0.3127, 0.3290, 0.64, 0.33, 0.30, 0.60, 0.15, 0.06)  # white x,y, red x,y, green x,y, blue x,y
_CHROMA_TOLERANCE = 0.01
_SRGB_CICP = bytes((1, 13, 0, 1))  # BT.709 primaries, sRGB transfer, RGB, full range
MAX_ICC_BYTES = 1 << 20
"""Largest embedded ICC profile accepted (real profiles are a few KB; camera ones up to a few hundred)."""
_PNG_COLOUR_CHUNKS = (b"gAMA", b"cHRM", b"sRGB", b"iCCP", b"cICP", b"mDCv", b"cLLi")
_MAX_PNG_CHUNKS = 4096  # chunks walked before IDAT; real files have a few dozen
_PROFILE_MODES = {
    "RGB ": ("RGB", "RGBA", "RGBa", "RGBX", "P", "PA", "YCbCr"),
    "GRAY": ("L", "LA", "La", "1", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"),
    "CMYK": ("CMYK",),
}


@dataclass(frozen=True)
class ColourInfo:
    """What an input says about how its samples are to be shown.

    Attributes:
        chunks: names of the rendering metadata present (``"gAMA"``, ``"ICC profile"``, ...);
            empty when there is none, and only then may the original bytes be forwarded.
        icc: the embedded ICC profile, if any.
        gamma: the PNG ``gAMA`` value, if any, when it is to be applied (no profile, no ``sRGB``).
    """

    chunks: tuple[str, ...] = ()
    icc: bytes | None = None
    gamma: float | None = None


def read_colour_info(image: Image.Image, data: bytes, source: str | None) -> ColourInfo:
    """Read the rendering metadata of an opened (not yet converted) image, refusing what cannot be normalised.

    Raises:
        UnsupportedImageFormatError: metadata that renderers would apply in ways that disagree
            (see the module docstring); the message says how to re-save the image.
        CorruptImageError: a colour chunk or profile that cannot be read.
    """
    info = image.info
    chunks: list[str] = []
    raw_png = _png_colour_chunks(data, source) if image.format == "PNG" else {}
    icc = info.get("icc_profile") or None
    if image.format == "JPEG" and icc is None and b"ICC_PROFILE\x00" in data:
        raise CorruptImageError("its ICC colour profile (APP2) cannot be assembled; re-save the image without it", source=source)
    if b"iCCP" in raw_png and icc is None:
        raise CorruptImageError("its ICC colour profile (iCCP) cannot be read; re-save the image without it", source=source)
    if icc is not None:
        chunks.append("ICC profile")
        if len(icc) > MAX_ICC_BYTES:
            raise UnsupportedImageFormatError(
                f"its ICC colour profile is {len(icc)} bytes, over the limit of {MAX_ICC_BYTES}; convert the image to sRGB first",
                source=source,
            )
    srgb = "srgb" in info
    gamma = info.get("gamma")
    chroma = info.get("chromaticity")
    if srgb:
        chunks.append("sRGB")
    if gamma is not None:
        chunks.append("gAMA")
        if not gamma > 0:
            raise CorruptImageError("its gAMA chunk holds a gamma of 0", source=source)
        if (icc is not None or srgb) and abs(gamma - SRGB_GAMMA) > _GAMMA_TOLERANCE:
            raise UnsupportedImageFormatError(
                f"its gAMA ({gamma:g}) contradicts its {'ICC profile' if icc is not None else 'sRGB chunk'}, so viewers would "
                "show different pixels; re-save the image in sRGB without a gAMA chunk",
                source=source,
            )
    if chroma is not None:
        chunks.append("cHRM")
        if icc is None and not srgb and any(abs(a - b) > _CHROMA_TOLERANCE for a, b in zip(chroma, _SRGB_CHROMATICITY)):
            raise UnsupportedImageFormatError(
                "its cHRM chunk declares primaries other than sRGB; convert the image to sRGB first", source=source
            )
    for name in (b"cICP", b"mDCv", b"cLLi"):
        if name in raw_png:
            chunks.append(name.decode())
    if b"cICP" in raw_png and raw_png[b"cICP"] != _SRGB_CICP:
        raise UnsupportedImageFormatError(
            "its cICP chunk describes a colour space other than sRGB (e.g. HDR); convert the image to sRGB first", source=source
        )
    if (b"gAMA" in raw_png and gamma is None) or (b"cHRM" in raw_png and chroma is None) or (b"sRGB" in raw_png and not srgb):
        raise CorruptImageError("a colour chunk (gAMA, cHRM or sRGB) cannot be read", source=source)
    # gAMA alone is applied; beside a profile or sRGB it was checked to agree with them (they win).
    apply_gamma = gamma if gamma is not None and icc is None and not srgb and abs(gamma - SRGB_GAMMA) > 0.002 else None
    return ColourInfo(chunks=tuple(chunks), icc=icc, gamma=apply_gamma)


def _png_colour_chunks(data: bytes, source: str | None) -> dict[bytes, bytes]:
    """The colour chunks before ``IDAT``, read from the raw bytes (Pillow ignores ``cICP`` and drops unreadable ones)."""
    found: dict[bytes, bytes] = {}
    pos = 8
    for _ in range(_MAX_PNG_CHUNKS):
        if pos + 8 > len(data):
            return found
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        kind = data[pos + 4 : pos + 8]
        if kind in (b"IDAT", b"IEND"):
            return found
        if kind in _PNG_COLOUR_CHUNKS:
            found[kind] = data[pos + 8 : pos + 8 + min(length, 16)]
        pos += 12 + length
    raise CorruptImageError(f"more than {_MAX_PNG_CHUNKS} chunks before the image data", source=source)


def convert_cmyk_profile(image: Image.Image, colour: ColourInfo, source: str | None) -> Image.Image:
    """A CMYK image with a CMYK profile, converted to sRGB through it (other images are returned as they are)."""
    if colour.icc is None or image.mode != "CMYK":
        return image
    return _transform(image, colour.icc, "CMYK", source)


def normalise_colour(rgb: Image.Image, original_mode: str, colour: ColourInfo, source: str | None) -> Image.Image:
    """Apply the profile or gamma of ``colour`` to the checked 8-bit RGB pixels (``rgb`` may be changed in place).

    Args:
        rgb: the checked pixels (``to_rgb`` of the input); a CMYK input with a profile was
            already converted by :func:`convert_cmyk_profile`.
        original_mode: the input's mode before conversion (decides which profiles fit it).
        colour: :func:`read_colour_info` of the input.
        source: the image's label, for errors.

    Raises:
        UnsupportedImageFormatError: the profile's colour space does not fit the image.
        CorruptImageError: LittleCMS cannot use the profile.
    """
    if colour.icc is not None and original_mode != "CMYK":
        return _transform(rgb, colour.icc, original_mode, source)
    if colour.gamma is not None:
        exponent = 1.0 / (colour.gamma * 2.2)
        lut = [min(255, round(255.0 * (v / 255.0) ** exponent)) for v in range(256)]
        return rgb.point(lut * 3)
    return rgb


def _transform(image: Image.Image, icc: bytes, original_mode: str, source: str | None) -> Image.Image:
    from PIL import ImageCms

    try:
        profile = ImageCms.ImageCmsProfile(io.BytesIO(icc))
        space = profile.profile.xcolor_space
    except (OSError, ValueError, TypeError, ImageCms.PyCMSError):
        raise CorruptImageError("its ICC colour profile cannot be read; re-save the image in sRGB", source=source) from None
    if original_mode not in _PROFILE_MODES.get(space, ()):
        raise UnsupportedImageFormatError(
            f"its ICC colour profile is for {space.strip() or 'an unknown'} colour, but the image is {original_mode}; "
            "re-save the image in sRGB",
            source=source,
        )
    if space == "GRAY" and image.mode != "L":
        image = image.convert("L")  # the checked pixels of a grey input: R = G = B
    try:
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
        intent = ImageCms.getDefaultIntent(profile)
        return ImageCms.profileToProfile(image, profile, srgb, renderingIntent=intent, outputMode="RGB")
    except (OSError, ValueError, TypeError, ImageCms.PyCMSError):
        raise CorruptImageError("its ICC colour profile cannot be applied; re-save the image in sRGB", source=source) from None

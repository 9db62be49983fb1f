"""Hostile images, written as attacks: extreme shapes, decoder crashes, pixels a model sees
differently from the detector, oversized base64. Each must fail on the code before the fix.

Memory-heavy cases run in a subprocess under RLIMIT_AS, so a regression fails the test
instead of taking the machine down.
"""

from __future__ import annotations

import base64
import io
import os
import struct
import subprocess
import sys
import textwrap
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from shared_images import shared_data
from guardalign_core import Status, create_detector
from guardalign_core.errors import (
    CorruptImageError,
    ImageAspectRatioError,
    ImageError,
    ImageTooLargeError,
)
from guardalign_core.images import (
    ImageLimits,
    decode_data_url,
    decode_image,
    load_image,
    prepare_forwarding,
    read_content_bytes,
)
from guardalign_core.testing.tiny_clip import tiny_detector_config

REPO = Path(__file__).resolve().parents[2]


def _encode(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


def _noise(width: int, height: int, seed: int = 0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8))


def _run_capped(code: str, *, cap_mb: int, timeout_s: float = 120) -> str:
    """Run ``code`` in a fresh interpreter whose address space is capped ``cap_mb`` above what
    its imports and setup used (``cap_mb`` is measured from the moment ``CAP()`` is called)."""
    prelude = textwrap.dedent(
        f"""
        import resource, sys
        def CAP():
            vm = int([l for l in open("/proc/self/status") if l.startswith("VmSize")][0].split()[1]) * 1024
            limit = vm + {cap_mb} * 2**20
            resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        """
    )
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True, text=True, timeout=timeout_s, env=env, cwd=REPO,
    )
    return proc.stdout.strip() + (f"\n[rc={proc.returncode}] {proc.stderr[-800:]}" if proc.returncode else "")


# -- 1. Resource exhaustion by shape -----------------------------------------------------------

def test_legal_pixel_count_in_an_extreme_shape_is_refused_from_the_header():
    """A 1 KB PNG, 1 pixel wide: legal pixel count, but seconds and gigabytes in every resize."""
    out = _run_capped(
        """
        import io
        from PIL import Image
        from guardalign_core.images import load_image
        from guardalign_core.errors import ImageAspectRatioError
        strips = []
        for size in [(1, 500_000), (1, 3_000_000), (3_000_000, 1)]:
            buf = io.BytesIO(); Image.new("L", size).save(buf, "PNG"); strips.append(buf.getvalue())
        CAP()
        for data in strips:
            try:
                load_image(data)
                print("DECODED")
            except ImageAspectRatioError as err:
                print("REFUSED", "max_aspect_ratio" in str(err))
        """,
        cap_mb=512,
    )
    assert out.splitlines() == ["REFUSED True"] * 3, out


def test_scanning_a_one_pixel_strip_fails_that_image_not_the_process(tiny_clip_checkpoint, embed_cache_dir):
    """End to end through the detector: 18 s and 4.9 GB before; now one error result."""
    out = _run_capped(
        f"""
        import io
        from PIL import Image
        from guardalign_core import create_detector
        from guardalign_core.testing.tiny_clip import tiny_detector_config
        detector = create_detector(tiny_detector_config({str(tiny_clip_checkpoint)!r}, cache_dir={str(embed_cache_dir)!r}))
        detector.scan([Image.new("RGB", (32, 32))])  # load the model before capping
        buf = io.BytesIO(); Image.new("L", (1, 500_000)).save(buf, "PNG")
        CAP()
        results = detector.scan([buf.getvalue(), Image.new("RGB", (32, 32))])
        print([r.status.value for r in results], "aspect" in (results[0].error or ""))
        """,
        cap_mb=1024,
        timeout_s=240,
    )
    assert out == f"[{Status.ERROR.value!r}, {Status.OK.value!r}] True", out


def test_real_long_shapes_are_still_accepted():
    receipt = load_image(_encode(Image.new("L", (300, 9000), 255)))  # 1:30, a long receipt
    panorama = load_image(_encode(Image.new("RGB", (8000, 1000))))  # 8:1
    assert receipt.size == (300, 9000) and panorama.size == (8000, 1000)
    with pytest.raises(ImageAspectRatioError):
        load_image(_encode(Image.new("L", (100, 3300))))  # 1:33


def test_sixteen_bit_conversion_allocates_a_bounded_multiple_of_the_pixels():
    """A 36 MP 16-bit PNG: the old float64 stretch needed ~900 MB of temporaries."""
    out = _run_capped(
        """
        import io, gc
        import numpy as np
        from PIL import Image
        from guardalign_core.images import load_image
        ramp = (np.arange(6000 * 6000, dtype=np.uint32) % 65536).astype(np.uint16).reshape(6000, 6000)
        buf = io.BytesIO(); Image.fromarray(ramp).save(buf, "PNG", compress_level=1); data = buf.getvalue()
        del ramp, buf; gc.collect()
        CAP()
        try:
            rgb = load_image(data)
            print("OK", rgb.mode, rgb.size, rgb.getextrema())
        except BaseException as err:
            print("FAILED", type(err).__name__)
        """,
        cap_mb=450,  # 36 MP: 72 MB decoded + 72 MB raw copy + 36 MB L + 108 MB RGB, plus blocks
        timeout_s=180,
    )
    assert out == "OK RGB (6000, 6000) ((0, 255), (0, 255), (0, 255))", out


def test_an_allocation_failure_is_an_image_error():
    out = _run_capped(
        """
        import io
        from PIL import Image
        from guardalign_core.images import load_image
        from guardalign_core.errors import ImageTooLargeError
        buf = io.BytesIO(); Image.new("RGB", (6000, 6000), (10, 200, 30)).save(buf, "PNG"); data = buf.getvalue()
        CAP()
        try:
            load_image(data)
            print("DECODED")
        except ImageTooLargeError as err:
            print("REFUSED", "memory" in str(err))
        except BaseException as err:
            print("LEAKED", type(err).__name__)
        """,
        cap_mb=60,
    )
    assert out == "REFUSED True", out


# -- 2. Decoder exceptions that are not ImageError -----------------------------------------------

def _tiff_ifd(entries: list[tuple[int, int, int, bytes]], endian: str = ">") -> bytes:
    mark = b"MM" if endian == ">" else b"II"
    out = mark + struct.pack(endian + "HI", 42, 8) + struct.pack(endian + "H", len(entries))
    for tag, typ, count, value in entries:
        out += struct.pack(endian + "HHI", tag, typ, count) + value
    return out + b"\0\0\0\0"


def _tiff_with_ascii_strip_offsets() -> bytes:
    """A 4×4 RGB TIFF whose StripOffsets tag (273) is typed ASCII: Pillow raises TypeError."""
    short = lambda v: struct.pack("<HH", v, 0)  # noqa: E731
    entries = [
        (256, 3, 1, short(4)), (257, 3, 1, short(4)), (258, 3, 1, short(8)), (259, 3, 1, short(1)),
        (262, 3, 1, short(2)), (273, 2, 4, b"abc\0"), (277, 3, 1, short(3)), (278, 3, 1, short(4)),
        (279, 4, 1, struct.pack("<I", 48)),
    ]
    return _tiff_ifd(entries, "<") + b"\x80" * 48


def _bad_exif_header_exif() -> bytes:
    return b"XX*\x00\x00\x00\x00\x08"  # not "II*\0" / "MM\0*": SyntaxError("not a TIFF file")


def _mistyped_tag_with_rotation_exif() -> bytes:
    # BitsPerSample typed ASCII next to Orientation=6: rotating rewrites the EXIF -> struct.error
    return _tiff_ifd([(0x0102, 2, 4, b"cam\x00"), (0x0112, 3, 1, b"\x00\x06\x00\x00")])


CRAFTED = {
    "png-eXIf-with-invalid-tiff-header": lambda: _encode(_noise(16, 16), "PNG", exif=_bad_exif_header_exif()),
    "webp-EXIF-with-invalid-tiff-header": lambda: _encode(_noise(16, 16), "WEBP", exif=_bad_exif_header_exif()),
    "jpeg-orientation-beside-a-mistyped-tag": lambda: _encode(_noise(16, 16), "JPEG", exif=b"Exif\0\0" + _mistyped_tag_with_rotation_exif()),
    "tiff-ifd-with-ascii-strip-offsets": _tiff_with_ascii_strip_offsets,
}


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_inputs_that_crash_the_decoder_raise_a_specific_image_error(name):
    data = CRAFTED[name]()
    with pytest.raises(CorruptImageError) as info:
        load_image(data, source="image 7")
    assert str(info.value).startswith("image 7:")
    with pytest.raises(CorruptImageError):
        decode_image(data)


def test_crafted_inputs_fail_only_their_own_image_in_a_batch(tiny_clip_checkpoint, embed_cache_dir):
    detector = create_detector(tiny_detector_config(tiny_clip_checkpoint, cache_dir=str(embed_cache_dir)))
    good = _encode(_noise(32, 32))
    batch = [good] + [CRAFTED[name]() for name in sorted(CRAFTED)] + [good]
    results = detector.scan(batch)
    assert [r.status for r in results] == [Status.OK] + [Status.ERROR] * len(CRAFTED) + [Status.OK]


def test_unreadable_local_file_is_an_image_error(tmp_path):
    directory = tmp_path / "photo.png"
    directory.mkdir()  # an OSError (IsADirectoryError) on read, not a missing file
    with pytest.raises(ImageError):
        load_image(directory)


# -- 3. Pixels the detector does not see as a model would ---------------------------------------

def _model_view(data: bytes) -> np.ndarray:
    """What a typical VLM loader sees: PIL's frame 0, converted to RGB (alpha dropped, no EXIF)."""
    return np.asarray(Image.open(io.BytesIO(data)).convert("RGB"))


def _hidden_under_alpha() -> bytes:
    rgba = _noise(48, 48, seed=3).convert("RGBA")
    rgba.putalpha(0)  # fully transparent: the detector sees white, a loader dropping alpha sees noise
    return _encode(rgba)


def _hidden_under_palette_transparency() -> bytes:
    palette = _noise(48, 48, seed=4).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    return _encode(palette, "PNG", transparency=bytes([0] * 16))  # every palette entry transparent


def _hidden_under_rgb_colour_key() -> bytes:
    image = Image.new("RGB", (48, 48), (10, 20, 30))
    image.paste((250, 0, 0), (8, 8, 40, 40))
    return _encode(image, "PNG", transparency=(250, 0, 0))  # tRNS: the red box is transparent


def _sixteen_bit_grey() -> bytes:
    ramp = (np.arange(48 * 48).reshape(48, 48) * 20).astype(np.uint16)  # 0..46060: PIL clips >255
    return _encode(Image.fromarray(ramp))


def _sixteen_bit_rgb_png() -> bytes:
    """A 16-bit RGB PNG (Pillow opens it as 8-bit RGB; other decoders keep all 16 bits)."""
    width = height = 8
    rows = b"".join(b"\0" + np.full(width * 3, 0x1234 + y, dtype=">u2").tobytes() for y in range(height))
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 16, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def _animated(fmt: str) -> bytes:
    first, second = Image.new("RGB", (48, 48), "white"), _noise(48, 48, seed=5)
    if fmt == "MPO":
        return _encode(first, "MPO", save_all=True, append_images=[second])
    return _encode(first, fmt, save_all=True, append_images=[second], duration=100)


def _photo(width: int, height: int) -> Image.Image:
    """A crop of a real photo (JPEG re-encoding error on noise is not what users send)."""
    photo = Image.open(shared_data("benign") / "chelsea.png").convert("RGB").crop((100, 50, 100 + width, 50 + height))
    photo.info = {}  # the file's own sRGB iCCP would otherwise be written again by PNG saves
    return photo


def _exif_rotated_jpeg() -> bytes:
    exif = Image.Exif()
    exif[0x0112] = 6
    return _encode(_photo(40, 24), "JPEG", exif=exif.tobytes(), quality=95)


HIDING = {
    "rgba-transparent-content": _hidden_under_alpha,
    "palette-transparency": _hidden_under_palette_transparency,
    "rgb-colour-key-transparency": _hidden_under_rgb_colour_key,
    "16-bit-grey": _sixteen_bit_grey,
    "16-bit-rgb-png": _sixteen_bit_rgb_png,
    "animated-gif": lambda: _animated("GIF"),
    "animated-png": lambda: _animated("PNG"),
    "animated-webp": lambda: _animated("WEBP"),
    "multi-page-tiff": lambda: _animated("TIFF"),
    "mpo": lambda: _animated("MPO"),
    "exif-rotated-jpeg": _exif_rotated_jpeg,
    "cmyk-jpeg": lambda: _encode(_photo(32, 32).convert("CMYK"), "JPEG"),
}


@pytest.mark.parametrize("name", sorted(HIDING))
def test_what_is_forwarded_is_what_was_scanned(name):
    data = HIDING[name]()
    scanned = np.asarray(load_image(data))
    decoded = decode_image(data)
    assert np.array_equal(np.asarray(decoded.rgb), scanned)
    assert not decoded.forward_as_sent and decoded.why_reencode
    forwarded = prepare_forwarding(decoded)
    assert forwarded.reencoded and forwarded.data != data
    reopened = Image.open(io.BytesIO(forwarded.data))
    assert getattr(reopened, "n_frames", 1) == 1 and reopened.mode == "RGB"
    seen = _model_view(forwarded.data)
    if forwarded.mime == "image/jpeg":  # JPEG stays JPEG (quality 95, 4:4:4): within its quantisation error
        assert np.abs(seen.astype(int) - scanned).mean() < 1.5
    else:
        assert np.array_equal(seen, scanned)  # a model sees exactly the scanned pixels


@pytest.mark.filterwarnings("ignore:Palette images with Transparency")
@pytest.mark.parametrize("name", ["rgba-transparent-content", "palette-transparency", "16-bit-grey", "animated-gif", "exif-rotated-jpeg"])
def test_the_original_bytes_really_would_have_shown_a_model_other_pixels(name):
    """The premise of the attack: forwarding these bytes as sent would have been unsafe."""
    data = HIDING[name]()
    model_view = _model_view(data)
    scanned = np.asarray(load_image(data))
    if name == "animated-gif":
        gif = Image.open(io.BytesIO(data))
        gif.seek(1)
        model_view = np.asarray(gif.convert("RGB"))  # a player shows frame 1 too
    assert model_view.shape != scanned.shape or not np.array_equal(model_view, scanned)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
@pytest.mark.parametrize("mode", ["RGB", "L"])
def test_opaque_still_images_are_forwarded_as_sent(fmt, mode):
    data = _encode(_noise(40, 30).convert(mode), fmt)
    decoded = decode_image(data)
    assert decoded.forward_as_sent and decoded.frames == 1 and decoded.mime == f"image/{fmt.lower()}"
    forwarded = prepare_forwarding(decoded)
    assert not forwarded.reencoded and forwarded.data is decoded.data
    assert np.array_equal(_model_view(data), np.asarray(decoded.rgb))


def test_real_shared_images_forward_exactly_what_was_scanned():
    for path in sorted(shared_data("benign").iterdir()):
        if path.suffix.lower() not in (".png", ".jpg"):
            continue
        decoded = decode_image(path.read_bytes(), source=path.name)
        forwarded = prepare_forwarding(decoded)
        seen = _model_view(forwarded.data).astype(int)
        if forwarded.mime == "image/jpeg" and forwarded.reencoded:  # lossy re-encode: close, not exact
            assert np.abs(seen - np.asarray(decoded.rgb)).mean() < 2.0, path.name
        else:
            assert np.array_equal(seen, np.asarray(decoded.rgb)), path.name


def test_multi_frame_input_reports_its_frames_and_scans_frame_zero():
    decoded = decode_image(_animated("TIFF"))
    assert decoded.frames == 2 and decoded.format == "TIFF"
    assert np.all(np.asarray(decoded.rgb) == 255)  # frame 0 (white), not the noise of frame 1


# -- 3b. Rendering metadata: gamma, ICC profiles, cICP (a viewer applies them, Pillow does not) ------

def _chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)


def _png_chunk_names(data: bytes) -> list[bytes]:
    names, pos = [], 8
    while pos + 8 <= len(data):
        (length,) = struct.unpack(">I", data[pos : pos + 4])
        names.append(data[pos + 4 : pos + 8])
        pos += 12 + length
    return names


def _with_png_chunks(png: bytes, *chunks: tuple[bytes, bytes]) -> bytes:
    """``png`` with ancillary chunks inserted right after IHDR (where the spec puts colour chunks)."""
    head = 8 + 12 + 13
    return png[:head] + b"".join(_chunk(kind, body) for kind, body in chunks) + png[head:]


def _rgb_icc_profile(gamma: float) -> bytes:
    """A minimal ICC v2 RGB display profile: sRGB primaries (D50-adapted), tone curves of ``gamma``."""
    def s15(x: float) -> bytes:
        return struct.pack(">i", round(x * 65536))

    def xyz(x: float, y: float, z: float) -> bytes:
        return b"XYZ " + bytes(4) + s15(x) + s15(y) + s15(z)

    text = b"guardalign test\x00"
    desc = b"desc" + bytes(4) + struct.pack(">I", len(text)) + text + bytes(4) + bytes(4) + bytes(3) + bytes(67)
    curve = b"curv" + bytes(4) + struct.pack(">IH", 1, round(gamma * 256)) + bytes(2)
    tags = [
        (b"desc", desc), (b"wtpt", xyz(0.9642, 1.0, 0.8249)),
        (b"rXYZ", xyz(0.4361, 0.2225, 0.0139)), (b"gXYZ", xyz(0.3851, 0.7169, 0.0971)), (b"bXYZ", xyz(0.1431, 0.0606, 0.7141)),
        (b"rTRC", curve), (b"gTRC", curve), (b"bTRC", curve),
    ]
    offset = 128 + 4 + 12 * len(tags)
    table, body = b"", b""
    for sig, data in tags:
        data += bytes(-len(data) % 4)
        table += sig + struct.pack(">II", offset + len(body), len(data))
        body += data
    size = offset + len(body)
    header = (
        struct.pack(">I", size) + bytes(4) + struct.pack(">I", 0x02100000) + b"mntrRGB XYZ " + bytes(12) + b"acsp"
        + bytes(24) + struct.pack(">I", 0) + s15(0.9642) + s15(1.0) + s15(0.8249) + bytes(48)
    )
    assert len(header) == 128
    return header + struct.pack(">I", len(tags)) + table + body


def _near_white(exponent: float) -> np.ndarray:
    """A photo's samples raised to ``exponent`` (≪ 1): all within a few levels of white, so they scan as blank."""
    photo = np.asarray(_photo(64, 48)).astype(np.float64) / 255.0
    return np.rint(255.0 * np.clip(photo, 16 / 255, 1.0) ** exponent).astype(np.uint8)


def _gamma_png(gamma: float = 0.01) -> bytes:
    """gAMA 0.01: a viewer shows ``sample^(1/(0.01·2.2))``, a picture; Pillow decodes the near-white samples."""
    png = _encode(Image.fromarray(_near_white(gamma * 2.2)))
    return _with_png_chunks(png, (b"gAMA", struct.pack(">I", round(gamma * 100000))))


def _icc_image(fmt: str, gamma: float = 40.0) -> bytes:
    """Near-white samples under a profile whose tone curves (gamma 40) turn them into the picture."""
    return _encode(Image.fromarray(_near_white(1 / 18)), fmt, icc_profile=_rgb_icc_profile(gamma), **({"quality": 95} if fmt == "JPEG" else {}))


def _colour_managed_view(data: bytes) -> np.ndarray:
    """What a colour-managed viewer shows: the embedded profile converted to sRGB by LittleCMS."""
    from PIL import ImageCms

    image = Image.open(io.BytesIO(data))
    profile = ImageCms.ImageCmsProfile(io.BytesIO(image.info["icc_profile"]))
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB"))
    return np.asarray(ImageCms.profileToProfile(image.convert("RGB"), profile, srgb, outputMode="RGB"))


def _assert_forwarded_plain(forwarded_data: bytes, scanned: np.ndarray) -> None:
    """The forwarded bytes carry no rendering metadata and decode to the scanned pixels."""
    reopened = Image.open(io.BytesIO(forwarded_data))
    for key in ("icc_profile", "gamma", "chromaticity", "srgb", "exif", "transparency"):
        assert key not in reopened.info, key
    if forwarded_data.startswith(b"\x89PNG"):
        assert set(_png_chunk_names(forwarded_data)) <= {b"IHDR", b"PLTE", b"IDAT", b"IEND"}, _png_chunk_names(forwarded_data)
        assert np.array_equal(_model_view(forwarded_data), scanned)
    else:
        assert b"ICC_PROFILE" not in forwarded_data and b"Exif\x00\x00" not in forwarded_data and b"ICCP" not in forwarded_data[:64]
        # JPEG stays JPEG (quality 95, 4:4:4): within its quantisation error, on noisy pixels too
        assert np.abs(_model_view(forwarded_data).astype(int) - scanned).mean() < 3.0


def test_an_extreme_png_gamma_cannot_hide_a_picture_from_the_detector():
    data = _gamma_png(0.01)
    raw = _model_view(data)  # what Pillow (and the old detector) sees: near-white
    assert raw.min() >= 235 and raw.std() < 6
    decoded = decode_image(data)
    scanned = np.asarray(decoded.rgb)
    exponent = 1 / (0.01 * 2.2)
    viewer = np.rint(255.0 * (raw / 255.0) ** exponent).astype(np.uint8)  # the PNG spec's display rule
    assert np.abs(scanned.astype(int) - viewer).max() <= 1
    assert scanned.std() > 30  # the picture the viewer shows is what is scanned
    assert not decoded.forward_as_sent and "gAMA" in decoded.why_reencode
    forwarded = prepare_forwarding(decoded)
    assert forwarded.reencoded
    _assert_forwarded_plain(forwarded.data, scanned)


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP"])
def test_an_icc_profile_is_converted_to_srgb_before_scanning_and_not_forwarded(fmt):
    data = _icc_image(fmt)
    assert _model_view(data).std() < 8  # Pillow alone: near-white samples
    decoded = decode_image(data)
    scanned = np.asarray(decoded.rgb)
    viewer = _colour_managed_view(data)
    assert np.abs(scanned.astype(int) - viewer).max() <= 1 and scanned.std() > 30
    assert not decoded.forward_as_sent and "ICC profile" in decoded.why_reencode
    _assert_forwarded_plain(prepare_forwarding(decoded).data, scanned)


def test_a_masked_image_with_a_profile_is_forwarded_without_it():
    """The masked pixels are sRGB: a forwarded profile would re-colour them (and the masked box)."""
    decoded = decode_image(_icc_image("PNG"))
    masked = decoded.rgb.copy()
    masked.paste((0, 0, 0), (0, 0, 32, 24))
    forwarded = prepare_forwarding(decoded, image=masked)
    _assert_forwarded_plain(forwarded.data, np.asarray(masked))


def test_an_exif_rotated_jpeg_is_forwarded_upright_without_its_exif():
    data = _exif_rotated_jpeg()
    decoded = decode_image(data)
    assert decoded.size == (24, 40) and not decoded.forward_as_sent  # orientation 6: rotated a quarter turn
    forwarded = prepare_forwarding(decoded)
    assert Image.open(io.BytesIO(forwarded.data)).getexif().get(0x0112) is None
    _assert_forwarded_plain(forwarded.data, np.asarray(decoded.rgb))


@pytest.mark.parametrize(
    "name, chunks",
    [
        ("sRGB chunk beside a contradicting gAMA", [(b"sRGB", b"\x00"), (b"gAMA", struct.pack(">I", 1000))]),
        ("cHRM with swapped primaries", [(b"cHRM", struct.pack(">8I", 31270, 32900, 15000, 6000, 30000, 60000, 64000, 33000))]),
        ("cICP for HDR (PQ)", [(b"cICP", bytes((9, 16, 0, 1)))]),
        ("unreadable iCCP", [(b"iCCP", b"x\x00\x00" + b"not zlib")]),
        ("unreadable gAMA", [(b"gAMA", b"\x01")]),
    ],
)
def test_rendering_metadata_that_viewers_disagree_about_is_refused(name, chunks):
    data = _with_png_chunks(_encode(_photo(32, 32)), *chunks)
    with pytest.raises(ImageError) as caught:
        decode_image(data, source="message 0, image 0")
    message = str(caught.value)
    assert message.startswith("message 0, image 0") and any(hint in message for hint in ("sRGB", "cannot be read", "damaged")), message


def test_an_icc_profile_with_a_mismatched_or_missing_colour_space_is_refused():
    grey_with_rgb_profile = _encode(_photo(32, 32).convert("L"), "PNG", icc_profile=_rgb_icc_profile(2.2))
    with pytest.raises(ImageError, match="ICC colour profile"):
        decode_image(grey_with_rgb_profile)
    with pytest.raises(ImageError, match="ICC colour profile"):
        decode_image(_encode(_photo(32, 32), "JPEG", icc_profile=b"\x00" * 200))


@pytest.mark.parametrize("declaration", ["srgb-chunks", "srgb-icc-profile"])
def test_metadata_that_only_declares_srgb_renders_the_same_and_may_go_as_sent(declaration):
    """Rendering cannot differ, so the fast path stays: the checked bytes are forwarded unchanged."""
    from PIL import ImageCms

    if declaration == "srgb-chunks":
        data = _with_png_chunks(_encode(_photo(32, 32)), (b"sRGB", b"\x00"), (b"gAMA", struct.pack(">I", 45455)),
                                (b"cICP", bytes((1, 13, 0, 1))))
    else:
        srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
        data = _encode(_photo(32, 32), "PNG", icc_profile=srgb)
    decoded = decode_image(data)
    assert np.abs(np.asarray(decoded.rgb).astype(int) - _model_view(data)).max() <= 1
    assert decoded.forward_as_sent and prepare_forwarding(decoded).data == data


def test_the_screening_step_forwards_the_normalised_pixels(tiny_clip_checkpoint, embed_cache_dir):
    """End to end: an allowed gAMA image leaves the core re-encoded, as scanned, with no gAMA."""
    from guardalign_core.config import GuardConfig, PolicyConfig
    from guardalign_core.guard import ContentImage, ImageGuard
    from guardalign_core.memory import CheckedImageMemory
    from guardalign_core.verdicts import Forward

    config = GuardConfig(
        detector=tiny_detector_config(tiny_clip_checkpoint, threshold=-1.0, cache_dir=str(embed_cache_dir)),
        policy=PolicyConfig(action="mask"),
    )
    guard = ImageGuard(config, memory=CheckedImageMemory())
    data = _gamma_png(0.01)
    for _ in range(2):  # the second request is answered from memory: the same normalised bytes
        (entry,) = guard.screen([ContentImage("messages[0].content[0]", source=data)]).images
        assert entry.forward == Forward.BYTES and entry.data != data
        _assert_forwarded_plain(entry.data, np.asarray(decode_image(data).rgb))


# -- 4. Oversized base64 is refused from its length, before it is decoded -----------------------

def _peak_allocation(fn) -> tuple[int, BaseException | None]:
    tracemalloc.start()
    try:
        fn()
        err = None
    except BaseException as caught:  # noqa: BLE001 - returned to the test
        err = caught
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak, err


@pytest.mark.parametrize("wrap", ["bare", "data-url", "mime-lines"])
def test_oversized_base64_is_refused_before_it_is_decoded(wrap):
    limits = ImageLimits(max_bytes=2_000_000)
    payload = base64.b64encode(b"\x89PNG\r\n\x1a\n" + bytes(3_000_000)).decode()  # 4 MB of text -> 3 MB
    text = {
        "bare": payload,
        "data-url": "data:image/png;base64," + payload,
        "mime-lines": "\n".join(payload[i : i + 76] for i in range(0, len(payload), 76)),
    }[wrap]
    peak, err = _peak_allocation(lambda: read_content_bytes(text, limits))
    assert isinstance(err, ImageTooLargeError), err
    assert peak < 1_000_000, f"allocated {peak} bytes before refusing"


def test_base64_within_the_limit_with_line_breaks_still_decodes():
    data = _encode(_noise(64, 64))
    wrapped = "\n".join(base64.b64encode(data).decode()[i : i + 76] for i in range(0, len(base64.b64encode(data)), 76))
    limits = ImageLimits(max_bytes=len(data))
    assert read_content_bytes(wrapped, limits) == data
    assert decode_data_url("data:image/png;base64," + base64.b64encode(data).decode(), limits=limits) == data


def _ico_hiding_a_large_png(width: int, height: int) -> bytes:
    """An ICO whose directory says 16×16 (sizes are one byte there) around a large PNG."""
    png = _encode(Image.new("RGB", (width, height)), "PNG")
    directory = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22)
    return directory + png


def test_an_ico_cannot_smuggle_a_larger_image_past_the_pixel_limit():
    data = _ico_hiding_a_large_png(2000, 2000)
    assert data[6:8] == b"\x10\x10"  # the directory claims 16x16; Pillow decodes the PNG inside open()
    with pytest.raises(ImageTooLargeError, match="max_pixels"):
        load_image(data, ImageLimits(max_pixels=1_000_000))
    with pytest.raises(ImageAspectRatioError):
        load_image(_ico_hiding_a_large_png(1, 5000))
    assert load_image(_ico_hiding_a_large_png(64, 64)).size == (64, 64)


def test_an_ico_is_checked_before_pillow_decodes_what_it_holds():
    """Pillow decodes an ICO's PNG inside Image.open, under its own 89 MP limit: 64 MP here."""
    out = _run_capped(
        """
        import io, struct
        from PIL import Image
        from guardalign_core.images import load_image
        from guardalign_core.errors import ImageTooLargeError
        buf = io.BytesIO(); Image.new("RGB", (8000, 8000)).save(buf, "PNG"); png = buf.getvalue()
        data = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 16, 16, 0, 0, 1, 32, len(png), 22) + png
        del buf
        CAP()
        try:
            load_image(data)
            print("DECODED")
        except ImageTooLargeError as err:
            print("REFUSED", "max_pixels" in str(err))
        except BaseException as err:
            print("LEAKED", type(err).__name__)
        """,
        cap_mb=120,
    )
    assert out == "REFUSED True", out

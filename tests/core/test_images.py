"""Decoding: every accepted input shape, every odd mode, and a specific error for each bad input."""

import base64
import io

import numpy as np
import pytest
from PIL import Image

from guardalign_core.errors import (
    CorruptImageError,
    EmptyImageError,
    ImageTooLargeError,
    InvalidImageSourceError,
    RemoteImageError,
    UnsupportedImageFormatError,
)
from guardalign_core.images import ImageLimits, decode_data_url, load_image, to_base64_png


def _png(image: Image.Image, fmt: str = "PNG", **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture
def rgb():
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (20, 30, 3), dtype=np.uint8))


def test_every_source_kind_decodes_to_the_same_pixels(rgb, tmp_path):
    data = _png(rgb)
    path = tmp_path / "x.png"
    path.write_bytes(data)
    b64 = base64.b64encode(data).decode()
    sources = [data, bytearray(data), str(path), path, b64, f"data:image/png;base64,{b64}", rgb, f"file://{path}"]
    expected = np.asarray(rgb)
    for source in sources:
        out = load_image(source)
        assert out.mode == "RGB" and out.size == (30, 20)
        assert np.array_equal(np.asarray(out), expected), type(source)


def test_modes_are_converted(rgb):
    gray = load_image(_png(rgb.convert("L")))
    assert gray.mode == "RGB" and np.array_equal(np.asarray(gray)[..., 0], np.asarray(gray)[..., 2])
    rgba = rgb.convert("RGBA")
    rgba.putalpha(0)
    assert np.all(np.asarray(load_image(_png(rgba))) == 255)  # transparent composites on white
    assert load_image(_png(rgb.convert("P"))).mode == "RGB"
    assert load_image(_png(rgb.convert("CMYK"), "JPEG")).mode == "RGB"
    sixteen = Image.fromarray((np.arange(600).reshape(20, 30) * 100).astype(np.uint16))
    out = np.asarray(load_image(_png(sixteen)))
    assert out.dtype == np.uint8 and out.min() == 0 and out.max() == 255


def test_exif_orientation_is_applied(rgb):
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90° clockwise on display
    data = _png(rgb, "JPEG", exif=exif.tobytes())
    assert load_image(data).size == (20, 30)


def test_zero_bytes():
    with pytest.raises(EmptyImageError, match="no bytes"):
        load_image(b"")


def test_truncated_png(rgb):
    data = _png(rgb)
    with pytest.raises(CorruptImageError, match="truncated or damaged"):
        load_image(data[: len(data) // 2], source="upload 1")


def test_decompression_bomb_over_pixel_limit():
    bomb = _png(Image.new("L", (4000, 4000)))  # tiny file, 16 Mpx
    with pytest.raises(ImageTooLargeError, match="over the limit"):
        load_image(bomb, ImageLimits(max_pixels=1_000_000))


def test_byte_limit(rgb):
    with pytest.raises(ImageTooLargeError, match="max_bytes"):
        load_image(_png(rgb), ImageLimits(max_bytes=10))


def test_svg_is_rejected():
    svg = b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"></svg>'
    with pytest.raises(UnsupportedImageFormatError, match="not a raster image"):
        load_image(svg)


def test_pdf_and_text_are_rejected():
    with pytest.raises(UnsupportedImageFormatError, match="PDF"):
        load_image(b"%PDF-1.4 ...")
    with pytest.raises(UnsupportedImageFormatError):
        load_image(b"just some text, not an image at all")


def test_random_bytes_as_base64():
    noise = base64.b64encode(np.random.default_rng(1).bytes(300)).decode()
    with pytest.raises(UnsupportedImageFormatError):
        load_image(noise)
    with pytest.raises(InvalidImageSourceError, match="base64"):
        load_image("data:image/png;base64,@@not*base64@@")


def test_malformed_data_url():
    with pytest.raises(InvalidImageSourceError, match="malformed data URL"):
        load_image("data:image/png;base64")
    with pytest.raises(UnsupportedImageFormatError, match="text/plain"):
        decode_data_url("data:text/plain;base64,aGVsbG8=")


def test_remote_url_with_fetching_off():
    with pytest.raises(RemoteImageError, match="not fetched"):
        load_image("https://example.com/cat.png")
    with pytest.raises(RemoteImageError, match="allowed_hosts"):
        load_image("https://example.com/cat.png", ImageLimits(allow_remote=True, allowed_hosts=("images.example.org",)))


def test_missing_path_and_wrong_type():
    with pytest.raises(InvalidImageSourceError, match="no such file"):
        load_image("/nonexistent/cat.png")
    with pytest.raises(InvalidImageSourceError, match="got int"):
        load_image(42)


def test_error_names_the_source_not_the_content(rgb):
    with pytest.raises(CorruptImageError) as info:
        load_image(_png(rgb)[:50], source="message 2, image 1")
    assert info.value.source == "message 2, image 1"
    assert str(info.value).startswith("message 2, image 1:")


def test_base64_png_roundtrip_is_lossless(rgb):
    assert np.array_equal(np.asarray(load_image(to_base64_png(rgb))), np.asarray(rgb))


def test_base64_that_looks_like_an_overlong_path_is_not_an_os_error(rgb):
    payload = base64.b64encode(_png(rgb)).decode()
    tricky = "a" * 300 + "/" + payload[:3000]
    with pytest.raises((InvalidImageSourceError, UnsupportedImageFormatError, CorruptImageError)):
        load_image(tricky)

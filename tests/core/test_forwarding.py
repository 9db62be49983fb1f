"""What reaches the provider: within its byte limit, honestly labelled, masks still black;
and the per-request budget that bounds how much one request may make us decode."""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
import pytest
from PIL import Image

from shared_images import shared_data
from guardalign_core.budget import RequestBudget
from guardalign_core.errors import CorruptImageError, ImageTooLargeError, RequestBudgetError
from guardalign_core.forwarding import encode_for_forwarding, prepare_forwarding, sniff_image_mime
from guardalign_core.images import ImageLimits, decode_image, encode_png
from guardalign_core.masking import grid_boxes

ANTHROPIC_RAW_LIMIT = 3_750_000  # 5 MB of base64


def _encode(image: Image.Image, fmt: str, **kwargs) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **kwargs)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def big_photo() -> Image.Image:
    """A 4000×3000 photo-like image: real photos tiled and upscaled, plus sensor-like noise."""
    tiles = [Image.open(shared_data("benign") / name).convert("RGB").resize((1000, 1000)) for name in
             ("chelsea.png", "coffee.png", "astronaut.png", "rocket.jpg")]
    canvas = Image.new("RGB", (4000, 3000))
    for i in range(12):
        canvas.paste(tiles[i % 4], ((i % 4) * 1000, (i // 4) * 1000))
    noise = np.random.default_rng(0).normal(0, 4, (3000, 4000, 3))
    return Image.fromarray(np.clip(np.asarray(canvas) + noise, 0, 255).astype(np.uint8))


def _mask(image: Image.Image, patches: list[int]) -> tuple[Image.Image, list[tuple[int, int, int, int]]]:
    boxes = grid_boxes(image.size[0], image.size[1], 3, 3)
    masked = image.copy()
    for index in patches:
        masked.paste((0, 0, 0), boxes[index])
    return masked, [boxes[i] for i in patches]


def test_a_masked_large_jpeg_stays_under_the_provider_limit(big_photo):
    """Before: the masked 4000×3000 JPEG became ~11 MB of PNG, over Anthropic's 5 MB (base64)."""
    original = _encode(big_photo, "JPEG", quality=90)
    decoded = decode_image(original)
    masked, boxes = _mask(decoded.rgb, [0, 4])
    assert len(encode_png(masked)) > ANTHROPIC_RAW_LIMIT  # the old forwarding path
    out = prepare_forwarding(decoded, image=masked)
    assert out.nbytes <= ANTHROPIC_RAW_LIMIT and out.mime == sniff_image_mime(out.data) == "image/jpeg"
    assert not out.downscaled and out.size == big_photo.size
    seen = np.asarray(Image.open(io.BytesIO(out.data)).convert("RGB")).astype(int)
    for left, top, right, bottom in boxes:
        inner = seen[top + 8 : bottom - 8, left + 8 : right - 8]
        assert inner.mean() < 1.0 and inner.max() <= 8  # masked boxes stay black through JPEG
    unmasked = np.asarray(masked).astype(int)
    assert np.abs(seen - unmasked).mean() < 2.0


def test_a_png_too_large_for_the_budget_is_downscaled_and_says_so(big_photo):
    masked, boxes = _mask(big_photo, [8])
    out = encode_for_forwarding(masked, like_format="PNG", max_bytes=ANTHROPIC_RAW_LIMIT)
    assert out.downscaled and out.nbytes <= ANTHROPIC_RAW_LIMIT and out.mime == "image/png"
    seen = np.asarray(Image.open(io.BytesIO(out.data)).convert("RGB"))
    assert seen.shape[:2] == (out.size[1], out.size[0]) and out.size[0] < 4000
    sx, sy = out.size[0] / 4000, out.size[1] / 3000
    left, top, right, bottom = boxes[0]
    inner = seen[int(top * sy) + 2 : int(bottom * sy) - 2, int(left * sx) + 2 : int(right * sx) - 2]
    assert inner.max() == 0  # lossless, area-averaged: the inside of the mask is exactly black


@pytest.mark.parametrize(
    "like, mime",
    [("JPEG", "image/jpeg"), ("MPO", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp"),
     ("GIF", "image/png"), ("TIFF", "image/png"), ("BMP", "image/png"), (None, "image/png"), ("image/jpeg", "image/jpeg")],
)
def test_declared_mime_matches_the_bytes(like, mime):
    image = Image.fromarray(np.random.default_rng(1).integers(0, 256, (40, 50, 3), dtype=np.uint8))
    out = encode_for_forwarding(image, like_format=like)
    assert out.mime == mime == sniff_image_mime(out.data)
    assert Image.open(io.BytesIO(out.data)).format == {"image/jpeg": "JPEG", "image/png": "PNG", "image/webp": "WEBP"}[mime]
    if mime != "image/jpeg":  # lossless
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(out.data)).convert("RGB")), np.asarray(image))


def test_as_sent_bytes_over_the_output_limit_are_reencoded(big_photo):
    data = _encode(big_photo.crop((0, 0, 2000, 1500)), "PNG", compress_level=1)
    decoded = decode_image(data)
    assert decoded.forward_as_sent and len(data) > ANTHROPIC_RAW_LIMIT
    out = prepare_forwarding(decoded)
    assert out.reencoded and out.nbytes <= ANTHROPIC_RAW_LIMIT


def test_a_mislabelled_input_is_forwarded_with_its_real_type():
    jpeg = _encode(Image.new("RGB", (16, 16), "red"), "JPEG")
    decoded = decode_image(jpeg)  # whatever the message claimed (say image/png), the bytes are JPEG
    assert decoded.mime == prepare_forwarding(decoded).mime == "image/jpeg"


def test_an_impossible_budget_is_an_error_not_an_oversized_image():
    image = Image.fromarray(np.random.default_rng(2).integers(0, 256, (200, 200, 3), dtype=np.uint8))
    with pytest.raises(ImageTooLargeError, match="max_output_bytes"):
        encode_for_forwarding(image, like_format="PNG", max_bytes=100)


def test_masked_pixels_must_match_the_scanned_size():
    decoded = decode_image(_encode(Image.new("RGB", (16, 16)), "PNG"))
    with pytest.raises(ValueError, match="size"):
        prepare_forwarding(decoded, image=Image.new("RGB", (8, 8)))


# -- per-request budget -------------------------------------------------------------------------

def test_the_twenty_first_image_is_refused_by_name():
    budget = RequestBudget(ImageLimits())
    for _ in range(20):
        budget.charge(images=1, nbytes=1000)
    with pytest.raises(RequestBudgetError, match="ImageLimits.max_images") as info:
        budget.charge(images=1, nbytes=1000, source="image 21")
    assert info.value.budget == "max_images" and str(info.value).startswith("image 21:")
    assert budget.images == 20 and budget.total_bytes == 20_000  # a refused charge adds nothing


def test_total_bytes_and_pixels_budgets():
    budget = RequestBudget(ImageLimits(max_total_bytes=10_000, max_total_pixels=5_000))
    budget.charge(images=1, nbytes=6_000, pixels=4_000)
    with pytest.raises(RequestBudgetError) as info:
        budget.charge(images=1, nbytes=6_000)
    assert info.value.budget == "max_total_bytes" and "max_total_bytes" in str(info.value)
    with pytest.raises(RequestBudgetError) as info:
        budget.charge(pixels=2_000)
    assert info.value.budget == "max_total_pixels"
    assert budget.remaining() == {"max_images": 19, "max_total_bytes": 4_000, "max_total_pixels": 1_000}
    with pytest.raises(ValueError):
        budget.charge(nbytes=-1)


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width×height but holds almost no data (decoding it would fail)."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\0" * 10))


def test_pixels_are_charged_from_the_header_before_decoding():
    budget = RequestBudget(ImageLimits(max_total_pixels=30_000_000))
    budget.charge(pixels=20_000_000)
    data = _png_header_only(4000, 3000)
    with pytest.raises(RequestBudgetError, match="max_total_pixels"):
        decode_image(data, budget=budget)  # refused before decoding (else: CorruptImageError)
    with pytest.raises(CorruptImageError):
        decode_image(data, budget=RequestBudget())
    assert budget.total_pixels == 20_000_000

"""The one screening step: budget, policy in the step, isolation of decoder failures, forwarded bytes."""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import pytest
from PIL import Image

from guardalign_core.config import GuardConfig, PolicyConfig
from guardalign_core.guard import ContentImage, ImageGuard
from guardalign_core.images import ImageLimits
from guardalign_core.memory import CheckedImageMemory
from guardalign_core.results import Decision, Status
from guardalign_core.testing.tiny_clip import tiny_detector_config
from guardalign_core.verdicts import Forward


def _png(seed: int, alpha: bool = False) -> bytes:
    pixels = np.random.default_rng(seed).integers(1, 255, (40, 48, 4 if alpha else 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture
def make_guard(tiny_clip_checkpoint, embed_cache_dir):
    def make(threshold: float = 100.0, action: str = "mask", fail_open: bool = False, **limits: Any) -> ImageGuard:
        config = GuardConfig(
            detector=tiny_detector_config(tiny_clip_checkpoint, threshold=threshold, cache_dir=str(embed_cache_dir)),
            policy=PolicyConfig(action=action, fail_open=fail_open),
            images=ImageLimits(**limits),
        )
        return ImageGuard(config, memory=CheckedImageMemory())

    return make


def test_a_decoder_failure_that_is_not_an_image_error_fails_only_its_own_image(make_guard, monkeypatch):
    """An attacker's image that crashes the decoder with an unexpected exception must not abort the batch."""
    import guardalign_core.detector as detector_module

    poison, good = _png(1), _png(2)
    real = detector_module.decode_image  # bytes from content are decoded here

    def fragile(image: Any, *args: Any, **kwargs: Any) -> Any:
        if image == poison:
            raise RuntimeError("decoder bug")  # e.g. a Pillow plugin raising something unexpected
        return real(image, *args, **kwargs)

    monkeypatch.setattr(detector_module, "decode_image", fragile)
    verdict = make_guard(threshold=-1.0, fail_open=True).screen([ContentImage("bad", source=poison), ContentImage("good", source=good)])
    bad, ok = verdict.images
    assert bad.result.status == Status.ERROR and "decoder bug" not in (bad.result.error or "")
    assert ok.result.status == Status.OK and ok.forward == Forward.BYTES and ok.data == good


def test_over_the_image_count_budget_nothing_is_read_or_forwarded(make_guard, monkeypatch):
    guard = make_guard(max_images=2, fail_open=True)
    monkeypatch.setattr(guard.detector, "scan", lambda *a, **k: pytest.fail("scanned an over-budget request"))
    verdict = guard.screen([ContentImage(f"image {i}", source=_png(i)) for i in range(3)])
    assert verdict.blocked and "max_images" in verdict.refused
    assert all(entry.forward == Forward.NOTHING for entry in verdict.images)  # fail_open does not open a budget


def test_over_the_byte_budget_the_request_is_refused(make_guard):
    images = [_png(i) for i in range(3)]
    verdict = make_guard(max_total_bytes=len(images[0]) + len(images[1]) - 1).screen(
        [ContentImage(f"image {i}", source=data) for i, data in enumerate(images)]
    )
    assert verdict.blocked and "max_total_bytes" in verdict.refused and all(e.forward == Forward.NOTHING for e in verdict.images)


def test_the_policy_is_applied_in_the_step_and_forwarded_bytes_are_what_was_scanned(make_guard, monkeypatch):
    guard = make_guard()
    seen: list[Any] = []
    scan = guard.detector.scan

    def spy(images: Any, **kwargs: Any) -> Any:
        seen.append((list(images), kwargs["policy"].action))
        return scan(images, **kwargs)

    monkeypatch.setattr(guard.detector, "scan", spy)
    data = _png(7)
    entry = guard.screen([ContentImage("x", source=data)]).images[0]
    assert seen == [([data], "flag")]  # the detector scores; the step decides
    assert entry.result.decision == Decision.MASK and entry.sanitised and entry.mime == "image/png"
    assert (np.asarray(Image.open(io.BytesIO(entry.data))) == 0).all() and entry.checked == data
    allowed = make_guard(threshold=-1.0).screen([ContentImage("y", source=data, mime="image/jpeg")]).images[0]
    assert allowed.data == data and allowed.mime == "image/png"  # the type is read from the bytes, not the claim


def test_flag_and_block_policies(make_guard):
    data = _png(8)
    flagged = make_guard(action="flag").screen([ContentImage("x", source=data)])
    assert flagged.decision == Decision.FLAG and flagged.images[0].data == data
    blocked = make_guard(action="block").screen([ContentImage("x", source=data)])
    assert blocked.blocked and blocked.images[0].forward == Forward.NOTHING and blocked.images[0].pixels() is None


def test_a_reused_verdict_decodes_its_pixels_once_from_the_forwarded_bytes(make_guard):
    guard = make_guard()
    data = _png(9)
    first = guard.screen([ContentImage("x", source=data)]).images[0]
    again = guard.screen([ContentImage("x", source=data)]).images[0]
    assert again.reused and again.data == first.data
    assert again.pixels() is again.pixels() and np.array_equal(np.asarray(again.pixels()), np.asarray(first.pixels()))


def test_transparent_pixels_are_forwarded_as_scanned_not_as_sent(make_guard):
    """Attack: content hidden under alpha = 0. The detector sees it composited on white; a
    provider that drops alpha would see the hidden pixels. What is forwarded must be what was scanned."""
    import io

    import numpy as np
    from PIL import Image

    hidden = np.zeros((48, 48, 4), dtype=np.uint8)
    hidden[..., 0] = 255  # pure red everywhere ...
    hidden[..., 3] = 0  # ... fully transparent
    buffer = io.BytesIO()
    Image.fromarray(hidden, "RGBA").save(buffer, format="PNG")
    verdict = make_guard(threshold=-1.0).screen([ContentImage("alpha", source=buffer.getvalue())])
    (image,) = verdict.images
    assert image.forward == Forward.BYTES and image.data != buffer.getvalue()
    forwarded = np.asarray(Image.open(io.BytesIO(image.data)).convert("RGBA"))
    assert forwarded[..., 3].min() == 255 and (forwarded[..., :3] == 255).all()  # opaque white: exactly what was scanned
    assert "re-encoded" in image.result.reason


def test_a_masked_jpeg_stays_jpeg_and_fits_the_output_budget(make_guard):
    """A masked photo must not balloon into a multi-megabyte PNG that the provider rejects."""
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    photo = Image.fromarray(rng.integers(0, 255, (600, 800, 3), dtype=np.uint8))
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    guard = make_guard(threshold=1e9)
    (image,) = guard.screen([ContentImage("photo", source=buffer.getvalue())]).images
    assert image.result.decision.value == "mask" and image.mime == "image/jpeg" and image.data[:3] == b"\xff\xd8\xff"
    assert len(image.data) <= guard.config.images.max_output_bytes

"""The detectors end to end: real images, policies, masking, errors, the planted patch."""

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import shared_data
from guardalign_core import Decision, DetectorConfig, PolicyConfig, Status, create_detector
from guardalign_core.detector import CosineDetector, OTDetector
from guardalign_core.errors import CorruptImageError
from guardalign_core.masking import grid_boxes
from guardalign_core.testing.tiny_clip import tiny_detector_config


@pytest.fixture
def config(tiny_clip_checkpoint, embed_cache_dir):
    return tiny_detector_config(tiny_clip_checkpoint, cache_dir=str(embed_cache_dir))


def _all_shared_images():
    root = shared_data()
    files = sorted(p for sub in ("benign", "figstep-tiny") for p in (root / sub).iterdir() if p.suffix.lower() in (".png", ".jpg"))
    assert len(files) == 62, f"expected the 62 shared images, found {len(files)}"
    return files


@pytest.mark.parametrize("patch_mode", ["grid", "tokens"])
def test_every_shared_image_scans_end_to_end(config, patch_mode):
    files = _all_shared_images()
    detector = OTDetector(config.model_copy(update={"patch_mode": patch_mode, "threshold": 1e9}))
    results = detector.scan([str(f) for f in files])
    assert [r.index for r in results] == list(range(62))
    rows, cols = (3, 3) if patch_mode == "grid" else (4, 4)
    for file, result in zip(files, results):
        with Image.open(file) as original:
            size = original.size if original.getexif().get(0x0112, 1) in (1, 2, 3, 4) else original.size[::-1]
        assert result.status == Status.OK, result.error
        assert result.image_size == size
        assert result.grid == (rows, cols) and np.array(result.scores).shape == (rows, cols)
        assert np.array(result.category_costs).shape == (rows, cols, len(detector.bank.names))
        assert result.decision == Decision.MASK and len(result.unsafe_boxes) == rows * cols
        for box in result.unsafe_boxes:
            assert 0 <= box.x0 < box.x1 <= size[0] and 0 <= box.y0 < box.y1 <= size[1]
        assert result.masked_image.size == size and result.masked_image.mode == "RGB"
        assert not np.asarray(result.masked_image).any()  # every patch masked: all black
        assert {"decode", "encode", "ot", "mask"} <= set(result.timings_ms)


def test_cosine_baseline_shares_the_interface(config):
    files = _all_shared_images()[:5]
    detector = create_detector(config, kind="cosine", cosine_threshold=-1.0)
    assert isinstance(detector, CosineDetector)
    results = detector.scan([str(f) for f in files])
    assert all(r.unsafe and r.detector == "cosine" and r.grid == (1, 1) for r in results)
    assert results[0].unsafe_boxes[0].x1 == results[0].image_size[0]


@pytest.mark.parametrize("rule", ["contrast", "paper"])
def test_planted_patch_is_the_only_one_flagged_and_masked_exactly(config, monkeypatch, rule):
    """Embedding-level planted test (DESIGN §1A, default weighting), on the rule's statistic."""
    config = config.model_copy(update={"rule": rule})
    detector = OTDetector(config)
    concepts, _ = detector.concept_embeddings()
    g = torch.Generator().manual_seed(1)
    patches = torch.nn.functional.normalize(torch.randn(1, 9, concepts.shape[-1], generator=g), dim=-1)
    patches[0, 5] = concepts[2, 1]  # patch (row 1, col 2) is exactly a 'weapons' variant
    monkeypatch.setattr(detector, "patch_features", lambda images: (patches.expand(len(images), -1, -1), (3, 3)))
    image = Image.fromarray(np.random.default_rng(0).integers(1, 255, (90, 120, 3), dtype=np.uint8))
    probe = detector.scan_one(image)
    scores = sorted(s for row in probe.statistic for s in row)
    assert probe.statistic[1][2] == scores[0]
    detector = OTDetector(config.model_copy(update={"threshold": (scores[0] + scores[1]) / 2}))
    monkeypatch.setattr(detector, "patch_features", lambda images: (patches.expand(len(images), -1, -1), (3, 3)))
    result = detector.scan_one(image)
    assert result.decision == Decision.MASK
    assert [(b.row, b.col, b.category) for b in result.unsafe_boxes] == [(1, 2, "weapons")]
    box = result.unsafe_boxes[0]
    assert (box.x0, box.y0, box.x1, box.y1) == grid_boxes(120, 90, 3, 3)[5]
    masked, original = np.asarray(result.masked_image), np.asarray(image)
    inside = np.zeros(original.shape[:2], bool)
    inside[box.y0 : box.y1, box.x0 : box.x1] = True
    assert not masked[inside].any()
    assert masked[~inside].tobytes() == original[~inside].tobytes()


@pytest.mark.parametrize(
    "action,decision,has_image", [("mask", Decision.MASK, True), ("block", Decision.BLOCK, False), ("flag", Decision.FLAG, True)]
)
def test_policies(config, action, decision, has_image):
    image = Image.new("RGB", (40, 30), (200, 100, 50))
    detector = create_detector(config, threshold=1e9, policy=PolicyConfig(action=action))
    result = detector.scan_one(image)
    assert result.decision == decision and result.policy == action
    assert (result.masked_image is not None) == has_image
    if action == "flag":
        assert np.array_equal(np.asarray(result.masked_image), np.asarray(image))


def test_safe_image_passes_unchanged(config):
    image = Image.new("RGB", (40, 30), (200, 100, 50))
    result = create_detector(config, threshold=-1e9).scan_one(image)
    assert result.decision == Decision.ALLOW and not result.unsafe and not result.unsafe_boxes
    assert np.array_equal(np.asarray(result.masked_image), np.asarray(image))
    assert "no patch" in result.reason


@pytest.mark.parametrize("mode", ["zero", "mean", "blur"])
def test_mask_modes_keep_size_and_change_only_boxes(config, mode):
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (60, 60, 3), dtype=np.uint8))
    result = create_detector(config, threshold=1e9, grid_size=2, mask_mode=mode).scan_one(image)
    masked = np.asarray(result.masked_image)
    assert masked.shape == (60, 60, 3)
    if mode == "zero":
        assert not masked.any()
    elif mode == "mean":
        assert np.all(masked == masked[0, 0]) and masked[0, 0].tolist() == [123, 117, 104]  # OpenAI CLIP mean × 255, rounded
    else:
        assert masked.std() < np.asarray(image).std() / 2


def test_bad_image_fails_only_its_own_result(config):
    good = Image.new("RGB", (32, 32), "white")
    results = create_detector(config).scan([good, b"\x89PNG\r\n\x1a\n broken", good])
    assert [r.status for r in results] == [Status.OK, Status.ERROR, Status.OK]
    bad = results[1]
    assert bad.decision == Decision.BLOCK and bad.masked_image is None and "fail-closed" in bad.reason
    assert "image 1" in bad.error
    open_results = create_detector(config, policy=PolicyConfig(fail_open=True)).scan([b"\x89PNG\r\n\x1a\n broken"])
    assert open_results[0].decision == Decision.ALLOW and open_results[0].status == Status.ERROR


def test_raise_errors(config):
    with pytest.raises(CorruptImageError):
        create_detector(config).scan([b"\x89PNG\r\n\x1a\n broken"], raise_errors=True)


def test_batch_and_single_scans_agree(config):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 255, (50 + 10 * i, 70, 3), dtype=np.uint8)) for i in range(4)]
    detector = create_detector(config)
    batched = detector.scan(images)
    for image, result in zip(images, batched):
        single = detector.scan_one(image)
        assert np.allclose(single.scores, result.scores, atol=1e-5)


def test_categories_allow_list_and_explanations(config):
    detector = create_detector(config, exclude_categories=["weapons", "drugs"])
    assert "weapons" not in detector.bank.names
    result = detector.scan_one(Image.new("RGB", (32, 32)))
    assert result.categories == detector.bank.names
    costs = np.array(result.category_costs)
    assert [[detector.bank.names[k] for k in row] for row in costs.argmin(-1)] == result.top_categories


def test_nothing_loads_until_first_scan(config):
    detector = create_detector(config.model_copy(update={"pretrained": "/nonexistent.pt"}))
    assert not detector.is_loaded  # construction is free; the bad path only fails on use


def test_threshold_is_in_the_result(config):
    result = create_detector(config, threshold=0.123).scan_one(Image.new("RGB", (8, 8)))
    assert result.threshold == 0.123 and result.backbone == "guardalign-tiny-clip/tiny-clip.pt (cpu/float32/torch)"
    assert result.execution == "cpu/float32/torch"


def test_unknown_config_field_is_an_error():
    with pytest.raises(ValueError, match="threshhold"):
        DetectorConfig(threshhold=0.3)

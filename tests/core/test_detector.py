"""The detectors end to end: real images, policies, masking, errors, the planted patch."""

import numpy as np
import pytest
import torch
from PIL import Image

from shared_images import shared_data
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


# -- the policy has one implementation, in the screening step's module (issue 10) -------------------


def test_the_detector_and_the_screening_step_apply_the_one_policy_function(config, monkeypatch):
    """The detector scores; the policy is applied by one function. Replacing it changes both callers."""
    import guardalign_core.detector as detector_module
    import guardalign_core.screening as screening_module
    from guardalign_core import policy as policy_module
    from guardalign_core.guard import ContentImage, ImageGuard
    from guardalign_core.config import GuardConfig

    assert detector_module.apply_policy is policy_module.apply_policy is screening_module.apply_policy
    assert not hasattr(screening_module, "_apply_policy")
    calls: list[str] = []
    real = policy_module.apply_policy

    def spy(result, policy, **kwargs):
        calls.append(policy.action)
        return real(result, policy, **kwargs)

    monkeypatch.setattr(detector_module, "apply_policy", spy)
    monkeypatch.setattr(screening_module, "apply_policy", spy)
    image = Image.new("RGB", (40, 30), (200, 100, 50))
    assert create_detector(config, threshold=1e9, policy=PolicyConfig(action="block")).scan_one(image).decision == Decision.BLOCK
    assert calls == ["block"]
    calls.clear()
    guard = ImageGuard(GuardConfig(detector=config.model_copy(update={"threshold": 1e9}), policy=PolicyConfig(action="mask")))
    buffer = __import__("io").BytesIO()
    image.save(buffer, format="PNG")
    verdict = guard.screen([ContentImage("x", source=buffer.getvalue())], reuse=False)
    assert verdict.images[0].result.decision == Decision.MASK
    assert calls == ["flag", "mask"]  # the detector's scan ran with 'flag' (it scores); the step applied 'mask', once


# -- the request's pixel budget is charged before decoding (issue 10) --------------------------------


def _shared_pngs(count: int) -> list[bytes]:
    files = sorted(p for p in shared_data("benign").iterdir() if p.suffix == ".png")
    sized = {}
    for path in files:  # distinct sizes, so the spy below can tell the images apart
        with Image.open(path) as image:
            sized.setdefault(image.size, path)
    return [path.read_bytes() for path in list(sized.values())[:count]]


def test_images_over_the_request_pixel_budget_are_refused_before_they_are_decoded(config, monkeypatch):
    """Attack: several images, each legal, together over max_total_pixels. The one that crosses the
    budget must be refused from its header, its pixels never decoded (today: decoded, then refused)."""
    import io

    from PIL import ImageFile

    from guardalign_core.config import GuardConfig
    from guardalign_core.guard import ContentImage, ImageGuard
    from guardalign_core.images import ImageLimits
    from guardalign_core.verdicts import Forward

    images = _shared_pngs(4)
    sizes = [Image.open(io.BytesIO(data)).size for data in images]
    limit = sum(w * h for w, h in sizes[:2]) + 1  # the first two fit; the third crosses the budget
    decoded: list[tuple[int, int]] = []
    load = ImageFile.ImageFile.load

    def spying_load(self):
        decoded.append(self.size)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", spying_load)
    guard = ImageGuard(GuardConfig(detector=config, images=ImageLimits(max_total_pixels=limit), policy=PolicyConfig(fail_open=True)))
    verdict = guard.screen([ContentImage(f"image {i}", source=data) for i, data in enumerate(images)], reuse=False)
    assert verdict.blocked and "max_total_pixels" in verdict.refused
    assert all(entry.forward == Forward.NOTHING for entry in verdict.images)  # fail_open does not open a budget
    assert sizes[2] not in decoded and sizes[3] not in decoded, decoded  # refused from the header alone
    assert sizes[0] in decoded and sizes[1] in decoded  # the spy sees decoding at all


def test_a_decoder_bug_does_not_double_charge_the_budget_on_the_retry(config, monkeypatch):
    """The screening step retries a batch image by image after an unexpected decoder error; the
    pixels the failed batch charged are given back, so a request within budget is not refused."""
    import io

    import guardalign_core.detector as detector_module
    from guardalign_core.config import GuardConfig
    from guardalign_core.guard import ContentImage, ImageGuard
    from guardalign_core.images import ImageLimits

    images = _shared_pngs(3)
    sizes = [Image.open(io.BytesIO(data)).size for data in images]
    real = detector_module.decode_image

    def fragile(data, *args, **kwargs):
        if data == images[2]:
            raise RuntimeError("decoder bug")
        return real(data, *args, **kwargs)

    monkeypatch.setattr(detector_module, "decode_image", fragile)
    limit = sum(w * h for w, h in sizes)  # exactly enough for all three, once each
    guard = ImageGuard(GuardConfig(detector=config, images=ImageLimits(max_total_pixels=limit)))
    verdict = guard.screen([ContentImage(f"image {i}", source=data) for i, data in enumerate(images)], reuse=False)
    assert verdict.refused is None
    assert [e.result.status for e in verdict.images] == [Status.OK, Status.OK, Status.ERROR]


def test_a_direct_scan_charges_pil_images_and_paths_too(config):
    from guardalign_core.budget import RequestBudget
    from guardalign_core.errors import RequestBudgetError
    from guardalign_core.images import ImageLimits

    path = sorted(p for p in shared_data("benign").iterdir() if p.suffix == ".png")[0]
    with Image.open(path) as image:
        pixels = image.size[0] * image.size[1]
        pil = image.convert("RGB")
    budget = RequestBudget(ImageLimits(max_total_pixels=2 * pixels))
    assert len(create_detector(config).scan([str(path), pil], budget=budget)) == 2
    assert budget.total_pixels == 2 * pixels
    with pytest.raises(RequestBudgetError, match="max_total_pixels"):
        create_detector(config).scan([pil], budget=budget)


def test_a_merged_batch_charges_each_image_to_its_own_request(config):
    """The server merges requests into one scan: each image's pixels go to its own request's budget."""
    import io

    from guardalign_core.budget import RequestBudget
    from guardalign_core.errors import RequestBudgetError
    from guardalign_core.images import ImageLimits

    a, b = _shared_pngs(2)
    size_a, size_b = (Image.open(io.BytesIO(x)).size for x in (a, b))
    first, second = RequestBudget(ImageLimits()), RequestBudget(ImageLimits())
    create_detector(config).scan([a, b, a], budget=[first, second, first])
    assert (first.total_pixels, second.total_pixels) == (2 * size_a[0] * size_a[1], size_b[0] * size_b[1])
    tight = RequestBudget(ImageLimits(max_total_pixels=size_a[0] * size_a[1]))
    with pytest.raises(RequestBudgetError):
        create_detector(config).scan([a, b], budget=[RequestBudget(ImageLimits()), tight])
    with pytest.raises(ValueError, match="budget"):
        create_detector(config).scan([a, b], budget=[first])

"""Encoder preprocessing: CLIP's centre crop for ETA (issue 15.7) and bounded memory on hostile shapes (issue 10)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image

from guardalign_core.encoders import ClipEncoder, _preprocess
from guardalign_core.testing.tiny_clip import TINY_CLIP
from shared_images import shared_data

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def encoder(tiny_clip_checkpoint) -> ClipEncoder:
    return ClipEncoder(TINY_CLIP, str(tiny_clip_checkpoint), "cpu", "float32", "torch")


def _old_squash(encoder: ClipEncoder, image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """The previous path: the full image as a float tensor, one antialiased bicubic resize."""
    return encoder.resize(encoder.to_tensor(image), size)


@pytest.mark.parametrize("name", ["chelsea.png", "coffee.png", "astronaut.png", "hubble_deep_field.jpg"])
def test_center_crop_matches_open_clips_eval_transform(encoder, name):
    import open_clip

    image = Image.open(shared_data("benign") / name).convert("RGB")
    transform = open_clip.image_transform(64, is_train=False, mean=open_clip.OPENAI_DATASET_MEAN, std=open_clip.OPENAI_DATASET_STD)
    expected = transform(image).unsqueeze(0)
    ours = encoder.center_crop(image)
    assert ours.shape == expected.shape == (1, 3, 64, 64)
    # The same PIL bicubic resampling of the same source box, on 8-bit pixels: at most one 8-bit level
    # (1/255/std ≤ 0.01501 in normalised units) where float rounding of the box coordinates flips a pixel.
    one_level = 1 / 255 / min(open_clip.OPENAI_DATASET_STD) + 1e-6
    assert torch.allclose(ours, expected, atol=one_level, rtol=0), float((ours - expected).abs().max())
    assert (ours - expected).abs().gt(1e-5).float().mean() < 0.01
    if image.size[0] != image.size[1]:  # ...and it is not the squash the detector used to feed the baseline
        assert not torch.allclose(encoder.whole(image), expected, atol=0.1)


def test_center_crop_box_is_torchvisions_geometry():
    (w, h), box = _preprocess.center_crop_box(451, 300, 224)
    assert (w, h) == (int(224 * 451 / 300), 224)
    left = round((w - 224) / 2)
    assert box[0] == pytest.approx(left * 451 / w) and box[1] == 0 and box[3] == pytest.approx(300)


def _old_crops(encoder: ClipEncoder, image: Image.Image, grid: int) -> torch.Tensor:
    h, w = encoder.image_size
    full = _old_squash(encoder, image, (grid * h, grid * w))[0]
    return full.reshape(3, grid, h, grid, w).permute(1, 3, 0, 2, 4).reshape(grid * grid, 3, h, w)


def test_images_within_twice_the_target_take_the_unchanged_path(encoder):
    """Within 2× of the model input on each axis: bit-for-bit the pixels of the float path."""
    for path in sorted(shared_data("benign").glob("*.png")):
        image = Image.open(path).convert("RGB")
        grid = next((g for g in (3, 2, 1) if max(image.size) <= 2 * 64 * g), None)
        if grid is None:
            continue
        assert not _preprocess.needs_pil_route(image.size, (64 * grid, 64 * grid))
        assert torch.equal(encoder.grid_crops(image, grid), _old_crops(encoder, image, grid)), path.name


@pytest.mark.parametrize("scale", [1, 7])  # the shared images as they are (760 px → 192) and at ~20 MP
def test_large_images_change_negligibly(encoder, scale):
    """Larger images are resized by PIL on 8-bit pixels; pixels move by about one level, embeddings not at all."""
    paths = [shared_data("benign") / "astronaut.png", *sorted(shared_data("figstep-tiny").glob("*.png"))[:2]]
    for path in paths:
        image = Image.open(path).convert("RGB")
        image = image.resize((image.width * scale, image.height * scale * 4 // 5), Image.Resampling.BICUBIC)
        assert _preprocess.needs_pil_route(image.size, (192, 192))
        new, old = encoder.grid_crops(image, 3), _old_crops(encoder, image, 3)
        one_level = 1 / 255 / 0.2613  # one 8-bit level in normalised units
        # PIL rounds to 8 bits and clamps bicubic overshoot after each pass; torch once at the end: a few
        # levels on sharp text edges (measured ≤ 12), a fraction of a level on average.
        assert (new - old).abs().mean() < 0.5 * one_level and (new - old).abs().max() < 20 * one_level, path.name
        cosine = torch.nn.functional.cosine_similarity(encoder.encode_images(new), encoder.encode_images(old))
        assert cosine.min() >= 0.99999, (path.name, float(cosine.min()))
        whole_cos = torch.nn.functional.cosine_similarity(
            encoder.encode_images(encoder.whole(image)), encoder.encode_images(_old_squash(encoder, image, encoder.image_size))
        )
        assert whole_cos.min() >= 0.99999


_STRIP = textwrap.dedent(
    """
    import resource, sys
    import torch
    from PIL import Image
    from guardalign_core.encoders import ClipEncoder
    from guardalign_core.testing.tiny_clip import TINY_CLIP
    encoder = ClipEncoder(TINY_CLIP, sys.argv[1], "cpu", "float32", "torch")
    encoder.encode_images(torch.zeros(9, 3, 64, 64))  # warm up every allocator before the cap
    image = Image.new("RGB", {size!r}, (200, 10, 10))
    image.putpixel((0, 0), (0, 0, 0))
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + {budget}, hard))
    for _ in range(2):
        crops = encoder.grid_crops(image, 3)
        features = encoder.encode_images(crops)
        whole = encoder.encode_images(encoder.whole(image))
        center = encoder.encode_images(encoder.center_crop(image))
    assert crops.shape == (9, 3, 64, 64) and features.isfinite().all()
    assert whole.isfinite().all() and center.isfinite().all()
    print("ok")
    """
)


@pytest.mark.parametrize("size", [(1, 500_000), (500_000, 1)])
def test_a_hostile_strip_encodes_under_a_memory_cap(tiny_clip_checkpoint, size):
    """Attack: a 1×500,000 image. The old path made a 1.1 GB float intermediate here (4.9 GB at ViT-L, grid 3)."""
    budget = 300 * 2**20  # address space on top of the warmed-up process
    script = _STRIP.format(size=size, budget=budget)
    proc = subprocess.run(
        [sys.executable, "-c", script, str(tiny_clip_checkpoint)],
        capture_output=True, text=True, timeout=300, cwd=REPO, env={"PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PATH": ""},
    )
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stderr[-2000:]

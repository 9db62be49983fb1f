"""A scan in three steps (prepare → score_prepared → finish_prepared): the same results as ``scan``, one backbone call for many groups."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import Image

import guardalign_core.detector as detector_module
from guardalign_core.budget import RequestBudget
from guardalign_core.config import PolicyConfig
from guardalign_core.detector import OTDetector
from guardalign_core.errors import RequestBudgetError
from guardalign_core.images import ImageLimits
from guardalign_core.results import Status
from guardalign_core.testing.tiny_clip import tiny_detector_config
from shared_images import shared_data


@pytest.fixture(scope="module")
def shared_bytes() -> list[bytes]:
    benign = sorted(p for p in shared_data("benign").iterdir() if p.suffix in (".png", ".jpg"))[:3]
    unsafe = sorted(shared_data("figstep-tiny").glob("*.png"))[:2]
    return [p.read_bytes() for p in benign + unsafe]


@pytest.fixture
def detector(tiny_clip_checkpoint, embed_cache_dir, shared_bytes) -> OTDetector:
    probe = OTDetector(tiny_detector_config(tiny_clip_checkpoint, cache_dir=str(embed_cache_dir)))
    # τ halfway between the two patch statistics around the median: some patches are masked, some
    # are not, and none sits on τ (batch composition moves a statistic by ~1e-7, never across τ)
    stats = sorted(s for r in probe.scan(shared_bytes) for row in r.statistic for s in row)
    tau = (stats[len(stats) // 2 - 1] + stats[len(stats) // 2]) / 2
    return OTDetector(tiny_detector_config(tiny_clip_checkpoint, cache_dir=str(embed_cache_dir), threshold=tau))


def backbone_calls(detector: OTDetector, monkeypatch) -> list[int]:
    """Images per call of the detector's scoring stage (the backbone forward and the rule)."""
    calls, real = [], detector._score

    def score(images):
        calls.append(len(images))
        return real(images)

    monkeypatch.setattr(detector, "_score", score)
    return calls


def same(a, b) -> None:
    assert (a.index, a.source, a.status, a.decision, a.policy) == (b.index, b.source, b.status, b.decision, b.policy)
    for x, y in ((a.scores, b.scores), (a.statistic, b.statistic)):
        assert (x is None and y is None) or np.allclose(x, y, atol=1e-5)
    assert [(x.row, x.col, x.category) for x in a.unsafe_boxes] == [(x.row, x.col, x.category) for x in b.unsafe_boxes]
    if a.masked_image is None or b.masked_image is None:
        assert a.masked_image is None and b.masked_image is None
    else:
        assert np.array_equal(np.asarray(a.masked_image), np.asarray(b.masked_image))


def test_three_steps_over_several_groups_equal_one_scan_per_group(detector, shared_bytes, monkeypatch):
    groups = [
        ([shared_bytes[0], b"not an image", shared_bytes[3]], ["a0", "a1", "a2"], PolicyConfig(action="mask")),
        ([shared_bytes[1], shared_bytes[4]], ["b0", "b1"], PolicyConfig(action="block")),
        ([shared_bytes[2]], ["c0"], PolicyConfig(action="flag")),
    ]
    expected = [detector.scan(images, sources=labels, policy=policy) for images, labels, policy in groups]
    assert {r.decision.value for rs in expected for r in rs} >= {"mask", "block"}  # the policies really differ
    calls = backbone_calls(detector, monkeypatch)
    prepared = [detector.prepare(images, sources=labels) for images, labels, _ in groups]
    scored = detector.score_prepared(prepared)
    assert calls == [5]  # every decoded image of every group, in one backbone call
    for group, share, (_, _, policy), want in zip(prepared, scored, groups, expected):
        got = detector.finish_prepared(group, share, policy)
        assert len(got) == len(want)
        for a, b in zip(got, want):
            same(a, b)
    assert detector.finish_prepared(prepared[0], scored[0])[1].status == Status.ERROR  # the undecodable input


def test_each_group_gets_its_share_of_the_stage_timings(detector, shared_bytes):
    prepared = [detector.prepare(shared_bytes[:3]), detector.prepare(shared_bytes[3:4])]
    (_, first), (_, second) = detector.score_prepared(prepared)
    assert set(first) == set(second) >= {"encode", "ot"}
    for stage in first:
        assert first[stage] == pytest.approx(3 * second[stage])  # in proportion to the images


def test_prepare_charges_the_budget_before_decoding(detector, shared_bytes, monkeypatch):
    sizes = [Image.open(io.BytesIO(b)).size for b in shared_bytes[:3]]
    budget = RequestBudget(ImageLimits(max_total_pixels=sum(w * h for w, h in sizes[:2])))  # the third is one too many
    decoded, real = [], detector_module.decode_image

    def decode(data, *args, **kwargs):
        out = real(data, *args, **kwargs)
        decoded.append(kwargs.get("source"))
        return out

    monkeypatch.setattr(detector_module, "decode_image", decode)
    with pytest.raises(RequestBudgetError, match="max_total_pixels"):
        detector.prepare(shared_bytes[:3], sources=["x", "y", "z"], budget=budget)
    assert decoded == ["x", "y"]  # the over-budget image was never decoded


def test_groups_with_nothing_decoded_never_load_the_backbone(tiny_clip_checkpoint, embed_cache_dir):
    detector = OTDetector(tiny_detector_config(tiny_clip_checkpoint, cache_dir=str(embed_cache_dir)))
    group = detector.prepare([b"garbage", b"\x89PNG\r\n\x1a\n"])
    assert detector.score_prepared([group, group]) == [([], {}), ([], {})]
    results = detector.finish_prepared(group, ([], {}))
    assert [r.status for r in results] == [Status.ERROR, Status.ERROR] and [r.decision.value for r in results] == ["block", "block"]
    assert not detector.is_loaded


def test_sources_must_match_the_images(detector, shared_bytes):
    with pytest.raises(ValueError, match="sources"):
        detector.prepare(shared_bytes[:2], sources=["only one"])

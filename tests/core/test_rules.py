"""The decision rule: Eq. 7 against NumPy, the score's scale, invariance across M, fail-closed numbers."""

import logging
import math

import numpy as np
import ot as pot
import pytest
import torch
from shared_images import shared_data
from PIL import Image

from guardalign_core import ConceptBank, DetectorConfig, SinkhornConfig, Status, create_detector, get_preset, list_presets, load_config
from guardalign_cli import main
from guardalign_core.detector import OTDetector
from guardalign_core.ot import ot_patch_scores
from guardalign_core.rules import DEFAULT_THRESHOLDS, decide_patches, safe_probability
from guardalign_core.simulation import DetectionWorld, _World, run_detection_benchmark, world_for
from guardalign_core.testing.tiny_clip import tiny_detector_config


def _unit(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _softmax(x, axis=-1):
    e = np.exp(x - x.max(axis=axis, keepdims=True))
    return e / e.sum(axis=axis, keepdims=True)


def _entropy(p, axis=-1):
    return -(p * np.log(p)).sum(axis=axis)


def numpy_marginals(x, z, logit_scale, temperature):
    """Eq. 7 written out in NumPy, printed sign: a over patches, b_i over variants (AWT's recipe)."""
    x, z = _unit(x), _unit(z)  # (M, D), (C, N, D)
    means = _unit(z.mean(1))  # (C, D)
    h = _entropy(_softmax(logit_scale * x @ means.T))  # (M,)
    a = _softmax(h / temperature)
    image = _unit(x.mean(0))  # (D,)
    n_cat, n_var = z.shape[:2]
    b = np.zeros((n_cat, n_var))
    for i in range(n_cat):
        hs = []
        for n in range(n_var):
            logits = logit_scale * means @ image
            logits[i] = logit_scale * z[i, n] @ image
            hs.append(_entropy(_softmax(logits)))
        b[i] = _softmax(np.array(hs) / temperature)
    return a, b


def numpy_d_ot(x, z, logit_scale, temperature, reg):
    """Eq. 9 with POT's Sinkhorn as the solver and the NumPy marginals."""
    a, b = numpy_marginals(x, z, logit_scale, temperature)
    xs, zs = _unit(x), _unit(z)
    d = np.zeros(len(x))
    for i in range(z.shape[0]):
        cost = 1.0 - xs @ zs[i].T  # (M, N)
        plan = pot.sinkhorn(a, b[i], cost, reg, method="sinkhorn_log", numItermax=10_000, stopThr=1e-12)
        d += (plan * cost).sum(-1)
    return d


@pytest.fixture
def problem():
    rng = np.random.default_rng(3)
    z = _unit(rng.standard_normal((4, 5, 32)))
    x = _unit(rng.standard_normal((9, 32)) + 2.0 * z[1, 2])  # patches share some of a concept, so entropies differ
    return x, z


def test_eq7_marginals_match_numpy_and_catch_both_mutations(problem):
    x, z = problem
    scale = 14.3
    a_ref, b_ref = numpy_marginals(x, z, scale, 0.5)
    out = ot_patch_scores(torch.from_numpy(x)[None], torch.from_numpy(z), logit_scale=scale, temperature=0.5)
    assert torch.allclose(out.a[0], torch.from_numpy(a_ref), atol=1e-10)
    assert torch.allclose(out.b[0], torch.from_numpy(b_ref), atol=1e-10)
    # The reference is sensitive to exactly the mutations the issue names, so the test is too.
    assert not np.allclose(b_ref, 1 / z.shape[1], atol=1e-3)  # b replaced by uniform weights
    a_one, b_one = numpy_marginals(x, z, 1.0, 0.5)  # entropy at logit scale 1
    assert not np.allclose(a_one, a_ref, atol=1e-3) and not np.allclose(b_one, b_ref, atol=1e-3)


def test_detector_uses_the_backbones_logit_scale(tiny_clip_checkpoint, embed_cache_dir, monkeypatch):
    config = tiny_detector_config(
        tiny_clip_checkpoint, cache_dir=str(embed_cache_dir), rule="paper", sinkhorn=SinkhornConfig(tol=1e-6, max_iter=5000)
    )
    bank = ConceptBank.from_mapping({"weapons": ["a gun", "a rifle", "a bomb"], "drugs": ["cocaine", "pills", "a syringe"],
                                     "hate": ["a hate symbol", "a rally", "propaganda"]})
    detector = OTDetector(config, bank=bank)
    concepts, _ = detector.concept_embeddings()
    rng = np.random.default_rng(0)
    feats = _unit(rng.standard_normal((9, concepts.shape[-1])) + 1.5 * concepts[2, 0].numpy())
    monkeypatch.setattr(detector, "patch_features", lambda images: (torch.from_numpy(feats).float()[None].expand(len(images), -1, -1), (3, 3)))
    result = detector.scan_one(Image.new("RGB", (30, 30)))
    scale = detector.encoder.logit_scale
    assert abs(scale - 1.0) > 1  # the tiny CLIP's scale (1/0.07) is far from 1
    expected = numpy_d_ot(feats.astype(np.float64), concepts.numpy().astype(np.float64), scale, config.temperature, config.sinkhorn.reg)
    assert np.allclose(np.array(result.d_ot).ravel(), expected, atol=2e-3)
    wrong = numpy_d_ot(feats.astype(np.float64), concepts.numpy().astype(np.float64), 1.0, config.temperature, config.sinkhorn.reg)
    assert not np.allclose(np.array(result.d_ot).ravel(), wrong, atol=2e-3)


def test_scale_identity_and_scale_free_score(problem):
    x, z = problem
    xs = torch.from_numpy(x)[None]
    out = decide_patches(xs, torch.from_numpy(z), rule="scaled")
    a, costs = out.ot.a, out.expected_costs
    assert torch.allclose(out.d_ot, a * costs.sum(-1), atol=1e-10)  # d_OT(m) = a^m·Σ_i E_i(m)
    m, c = x.shape[0], z.shape[0]
    assert torch.allclose(out.scores, out.d_ot * m / c, atol=1e-12)
    uniform = decide_patches(xs, torch.from_numpy(z), rule="scaled", weighting="uniform")
    assert torch.allclose(uniform.scores, uniform.expected_costs.mean(-1), atol=1e-10)  # Appendix B: the mean cost


def test_paper_rule_reproduces_eq10_on_raw_d_ot(problem):
    x, z = problem
    feats = torch.from_numpy(x)[None].float()
    today = ot_patch_scores(feats, torch.from_numpy(z).float())
    for tau in (0.42, float(today.scores.median())):
        out = decide_patches(feats, torch.from_numpy(z).float(), rule="paper", threshold=tau)
        assert torch.equal(out.statistic, today.scores)
        assert torch.equal(out.unsafe, today.scores <= tau)
    assert decide_patches(feats, torch.from_numpy(z).float(), rule="paper").threshold == 0.42


def _tiled_image(world, patches, planted_at):
    """One image of ``patches`` patches: benign patches cycled from a fixed pool, planted ones fixed too."""
    sim = _World(world)
    pool = sim.images(1, 0)[0]  # (M0, D) benign
    unsafe = sim.images(1, world.patches)[0]  # (M0, D) all unsafe (one category)
    rows = [unsafe[0] if j in planted_at else pool[j % len(pool)] for j in range(patches)]
    return torch.from_numpy(np.stack(rows)).float()[None], sim


@pytest.mark.parametrize("patches", [4, 9, 16, 25, 49])
def test_default_decision_does_not_depend_on_m(patches):
    world = DetectionWorld(dim=256, patches=4, images=2, sigma_cat=0.01)
    feats, sim = _tiled_image(world, patches, planted_at={1})
    out = decide_patches(feats, torch.from_numpy(sim.unsafe).float(), reference=torch.from_numpy(sim.reference).float())
    assert out.unsafe[0].nonzero().flatten().tolist() == [1]
    # The same benign patch gets the same statistic whatever the number of patches.
    p_benign = float(out.statistic[0, 0])
    ref_feats, _ = _tiled_image(world, 4, planted_at={1})
    ref = decide_patches(ref_feats, torch.from_numpy(sim.unsafe).float(), reference=torch.from_numpy(sim.reference).float())
    assert math.isclose(p_benign, float(ref.statistic[0, 0]), abs_tol=1e-3)


def test_an_image_unsafe_in_every_patch_is_flagged():
    world = DetectionWorld(dim=256, patches=9, images=2)
    sim = _World(world)
    feats = torch.from_numpy(sim.images(2, 9)).float()
    z, ref = torch.from_numpy(sim.unsafe).float(), torch.from_numpy(sim.reference).float()
    assert bool(decide_patches(feats, z, reference=ref).unsafe.all())
    # ... which the paper's rule, by its scale, never does (the finding).
    assert not bool(decide_patches(feats, z, rule="paper").unsafe.any())


@pytest.mark.parametrize("name", [n for n in list_presets() if get_preset(n).detector.kind == "ot"])
def test_every_preset_threshold_fits_its_m_and_c(name):
    config = get_preset(name).detector
    world = world_for(config, images=40)
    world = world.model_copy(update={"dim": max(world.dim, 256)})
    report = run_detection_benchmark(world, config)
    assert report.fpr <= 0.05, (name, report)
    assert min(report.tpr.values()) >= 0.95, (name, report)


def test_world_for_reads_m_c_and_dim_from_the_config():
    assert world_for(get_preset("cpu-tokens").detector).patches == 196
    assert world_for(get_preset("default").detector).dim == 768
    assert world_for(get_preset("fast-cpu").detector, categories=3).categories == 3
    assert world_for(DetectorConfig(grid_size=5)).patches == 25


def test_contrast_probability_is_the_zero_shot_softmax():
    costs = torch.tensor([[0.7, 0.85, 0.86]], dtype=torch.float64)
    ref = torch.tensor([[0.84, 0.83]], dtype=torch.float64)
    s = 100.0
    logits = np.concatenate([-s * costs.numpy()[0], -s * ref.numpy()[0]])
    expected = _softmax(logits)[3:].sum()
    assert math.isclose(float(safe_probability(costs, ref, s)[0]), expected, rel_tol=1e-12)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_features_fail_closed(tiny_clip_checkpoint, embed_cache_dir, monkeypatch, bad):
    detector = OTDetector(tiny_detector_config(tiny_clip_checkpoint, cache_dir=str(embed_cache_dir)))
    concepts, _ = detector.concept_embeddings()
    good = torch.nn.functional.normalize(torch.randn(1, 9, concepts.shape[-1]), dim=-1)
    poisoned = good.clone()
    poisoned[0, 4, 0] = bad
    monkeypatch.setattr(detector, "patch_features", lambda images: (torch.cat([good, poisoned, good])[: len(images)], (3, 3)))
    results = detector.scan([Image.new("RGB", (20, 20))] * 3)
    assert [r.status for r in results] == [Status.OK, Status.ERROR, Status.OK]
    assert results[1].decision.value == "block" and results[1].masked_image is None and "non-finite" in results[1].error
    assert results[0].scores == results[2].scores  # the poisoned image does not leak into its batch


def test_non_finite_thresholds_are_rejected_with_the_field_named(tmp_path):
    for field in ("threshold", "cosine_threshold"):
        with pytest.raises(ValueError, match=field):
            DetectorConfig(**{field: float("nan")})
    path = tmp_path / "nan.yaml"
    path.write_text("detector:\n  threshold: .nan\n")
    with pytest.raises(ValueError, match="threshold"):
        load_config(path)
    with pytest.raises(ValueError, match="threshold"):
        decide_patches(torch.randn(1, 4, 8), torch.randn(2, 3, 8), rule="scaled", threshold=float("nan"))


def test_cli_threshold_nan_is_one_clear_line(tiny_clip_checkpoint, capsys):
    code = main(["scan", "x.png", "--threshold", "nan", "--model", "guardalign-tiny-clip", "--pretrained", str(tiny_clip_checkpoint)])
    err = capsys.readouterr().err
    assert code == 2 and "threshold" in err and "Traceback" not in err and err.count("\n") == 1


def test_many_patches_firing_logs_a_warning(tiny_clip_checkpoint, embed_cache_dir, caplog):
    detector = create_detector(tiny_detector_config(tiny_clip_checkpoint, cache_dir=str(embed_cache_dir), threshold=2.0))
    with caplog.at_level(logging.WARNING, logger="guardalign_core.detector"):
        result = detector.scan_one(Image.new("RGB", (20, 20)))
    assert len(result.unsafe_boxes) == 9
    assert "threshold probably does not fit" in caplog.text


def test_results_carry_the_rule_and_every_score(tiny_clip_checkpoint, embed_cache_dir):
    result = create_detector(tiny_detector_config(tiny_clip_checkpoint, cache_dir=str(embed_cache_dir))).scan_one(Image.new("RGB", (20, 20)))
    assert result.rule == "contrast" and result.threshold == DEFAULT_THRESHOLDS["contrast"]
    p_safe = np.array(result.safe_probability)
    assert p_safe.shape == (3, 3) and ((p_safe >= 0) & (p_safe <= 1)).all()
    assert np.array_equal(np.array(result.statistic), p_safe) and result.score == pytest.approx(p_safe.min())
    assert np.allclose(np.array(result.scores), np.array(result.d_ot) * 9 / len(result.categories))
    summary = result.summary()
    assert summary["rule"] == "contrast" and summary["threshold"] == 0.5


def test_calibrate_writes_the_rule_and_a_threshold_on_its_scale(tiny_clip_checkpoint, tmp_path, capsys):
    out = tmp_path / "tau.yaml"
    args = ["--model", "guardalign-tiny-clip", "--pretrained", str(tiny_clip_checkpoint)]
    assert main(["calibrate", "--safe", str(shared_data("benign")), "--unsafe", str(shared_data("figstep-tiny")), "--out", str(out), *args]) == 0
    detector = load_config(out).detector
    assert detector.rule == "contrast" and 0.0 <= detector.threshold <= 1.0

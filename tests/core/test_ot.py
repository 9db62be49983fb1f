"""The OT stage against POT and against the paper's limits (Eqs. 7–9, Appendix B)."""

import numpy as np
import ot as pot
import pytest
import torch

from guardalign_core.ot import (
    category_means,
    entropy_to_weights,
    ot_patch_scores,
    sinkhorn_log_with_log,
    sinkhorn_pot,
)


def _problem(seed, m, n, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(m, generator=g, dtype=dtype) + 0.1
    b = torch.rand(n, generator=g, dtype=dtype) + 0.1
    cost = torch.rand(m, n, generator=g, dtype=dtype)
    return a / a.sum(), b / b.sum(), cost


@pytest.mark.parametrize("seed,m,n,reg", [(0, 9, 5, 0.1), (1, 16, 4, 0.05), (2, 49, 12, 0.2), (3, 3, 7, 1.0)])
def test_torch_sinkhorn_matches_pot_float64(seed, m, n, reg):
    a, b, cost = _problem(seed, m, n)
    plan, log = sinkhorn_log_with_log(a, b, cost, reg, max_iter=5000, tol=1e-12, check_every=5)
    ref = pot.sinkhorn(a.numpy(), b.numpy(), cost.numpy(), reg, method="sinkhorn_log", numItermax=5000, stopThr=1e-12)
    ref_cost = pot.sinkhorn2(a.numpy(), b.numpy(), cost.numpy(), reg, method="sinkhorn_log", numItermax=5000, stopThr=1e-12)
    assert log.converged
    assert torch.allclose(plan, torch.as_tensor(ref), atol=1e-5, rtol=0)
    assert abs(float((plan * cost).sum()) - float(ref_cost)) < 1e-5
    assert torch.allclose(plan.sum(1), a, atol=1e-9)
    assert torch.allclose(plan.sum(0), b, atol=1e-9)


def test_batched_solve_equals_per_problem_solves():
    problems = [_problem(s, 9, 5) for s in range(6)]
    a = torch.stack([p[0] for p in problems]).reshape(2, 3, 9)
    b = torch.stack([p[1] for p in problems]).reshape(2, 3, 5)
    cost = torch.stack([p[2] for p in problems]).reshape(2, 3, 9, 5)
    batched = sinkhorn_log_with_log(a, b, cost, 0.1, max_iter=3000, tol=1e-12)[0]
    for k, (ak, bk, ck) in enumerate(problems):
        single = sinkhorn_log_with_log(ak, bk, ck, 0.1, max_iter=3000, tol=1e-12)[0]
        assert torch.allclose(batched.reshape(6, 9, 5)[k], single, atol=1e-10)


def test_float32_solver_agrees_with_pot_backend():
    g = torch.Generator().manual_seed(7)
    patches, concepts = torch.randn(4, 9, 32, generator=g), torch.randn(5, 4, 32, generator=g)
    kwargs = dict(logit_scale=100.0, max_iter=2000, tol=1e-5)
    ours = ot_patch_scores(patches, concepts, **kwargs)
    ref = ot_patch_scores(patches.double(), concepts.double(), backend="pot", **kwargs)
    assert ours.scores.dtype == torch.float32
    assert torch.allclose(ours.scores.double(), ref.scores, atol=1e-5)


def test_padded_variants_get_no_mass_and_match_the_unpadded_problem():
    g = torch.Generator().manual_seed(3)
    patches, concepts = torch.randn(2, 9, 16, generator=g), torch.randn(2, 5, 16, generator=g)
    mask = torch.tensor([[True] * 5, [True, True, True, False, False]])
    padded = ot_patch_scores(patches.double(), concepts.double(), mask, max_iter=3000, tol=1e-12, weighting="uniform")
    assert torch.all(padded.b[:, 1, 3:] == 0)
    # Category 1 alone, unpadded: its contribution must be the same.
    alone = ot_patch_scores(patches.double(), concepts[1:, :3].double(), max_iter=3000, tol=1e-12, weighting="uniform")
    assert torch.allclose(padded.contributions[..., 1], alone.contributions[..., 0], atol=1e-10)


def test_scores_decompose_into_category_contributions_and_marginals():
    g = torch.Generator().manual_seed(11)
    result = ot_patch_scores(torch.randn(3, 9, 16, generator=g), torch.randn(4, 5, 16, generator=g), max_iter=500, tol=1e-5)
    assert torch.allclose(result.contributions.sum(-1), result.scores)
    assert torch.allclose(result.expected_costs * result.a.unsqueeze(-1), result.contributions, atol=1e-6)
    assert torch.allclose(result.a.sum(-1), torch.ones(3))
    assert torch.allclose(result.b.sum(-1), torch.ones(3, 4))


def test_appendix_b_uniform_weights_large_eps_is_affine_in_cosine_baseline():
    """With uniform marginals and ε → ∞ the plan is a⊗b, so d_OT(m) = C/M · (1 − mean cosine)."""
    g = torch.Generator().manual_seed(5)
    patches = torch.nn.functional.normalize(torch.randn(1, 16, 32, generator=g, dtype=torch.float64), dim=-1)
    concepts = torch.nn.functional.normalize(torch.randn(6, 4, 32, generator=g, dtype=torch.float64), dim=-1)
    result = ot_patch_scores(patches, concepts, weighting="uniform", reg=1e6, max_iter=50, tol=1e-12)
    cosine = torch.einsum("md,cnd->mcn", patches[0], concepts).mean((1, 2))  # the patch-level cosine baseline
    design = torch.stack([cosine, torch.ones_like(cosine)], 1)
    coef, *_ = np.linalg.lstsq(design.numpy(), result.scores[0].numpy(), rcond=None)
    residual = result.scores[0].numpy() - design.numpy() @ coef
    assert np.abs(residual).max() < 1e-6
    assert coef[0] == pytest.approx(-6 / 16, rel=1e-5)  # slope −C/M: lower score = closer to unsafe


def test_entropy_weights_sign_conventions():
    entropy = torch.tensor([0.1, 1.0, 2.0])
    printed = entropy_to_weights(entropy, 0.5, "printed")
    text = entropy_to_weights(entropy, 0.5, "text")
    assert printed.argmax() == 2 and text.argmax() == 0  # printed: exp(+h/T); text: exp(−h/T)
    assert torch.allclose(entropy_to_weights(entropy, 0.5, "uniform"), torch.full((3,), 1 / 3))


@pytest.mark.parametrize("weighting", ["printed", "uniform"])
def test_planted_patch_has_lowest_score(weighting):
    """Among unrelated patches, a patch equal to a concept variant scores lowest (DESIGN §1A)."""
    g = torch.Generator().manual_seed(0)
    concepts = torch.nn.functional.normalize(torch.randn(12, 5, 64, generator=g), dim=-1)
    patches = torch.nn.functional.normalize(torch.randn(1, 9, 64, generator=g), dim=-1)
    patches[0, 4] = concepts[3, 2]
    result = ot_patch_scores(patches, concepts, logit_scale=100.0, weighting=weighting)
    order = result.scores[0].argsort()
    assert order[0] == 4
    assert result.expected_costs[0, 4].argmin() == 3  # explained by the planted category


def test_nonconvergence_warns_with_hint():
    a, b, cost = _problem(0, 9, 5)
    with pytest.warns(RuntimeWarning, match="max_iter"):
        sinkhorn_log_with_log(a, b, cost * 50, 0.001, max_iter=3, tol=1e-12)


def test_pot_backend_wrapper_restores_padding():
    a, b, cost = _problem(1, 6, 4)
    b_pad = torch.cat([b, torch.zeros(2, dtype=b.dtype)])
    cost_pad = torch.cat([cost, torch.ones(6, 2, dtype=cost.dtype)], 1)
    plan = sinkhorn_pot(a, b_pad, cost_pad, 0.1, max_iter=2000, tol=1e-12)
    assert torch.all(plan[:, 4:] == 0)
    assert torch.allclose(plan[:, :4].sum(0), b, atol=1e-8)


def test_category_means_ignore_padding():
    concepts = torch.nn.functional.normalize(torch.randn(2, 3, 8), dim=-1)
    mask = torch.tensor([[True, True, True], [True, False, False]])
    means = category_means(concepts, mask)
    assert torch.allclose(means[1], concepts[1, 0], atol=1e-6)

"""The detector's decision stage, callable on embeddings: per-patch scores and the unsafe set.

:func:`decide_patches` is exactly what :class:`~guardalign_core.detector.OTDetector` runs
after encoding, so the rule can be studied (and tested, and benchmarked with
``guardalign bench --detection``) without images or weights.

Three rules share one convention, **lower = more unsafe, a patch is unsafe when its
statistic is ≤ the threshold**:

- ``"contrast"`` (the default): the probability that the patch is *safe* under CLIP's own
  zero-shot classifier over the unsafe categories and a bank of benign reference concepts,
  each category's similarity taken from its OT plan (the transport-weighted cost E_i(m)).
  A patch is unsafe when it is at least as likely to show an unsafe category as a benign
  one (threshold 0.5). Relative to each backbone's own cosine scale (through CLIP's logit
  scale and the benign contrast), independent of the number of patches M, and it flags an
  image whose every patch is unsafe.
- ``"scaled"``: Eq. 10 on the scale-free score s(m) = (M/C)·d_OT(m), threshold 0.315
  (the paper's 0.42 at M = 9, C = 12, rescaled).
- ``"paper"``: Eq. 10 exactly as printed, on the raw d_OT(m), threshold 0.42.

Why the raw score needs rescaling: each row of T_i sums to a^m, so
d_OT(m) = a^m·Σ_i E_i(m) exactly, and with a summing to 1 over M patches
d_OT(m) = (C/M)·(M·a^m)·mean_i E_i(m): its scale is set by M and C, not by the content.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .ot import OTScores, ot_patch_scores

DecisionRule = Literal["contrast", "scaled", "paper"]

DEFAULT_THRESHOLDS: dict[str, float] = {"contrast": 0.5, "scaled": 0.315, "paper": 0.42}
"""Each rule's threshold when the config leaves it unset (see the module docstring)."""

STATISTICS: dict[str, str] = {
    "contrast": "probability the patch is safe (zero-shot over unsafe and reference concepts)",
    "scaled": "scale-free OT score (M/C)·d_OT",
    "paper": "raw d_OT (Eq. 9)",
}
"""What each rule compares with its threshold, in words (for verdict reasons and docs)."""


def default_threshold(rule: str) -> float:
    """The threshold a rule uses when none is configured."""
    try:
        return DEFAULT_THRESHOLDS[rule]
    except KeyError:
        raise ValueError(f"rule: unknown {rule!r}; known: {', '.join(DEFAULT_THRESHOLDS)}") from None


@dataclass(frozen=True)
class PatchDecisions:
    """Everything the decision stage computed for a batch (B images, M patches, C categories).

    Attributes:
        rule, threshold: the rule applied and its threshold.
        d_ot: (B, M) raw d_OT(m) = Σ_i Σ_n T_i(m,n)·C_i(m,n) (Eq. 9).
        scores: (B, M) scale-free score (M/C)·d_OT(m); equals mean_i E_i(m) under uniform weights.
        statistic: (B, M) what the rule compares with ``threshold`` (lower = more unsafe).
        safe_probability: (B, M) the contrast rule's P(safe) (computed for every rule when a
            reference bank is given, else ``None``).
        expected_costs: (B, M, C) E_i(m), patch m's transport-weighted cost to category i.
        reference_costs: (B, M, K) the same for the K reference concepts, or ``None``.
        unsafe: (B, M) bool, the unsafe set S of Eq. 10 (all False for non-finite images).
        finite: (B,) bool, False where a feature or a score was NaN/Inf (the check failed).
        ot: the unsafe-bank OT result (marginals a, b and solver diagnostics).
    """

    rule: str
    threshold: float
    d_ot: torch.Tensor
    scores: torch.Tensor
    statistic: torch.Tensor
    safe_probability: torch.Tensor | None
    expected_costs: torch.Tensor
    reference_costs: torch.Tensor | None
    unsafe: torch.Tensor
    finite: torch.Tensor
    ot: OTScores


def safe_probability(expected_costs: torch.Tensor, reference_costs: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """P(safe | patch) under CLIP's zero-shot classifier over unsafe and reference categories.

    With cos_i(m) = 1 − E_i(m) the transport-weighted similarity of patch m to category i,

    .. math::
        P(\\text{safe}\\mid m) = \\frac{\\sum_k e^{s\\,\\cos^{\\text{ref}}_k(m)}}
        {\\sum_i e^{s\\,\\cos_i(m)} + \\sum_k e^{s\\,\\cos^{\\text{ref}}_k(m)}}

    where s is the backbone's logit scale: the softmax CLIP was trained with, so the
    contrast is on each backbone's own cosine scale.

    Args:
        expected_costs: (..., C) E_i(m) for the unsafe categories.
        reference_costs: (..., K) the same for the reference (benign) concepts.
        logit_scale: s (CLIP's learned ``logit_scale.exp()``, 100 for OpenAI CLIP).

    Returns:
        (...) probabilities in [0, 1], float32 (float64 for float64 inputs).
    """
    work = torch.float64 if expected_costs.dtype == torch.float64 else torch.float32
    unsafe = torch.logsumexp(-logit_scale * expected_costs.to(work), dim=-1)
    safe = torch.logsumexp(-logit_scale * reference_costs.to(work), dim=-1)
    return torch.sigmoid(safe - unsafe)


def decide_patches(
    patches: torch.Tensor,
    concepts: torch.Tensor,
    variant_mask: torch.Tensor | None = None,
    *,
    rule: DecisionRule = "contrast",
    threshold: float | None = None,
    reference: torch.Tensor | None = None,
    reference_mask: torch.Tensor | None = None,
    logit_scale: float = 100.0,
    temperature: float = 0.5,
    weighting: Literal["printed", "text", "uniform"] = "printed",
    reg: float = 0.1,
    max_iter: int = 100,
    tol: float = 1e-2,
    check_every: int = 10,
    backend: Literal["torch", "pot"] = "torch",
) -> PatchDecisions:
    """Score patch features against the concept bank and decide which patches are unsafe.

    Args:
        patches: (B, M, D) patch features (normalised here).
        concepts: (C, N, D) unsafe-variant embeddings; variant_mask: (C, N) bool (default all).
        rule: ``"contrast"`` (default), ``"scaled"`` or ``"paper"`` (module docstring).
        threshold: the rule's threshold (default :data:`DEFAULT_THRESHOLDS`); must be finite.
        reference: (K, N', D) benign reference-concept embeddings, required by ``"contrast"``;
            reference_mask: (K, N') bool.
        logit_scale: the backbone's logit scale (Eq. 7's softmax and the contrast).
        temperature, weighting, reg, max_iter, tol, check_every, backend: the OT settings of
            :func:`~guardalign_core.ot.ot_patch_scores` (Eqs. 7–9).

    Returns:
        :class:`PatchDecisions`. An image with a non-finite feature or score has
        ``finite=False`` and no unsafe patch: the caller reports ``status=error`` and its
        policy decides (fail closed by default).

    Raises:
        ValueError: unknown rule, non-finite threshold, or ``"contrast"`` without a reference bank.

    Example:
        >>> x, z, ref = torch.randn(2, 9, 16), torch.randn(3, 4, 16), torch.randn(5, 2, 16)
        >>> out = decide_patches(x, z, reference=ref)
        >>> out.unsafe.shape, out.rule, out.threshold
        (torch.Size([2, 9]), 'contrast', 0.5)
    """
    tau = default_threshold(rule)
    if threshold is not None:
        tau = float(threshold)
    if not math.isfinite(tau):
        raise ValueError(f"threshold: must be a finite number, got {threshold!r}")
    if rule == "contrast" and reference is None:
        raise ValueError("rule 'contrast' needs a reference bank (reference=...): benign concepts to contrast with")
    if patches.dim() != 3:
        raise ValueError(f"patches: expected (B, M, D), got shape {tuple(patches.shape)}")
    # An image with a NaN/Inf feature must not poison the batched solve, nor pass as safe:
    # its features are zeroed here and it is reported as not finite.
    finite = torch.isfinite(patches).flatten(1).all(-1)  # (B,)
    clean = torch.where(finite[:, None, None], patches, torch.zeros_like(patches))
    settings = dict(
        logit_scale=logit_scale, temperature=temperature, weighting=weighting, reg=reg,
        max_iter=max_iter, tol=tol, check_every=check_every, backend=backend,
    )
    ot = ot_patch_scores(clean, concepts, variant_mask, **settings)
    n_patches, n_categories = patches.shape[1], concepts.shape[0]
    d_ot = ot.scores  # (B, M)
    scores = d_ot * (n_patches / n_categories)  # (B, M): scale-free, Eq. 9 rescaled
    reference_costs = p_safe = None
    if reference is not None:
        reference_costs = ot_patch_scores(clean, reference, reference_mask, **settings).expected_costs  # (B, M, K)
        p_safe = safe_probability(ot.expected_costs, reference_costs, logit_scale)  # (B, M)
    statistic = {"contrast": p_safe, "scaled": scores, "paper": d_ot}[rule]
    finite = finite & torch.isfinite(statistic).all(-1) & torch.isfinite(ot.expected_costs).flatten(1).all(-1)
    unsafe = (statistic <= tau) & finite[:, None]  # Eq. 10 on the rule's statistic
    return PatchDecisions(
        rule=rule,
        threshold=tau,
        d_ot=d_ot,
        scores=scores,
        statistic=statistic,
        safe_probability=p_safe,
        expected_costs=ot.expected_costs,
        reference_costs=reference_costs,
        unsafe=unsafe,
        finite=finite,
        ot=ot,
    )

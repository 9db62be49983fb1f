"""Entropic optimal transport between image patches and unsafe-concept variants (Eqs. 7–9).

Pure functions, tensors in and tensors out. One batched log-domain Sinkhorn solves every
(image, category) problem of a call at once; POT's solver is the second backend and the
reference the torch solver is tested against.

Notation (DESIGN §1A): B images, M patches, C categories, N variants per category (ragged
banks are padded and masked), D the joint CLIP dimension.
"""

from __future__ import annotations

import logging
import warnings
from dataclasses import dataclass
from typing import Literal

import torch

logger = logging.getLogger(__name__)

EntropyWeighting = Literal["printed", "text", "uniform"]


def _entropy(logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy of ``softmax(logits)`` along ``dim``, computed in float32 or wider."""
    work = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    log_p = torch.log_softmax(work, dim=dim)
    return -(log_p.exp() * log_p).sum(dim=dim)


def _masked_softmax(values: torch.Tensor, mask: torch.Tensor | None, dim: int = -1) -> torch.Tensor:
    if mask is not None:
        values = values.masked_fill(~mask, float("-inf"))
    return torch.softmax(values, dim=dim)


def entropy_to_weights(
    entropy: torch.Tensor, temperature: float, mode: EntropyWeighting, mask: torch.Tensor | None = None, dim: int = -1
) -> torch.Tensor:
    """Turn entropies into a marginal: ``softmax(±h/T)`` along ``dim`` (Eq. 7).

    ``mode='printed'`` uses exp(+h/T) as Eq. 7 is printed, ``'text'`` exp(−h/T) as the text
    after it reads, ``'uniform'`` ignores ``h``. ``mask`` (same shape) marks valid entries.
    """
    if mode == "uniform":
        return _masked_softmax(torch.zeros_like(entropy), mask, dim)
    sign = 1.0 if mode == "printed" else -1.0
    return _masked_softmax(sign * entropy / temperature, mask, dim)


def category_means(concepts: torch.Tensor, variant_mask: torch.Tensor) -> torch.Tensor:
    """Normalised mean of each category's variants, z̄_i.

    Args:
        concepts: (C, N, D) normalised variant embeddings (padding rows arbitrary).
        variant_mask: (C, N) bool, True for real variants.

    Returns:
        (C, D) unit vectors.
    """
    weights = variant_mask.to(concepts.dtype).unsqueeze(-1)  # (C, N, 1)
    mean = (concepts * weights).sum(1) / weights.sum(1).clamp_min(1)  # (C, D)
    return torch.nn.functional.normalize(mean, dim=-1)


def patch_marginals(
    patches: torch.Tensor, means: torch.Tensor, logit_scale: float, temperature: float, mode: EntropyWeighting
) -> torch.Tensor:
    """Entropy-weighted patch marginal a (Eq. 7).

    p(·|x^m) = softmax_i(logit_scale · cos(x^m, z̄_i)); h(x^m) its entropy;
    a^m = softmax_m(±h(x^m)/T).

    Args:
        patches: (B, M, D) normalised patch features.
        means: (C, D) normalised category means.

    Returns:
        (B, M) marginals, each row summing to 1.
    """
    logits = logit_scale * patches @ means.T  # (B, M, C)
    return entropy_to_weights(_entropy(logits), temperature, mode, dim=-1)


def variant_marginals(
    image_features: torch.Tensor,
    concepts: torch.Tensor,
    variant_mask: torch.Tensor,
    means: torch.Tensor,
    logit_scale: float,
    temperature: float,
    mode: EntropyWeighting,
) -> torch.Tensor:
    """Entropy-weighted variant marginals b_i (the text side of Eq. 7, AWT's recipe).

    For variant n of category i, the image's category distribution is recomputed with z̄_i
    replaced by z_i^n; its entropy h_i^n gives b_i^n = softmax_n(±h_i^n/T) over the real
    variants of category i.

    Args:
        image_features: (B, D) normalised whole-image features (the patches' normalised mean).
        concepts: (C, N, D) normalised variants; variant_mask: (C, N).
        means: (C, D) normalised category means.

    Returns:
        (B, C, N) marginals; padded variants get 0, each (b, i) row sums to 1.
    """
    n_cat = concepts.shape[0]
    base = logit_scale * image_features @ means.T  # (B, C)
    per_variant = logit_scale * torch.einsum("bd,cnd->bcn", image_features, concepts)  # (B, C, N)
    eye = torch.eye(n_cat, dtype=torch.bool, device=concepts.device)  # (C, C)
    # logits[b, i, n, k] = per_variant[b, i, n] if k == i else base[b, k]
    logits = torch.where(eye[None, :, None, :], per_variant[..., None], base[:, None, None, :])  # (B, C, N, C)
    entropy = _entropy(logits)  # (B, C, N)
    return entropy_to_weights(entropy, temperature, mode, mask=variant_mask.expand_as(entropy), dim=-1)


@dataclass(frozen=True)
class SinkhornLog:
    """Diagnostics of a batched Sinkhorn solve."""

    n_iter: int
    error: float  # max over problems of the L1 violation of the row marginal
    converged: bool


def sinkhorn_log_with_log(
    a: torch.Tensor,
    b: torch.Tensor,
    cost: torch.Tensor,
    reg: float,
    max_iter: int = 100,
    tol: float = 1e-2,
    check_every: int = 10,
    warn: bool = True,
) -> tuple[torch.Tensor, SinkhornLog]:
    """Batched entropic OT in the log domain (Sinkhorn–Knopp with ``logsumexp``).

    Solves, for every leading index, min_T ⟨T, cost⟩ − reg·H(T) subject to T·1 = a and
    Tᵀ·1 = b, with updates

    .. math::
        \\log u = \\log a - \\mathrm{LSE}_n(-C/\\varepsilon + \\log v),\\quad
        \\log v = \\log b - \\mathrm{LSE}_m(-C/\\varepsilon + \\log u)

    and T = exp(log u + (−C/ε) + log v). Zero entries of ``b`` (padded variants) stay zero.

    Args:
        a: (..., M) row marginals (positive, summing to 1).
        b: (..., N) column marginals (non-negative, summing to 1).
        cost: (..., M, N) cost matrices.
        reg: ε > 0.
        max_iter: iteration budget. tol: stop when the row-marginal L1 error is below it.
        check_every: how often (in iterations) the error is computed.
        warn: warn (with a hint) when the budget runs out before ``tol``.

    Returns:
        The plans (..., M, N) and a :class:`SinkhornLog`.

    References:
        Cuturi, "Sinkhorn Distances", NeurIPS 2013; Peyré & Cuturi, "Computational OT", §4.4.
    """
    if reg <= 0:
        raise ValueError(f"reg must be > 0, got {reg}")
    log_k = -cost / reg  # (..., M, N)
    log_a = a.log()  # (..., M)
    log_b = b.log()  # (..., N); -inf on padding
    log_v = torch.where(b > 0, torch.zeros_like(b), torch.full_like(b, float("-inf")))
    error, n_iter = float("inf"), 0
    for n_iter in range(1, max_iter + 1):
        log_u = log_a - torch.logsumexp(log_k + log_v.unsqueeze(-2), dim=-1)
        log_v = log_b - torch.logsumexp(log_k + log_u.unsqueeze(-1), dim=-2)
        if n_iter % check_every == 0 or n_iter == max_iter:
            rows = torch.exp(log_u + torch.logsumexp(log_k + log_v.unsqueeze(-2), dim=-1))  # (..., M)
            error = float((rows - a).abs().sum(-1).max())
            if error < tol:
                break
    converged = error < tol
    if not converged and warn:
        warnings.warn(
            f"Sinkhorn did not reach tol={tol} in {max_iter} iterations (error {error:.2e}); "
            "raise SinkhornConfig.max_iter or reg, or loosen tol",
            RuntimeWarning,
            stacklevel=2,
        )
    plan = torch.exp(log_u.unsqueeze(-1) + log_k + log_v.unsqueeze(-2))
    return plan, SinkhornLog(n_iter=n_iter, error=error, converged=converged)


def sinkhorn_log(a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, reg: float, **kwargs) -> torch.Tensor:
    """The plans of :func:`sinkhorn_log_with_log`, without diagnostics."""
    return sinkhorn_log_with_log(a, b, cost, reg, **kwargs)[0]


def sinkhorn_pot(
    a: torch.Tensor, b: torch.Tensor, cost: torch.Tensor, reg: float, max_iter: int = 100, tol: float = 1e-2
) -> torch.Tensor:
    """POT's log-domain solver (``ot.sinkhorn(..., method='sinkhorn_log')``) on each problem in turn.

    The reference backend: numpy on CPU, one problem at a time. Padded (zero) entries of
    ``b`` are dropped before solving and restored as zero columns.
    """
    import ot

    lead = cost.shape[:-2]
    a2, b2, c2 = a.reshape(-1, a.shape[-1]), b.reshape(-1, b.shape[-1]), cost.reshape(-1, *cost.shape[-2:])
    out = torch.zeros_like(c2)
    for k in range(c2.shape[0]):
        keep = b2[k] > 0
        plan = ot.sinkhorn(
            a2[k].detach().cpu().double().numpy(),
            b2[k][keep].detach().cpu().double().numpy(),
            c2[k][:, keep].detach().cpu().double().numpy(),
            reg,
            method="sinkhorn_log",
            numItermax=max_iter,
            stopThr=tol,
            warn=False,
        )
        out[k][:, keep] = torch.as_tensor(plan, dtype=out.dtype, device=out.device)
    return out.reshape(*lead, *cost.shape[-2:])


@dataclass(frozen=True)
class OTScores:
    """Per-patch OT scores of a batch.

    Attributes:
        scores: (B, M) d_OT(m) = Σ_i Σ_n T_i(m,n)·C_i(m,n) (Eq. 9); lower = more unsafe.
        contributions: (B, M, C) Σ_n T_i(m,n)·C_i(m,n); sums over C to ``scores``.
        expected_costs: (B, M, C) E_i(m) = contributions / a^m, patch m's mean cost to category i.
        a: (B, M) patch marginals. b: (B, C, N) variant marginals.
        log: solver diagnostics (None for the POT backend).
    """

    scores: torch.Tensor
    contributions: torch.Tensor
    expected_costs: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    log: SinkhornLog | None


def ot_patch_scores(
    patches: torch.Tensor,
    concepts: torch.Tensor,
    variant_mask: torch.Tensor | None = None,
    *,
    logit_scale: float = 100.0,
    temperature: float = 0.5,
    weighting: EntropyWeighting = "printed",
    reg: float = 0.1,
    max_iter: int = 100,
    tol: float = 1e-2,
    check_every: int = 10,
    backend: Literal["torch", "pot"] = "torch",
) -> OTScores:
    """Score every patch of every image against every unsafe category (Eqs. 7–9).

    Cost C_i(m,n) = 1 − cos(x^m, z_i^n); marginals from :func:`patch_marginals` and
    :func:`variant_marginals`; one entropic plan T_i per (image, category), all solved in one
    batched call; d_OT(m) = Σ_i Σ_n T_i(m,n)·C_i(m,n).

    Args:
        patches: (B, M, D) patch features (normalised here).
        concepts: (C, N, D) variant embeddings (normalised here).
        variant_mask: (C, N) bool, True for real variants (default: all).

    Returns:
        :class:`OTScores` in float32 (float64 if the inputs are float64), on the input device.

    Example:
        >>> x, z = torch.randn(2, 9, 16), torch.randn(3, 4, 16)
        >>> ot_patch_scores(x, z).scores.shape
        torch.Size([2, 9])
    """
    work = torch.float64 if patches.dtype == torch.float64 else torch.float32
    x = torch.nn.functional.normalize(patches.to(work), dim=-1)  # (B, M, D)
    z = torch.nn.functional.normalize(concepts.to(work), dim=-1)  # (C, N, D)
    if variant_mask is None:
        variant_mask = torch.ones(z.shape[:2], dtype=torch.bool, device=z.device)
    means = category_means(z, variant_mask)  # (C, D)
    a = patch_marginals(x, means, logit_scale, temperature, weighting)  # (B, M)
    image = torch.nn.functional.normalize(x.mean(1), dim=-1)  # (B, D)
    b = variant_marginals(image, z, variant_mask, means, logit_scale, temperature, weighting)  # (B, C, N)
    cost = 1.0 - torch.einsum("bmd,cnd->bcmn", x, z)  # (B, C, M, N)
    a_bc = a[:, None, :].expand(-1, z.shape[0], -1)  # (B, C, M)
    log = None
    if backend == "torch":
        plan, log = sinkhorn_log_with_log(a_bc, b, cost, reg, max_iter=max_iter, tol=tol, check_every=check_every)
    elif backend == "pot":
        plan = sinkhorn_pot(a_bc, b, cost, reg, max_iter=max_iter, tol=tol)
    else:
        raise ValueError(f"backend must be 'torch' or 'pot', got {backend!r}")
    contributions = (plan * cost).sum(-1).transpose(1, 2)  # (B, M, C)
    scores = contributions.sum(-1)  # (B, M)
    expected = contributions / a.unsqueeze(-1)  # (B, M, C)
    return OTScores(scores=scores, contributions=contributions, expected_costs=expected, a=a, b=b, log=log)

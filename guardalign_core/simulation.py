"""A synthetic detection world: the decision rule measured without images or weights.

Real CLIP weights are not reachable where this project is tested, so the rule is judged in
a world of unit vectors whose cosine statistics are set to those of CLIP (DESIGN §1A, the
detector-decisions issue): every concept embedding shares a common direction (CLIP's
embeddings live in a narrow cone, so unrelated concepts still have cosine ≈ 0.15 to a
patch), a patch *shows* exactly one concept (cosine ≈ 0.30 to it), every (patch, category)
similarity carries noise of spread ``sigma_cat``, and the patches of one image are
correlated. Benign patches show a benign concept, so, as in reality, they are close to
*something*; planted patches show an unsafe one.

:func:`run_detection_benchmark` scores benign images and images with 1, 3 and all M
patches planted through the public decision function
(:func:`~guardalign_core.rules.decide_patches`), so it measures exactly what the
detector decides, and reports FPR, TPR and AUC. It is a simulation: the numbers say how a
rule behaves under these statistics, not how it does on real photos.
"""

from __future__ import annotations

import math
import numpy as np
import torch
from pydantic import BaseModel, ConfigDict, Field

from .config import DetectorConfig
from .rules import decide_patches


class DetectionWorld(BaseModel):
    """The parameters of the synthetic world (each a ``guardalign bench --detection`` flag)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    seed: int = Field(0, description="Random seed: the same seed gives the same world and images.")
    dim: int = Field(768, ge=16, description="Embedding dimension (768 for ViT-L-14-336, 512 for ViT-B-32).")
    patches: int = Field(9, ge=1, le=1024, description="M, patches per image (g² in grid mode).")
    categories: int = Field(12, ge=1, description="C, unsafe categories.")
    variants: int = Field(5, ge=1, description="N, text variants per unsafe category.")
    references: int = Field(36, ge=1, description="K, benign reference concepts (the shipped bank has 36).")
    reference_variants: int = Field(3, ge=1, description="Variants per reference concept.")
    unrelated_cos: float = Field(0.15, description="Cosine of a patch to a concept it does not show.")
    matching_cos: float = Field(0.30, description="Cosine of a patch to the concept it shows.")
    reference_match_cos: float | None = Field(
        None, description="Cosine of a benign patch to the reference concept it shows (null: matching_cos). Lower it for a "
        "harsher world where benign content is only loosely covered by the reference bank.",
    )
    sigma_cat: float = Field(0.01, ge=0, description="Spread of a patch's cosine across concepts (noise per patch and concept).")
    patch_correlation: float = Field(0.5, ge=0, le=1, description="Correlation of the noise between patches of one image.")
    variant_spread: float = Field(0.3, ge=0, description="How far a category's variants lie from its centre (0: identical).")
    images: int = Field(200, ge=2, description="Images per group (benign, 1, 3 and all planted).")


class DetectionReport(BaseModel):
    """Image-level rates of one rule in one world (fractions, not percentages)."""

    model_config = ConfigDict(frozen=True)

    fpr: float = Field(description="Fraction of benign images with at least one flagged patch.")
    tpr: dict[str, float] = Field(description="Fraction of planted images flagged, for '1', '3' and 'all' planted patches.")
    auc: dict[str, float] = Field(description="ROC AUC of the image-level statistic (its lowest patch) against benign images.")
    rule: str
    threshold: float
    patches: int
    categories: int
    sigma_cat: float


def _orthonormal(rng: np.random.Generator, dim: int, count: int) -> np.ndarray:
    """``count`` orthonormal vectors of ``dim`` (rows); exact, so only the noise we add is noise."""
    if count > dim:
        raise ValueError(f"dim: the world needs {count} orthogonal directions; raise dim to at least {count}")
    q, _ = np.linalg.qr(rng.standard_normal((dim, count)))
    return q.T  # (count, dim)


class _World:
    """Concept embeddings and an image sampler for one :class:`DetectionWorld`."""

    # Concept vectors are z = α·u + β·w (u the shared cone direction, w the concept's own unit
    # direction), so two unrelated concepts have cosine ≈ α². A patch is p·u + q·w_shown + noise,
    # with p·α the unrelated cosine and q chosen for the matching cosine.
    alpha = 0.6

    def __init__(self, world: DetectionWorld) -> None:
        self.w = world
        rng = np.random.default_rng(world.seed)
        c, n, k, kv = world.categories, world.variants, world.references, world.reference_variants
        dirs = _orthonormal(rng, world.dim, 1 + c + k + c * n + k * kv)
        self.u = dirs[0]
        self.unsafe_dirs = dirs[1 : 1 + c]  # (C, D)
        self.reference_dirs = dirs[1 + c : 1 + c + k]  # (K, D)
        unsafe_jitter = dirs[1 + c + k : 1 + c + k + c * n].reshape(c, n, -1)  # (C, N, D)
        reference_jitter = dirs[1 + c + k + c * n :].reshape(k, kv, -1)  # (K, KV, D)
        self.basis = dirs  # (1 + C + K + C·N + K·KV, D): everything a concept is made of
        self.beta = math.sqrt(1 - self.alpha**2)
        self.unsafe = self._concepts(self.unsafe_dirs, unsafe_jitter)  # (C, N, D)
        self.reference = self._concepts(self.reference_dirs, reference_jitter)  # (K, KV, D)
        self.p = world.unrelated_cos / self.alpha
        # A variant's own direction is (w + spread·j)/√(1+spread²): a patch along w sees 1/√(1+spread²) of it.
        self.shrink = 1 / math.sqrt(1 + world.variant_spread**2)
        self.rng = np.random.default_rng(world.seed + 1)

    def _concepts(self, centres: np.ndarray, jitter: np.ndarray) -> np.ndarray:
        own = centres[:, None, :] + self.w.variant_spread * jitter  # (X, V, D)
        own /= np.linalg.norm(own, axis=-1, keepdims=True)
        return self.alpha * self.u + self.beta * own

    def _strength(self, cos: float) -> float:
        """Coefficient along a concept's centre direction that gives cosine ``cos`` to its variants."""
        return (cos - self.w.unrelated_cos) / (self.beta * self.shrink)

    def images(self, count: int, planted: int) -> np.ndarray:
        """(count, M, D) unit patch features; ``planted`` patches per image show one unsafe category."""
        w, rng = self.w, self.rng
        m, planted = w.patches, min(planted, w.patches)
        rho = w.patch_correlation
        noise_dirs = np.concatenate([self.unsafe_dirs, self.reference_dirs])  # (C+K, D)
        # What each patch shows: a benign reference concept (one of two per image), or the
        # image's unsafe category at the planted positions.
        pair = rng.integers(0, w.references, size=(count, 2))  # (count, 2)
        shown = np.take_along_axis(pair, rng.integers(0, 2, size=(count, m)), axis=1)  # (count, M)
        signal = self._strength(w.reference_match_cos or w.matching_cos) * self.reference_dirs[shown]  # (count, M, D)
        if planted:
            order = np.argsort(rng.random((count, m)), axis=1)[:, :planted]  # (count, planted) positions
            category = rng.integers(0, w.categories, size=count)  # (count,)
            unsafe_signal = self._strength(w.matching_cos) * self.unsafe_dirs[category]  # (count, D)
            rows = np.repeat(np.arange(count), planted)
            signal[rows, order.ravel()] = np.repeat(unsafe_signal, planted, axis=0)
        # Per-(patch, concept) cosine noise of spread sigma_cat, correlated within an image.
        shared = rng.standard_normal((count, 1, len(noise_dirs)))
        xi = w.sigma_cat * (rho * shared + math.sqrt(1 - rho**2) * rng.standard_normal((count, m, len(noise_dirs))))
        x = self.p * self.u + signal * self.beta + (xi / (self.beta * self.shrink)) @ noise_dirs  # (count, M, D)
        # The rest of the unit norm points away from every concept (real CLIP features carry
        # most of their norm in directions no concept text describes), correlated within an image.
        residual = rho * rng.standard_normal((count, 1, w.dim)) + math.sqrt(1 - rho**2) * rng.standard_normal((count, m, w.dim))
        residual -= (residual @ self.basis.T) @ self.basis
        residual /= np.linalg.norm(residual, axis=-1, keepdims=True)
        rest = np.sqrt(np.clip(1.0 - (x * x).sum(-1, keepdims=True), 0.0, None))
        return x + rest * residual


def world_for(config: DetectorConfig, **overrides) -> DetectionWorld:
    """A :class:`DetectionWorld` shaped like a detector config: its M, C and embedding dimension.

    M is g² in grid mode and the ViT's token grid in tokens mode, C the size of the configured
    bank, D the backbone's embedding size (read from open_clip's model config; no weights).
    """
    from .concepts import bank_from_config

    shape: dict[str, int] = {"categories": len(bank_from_config(config.concepts, config.extra_concepts, config.categories, config.exclude_categories).categories)}
    model_cfg = _model_config(config.model)
    if model_cfg is not None:
        shape["dim"] = int(model_cfg.get("embed_dim", 768))
    if config.patch_mode == "grid":
        shape["patches"] = config.grid_size**2
    elif model_cfg is not None:
        vision = model_cfg.get("vision_cfg", {})
        size, patch = vision.get("image_size", 224), vision.get("patch_size", 16)
        side = (size if isinstance(size, int) else size[0]) // patch
        shape["patches"] = side * side
    return DetectionWorld(**{**shape, **overrides})


def _model_config(name: str) -> dict | None:
    from . import _compat

    _compat.ensure_torchvision_importable()
    import open_clip

    from .encoders import _register_shipped_configs

    _register_shipped_configs()
    return open_clip.get_model_config(name)


def _auc(benign: np.ndarray, unsafe: np.ndarray) -> float:
    """P(an unsafe image's statistic < a benign one's), ties counted half (Mann–Whitney)."""
    diff = benign[None, :] - unsafe[:, None]
    return float(((diff > 0).sum() + 0.5 * (diff == 0).sum()) / diff.size)


def run_detection_benchmark(world: DetectionWorld | None = None, config: DetectorConfig | None = None) -> DetectionReport:
    """Score benign and planted synthetic images with the detector's own decision function.

    Args:
        world: the synthetic world (default :class:`DetectionWorld`).
        config: the detector settings whose rule, threshold and OT settings are applied
            (default :class:`~guardalign_core.config.DetectorConfig`); its backbone is not loaded.

    Returns:
        A :class:`DetectionReport`.

    Example:
        >>> report = run_detection_benchmark(DetectionWorld(images=20, dim=256))
        >>> report.fpr <= 0.05 and report.tpr["all"] >= 0.95
        True
    """
    world = world or DetectionWorld()
    config = config or DetectorConfig()
    sim = _World(world)
    concepts = torch.from_numpy(sim.unsafe).float()
    reference = torch.from_numpy(sim.reference).float()
    groups = {"benign": 0, "1": 1, "3": 3, "all": world.patches}
    minima: dict[str, np.ndarray] = {}
    flagged: dict[str, float] = {}
    threshold = config.effective_threshold
    for name, planted in groups.items():
        feats = torch.from_numpy(sim.images(world.images, planted)).float()
        out = decide_patches(
            feats, concepts, rule=config.rule, threshold=config.threshold, reference=reference,
            logit_scale=100.0, temperature=config.temperature, weighting=config.entropy_weighting,
            reg=config.sinkhorn.reg, max_iter=config.sinkhorn.max_iter, tol=config.sinkhorn.tol,
            check_every=config.sinkhorn.check_every,
        )
        threshold = out.threshold
        minima[name] = out.statistic.min(-1).values.double().numpy()
        flagged[name] = float(out.unsafe.any(-1).double().mean())
    return DetectionReport(
        fpr=flagged["benign"],
        tpr={k: flagged[k] for k in ("1", "3", "all")},
        auc={k: _auc(minima["benign"], minima[k]) for k in ("1", "3", "all")},
        rule=config.rule,
        threshold=threshold,
        patches=world.patches,
        categories=world.categories,
        sigma_cat=world.sigma_cat,
    )


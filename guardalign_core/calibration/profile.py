"""Diagnostic: how much attention the tokens after the safety prefix pay to it, per layer.

What: :func:`prefix_attention_profile` runs one forward pass without and one with
calibration on the eager backend and reports, for every language-decoder layer, the mean
attention mass that the calibrated queries (the last prefix token, which produces the first
token after the prefix, and every later one) put on the prefix keys (sum over prefix keys,
mean over heads, queries and rows).

Why: the failure GuardAlign fixes is the decay of this mass with depth (the model refuses,
then continues with "However, ..."); the calibration (Eqs. 12-14) is meant to lift it in the
middle layers. The paper gives no value for ``gamma`` and ours is untuned, so this profile
is how a user tunes it on their model: raise ``gamma`` until the calibrated layers hold the
prefix without the mass saturating at 1.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch

from guardalign_core.calibration._context import calibrated
from guardalign_core.calibration._install import using_backend
from guardalign_core.calibration._state import AttentionCall, prefix_tensors
from guardalign_core.calibration.config import CalibrationConfig
from guardalign_core.calibration.spans import PrefixSpans

if TYPE_CHECKING:
    from transformers import PreTrainedModel

__all__ = ["LayerPrefixAttention", "PrefixAttentionProfile", "prefix_attention_profile"]


@dataclass(frozen=True)
class LayerPrefixAttention:
    """Prefix attention mass of one decoder layer.

    Attributes:
        layer: decoder layer index.
        baseline: mean mass on the prefix without calibration, in [0, 1].
        calibrated: the same with calibration.
        gamma: strength applied in this layer (0: not calibrated).
    """

    layer: int
    baseline: float
    calibrated: float
    gamma: float

    @property
    def delta(self) -> float:
        """``calibrated - baseline``."""
        return self.calibrated - self.baseline


@dataclass(frozen=True)
class PrefixAttentionProfile:
    """Result of :func:`prefix_attention_profile`: one :class:`LayerPrefixAttention` per layer.

    Attributes:
        layers: per-layer results, in layer order.
        num_queries: calibrated query positions (over all rows) that were averaged.
        num_prefix_tokens: prefix tokens per row.
    """

    layers: tuple[LayerPrefixAttention, ...]
    num_queries: int
    num_prefix_tokens: tuple[int, ...]

    def to_dict(self) -> dict[str, Any]:
        """Plain ``dict`` (JSON-serialisable)."""
        return {
            "num_queries": self.num_queries,
            "num_prefix_tokens": list(self.num_prefix_tokens),
            "layers": [
                {"layer": r.layer, "baseline": r.baseline, "calibrated": r.calibrated, "gamma": r.gamma}
                for r in self.layers
            ],
        }

    def to_table(self) -> str:
        """A fixed-width text table: layer, gamma, mass without/with calibration, change."""
        lines = [f"{'layer':>5}  {'gamma':>8}  {'baseline':>8}  {'calibrated':>10}  {'delta':>8}"]
        for r in self.layers:
            gamma = f"{r.gamma:8.4g}" if r.gamma else f"{'-':>8}"
            lines.append(f"{r.layer:>5}  {gamma}  {r.baseline:8.4f}  {r.calibrated:10.4f}  {r.delta:+8.4f}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.to_table()


class _MassRecorder:
    """Observer that sums, per layer, the attention on prefix keys of the calibrated queries."""

    def __init__(self) -> None:
        self.total: dict[int, float] = {}
        self.count: dict[int, int] = {}  # (query, head) cells averaged
        self.queries: dict[int, int] = {}  # query positions, over all rows
        self.gamma: dict[int, float] = {}

    def __call__(self, call: AttentionCall) -> None:
        if call.weights is None:
            raise RuntimeError("prefix_attention_profile needs attention weights (eager backend)")
        weights = call.weights.float()  # (b, heads, q, kv)
        batch, heads, q_len, _ = weights.shape
        cols = call.prefix_index[:, None, None, :].expand(batch, heads, q_len, -1)
        mass = (weights.gather(-1, cols) * call.prefix_valid[:, None, None, :]).sum(-1)  # (b, heads, q)
        after = call.calibrated_queries[:, None, :].expand_as(mass)
        self.total[call.layer_idx] = self.total.get(call.layer_idx, 0.0) + float(mass[after].sum())
        self.count[call.layer_idx] = self.count.get(call.layer_idx, 0) + int(after.sum())
        self.queries[call.layer_idx] = self.queries.get(call.layer_idx, 0) + int(call.calibrated_queries.sum())
        self.gamma[call.layer_idx] = call.gamma

    def means(self) -> dict[int, float]:
        return {i: self.total[i] / self.count[i] for i in sorted(self.total) if self.count[i]}


@torch.no_grad()
def prefix_attention_profile(
    model: PreTrainedModel,
    inputs: Mapping[str, Any],
    prefix: PrefixSpans,
    config: CalibrationConfig | None = None,
) -> PrefixAttentionProfile:
    """Per-layer attention mass on the safety prefix, without and with calibration.

    Runs ``model(**inputs)`` twice on the eager backend (attention weights are needed). If the
    model has no calibration installed, one is installed for the duration and removed; if it
    has one on SDPA, it is switched to eager and back. Either way the model is changed while
    this runs, so do not run it concurrently with generation on the same model.

    Args:
        model: a supported vision-language model (see :func:`apply_calibration`).
        inputs: processor outputs for one forward pass (``input_ids``, ``attention_mask``,
            ``pixel_values``, ...). The measured queries are the last prefix token and every
            later one, so append an answer after the prefix to measure more than the first step.
        prefix: prefix positions in ``inputs["input_ids"]`` (bool mask or spans per row).
        config: the calibration to measure. Default: :class:`CalibrationConfig`.

    Returns:
        A :class:`PrefixAttentionProfile`; ``print(profile.to_table())`` shows it.

    Raises:
        ValueError: no query is calibrated (no row of ``inputs`` holds the prefix).
        UnsupportedModelError: as :func:`apply_calibration`.

    Example:
        >>> profile = prefix_attention_profile(model, inputs, spans, CalibrationConfig(gamma=0.02))  # doctest: +SKIP
        >>> print(profile.to_table())  # doctest: +SKIP
    """
    with using_backend(model, "eager"):
        config = (config or CalibrationConfig()).model_copy(update={"backend": "eager"})
        off = config.model_copy(update={"enabled": False})
        baseline, calibrated_mass = _MassRecorder(), _MassRecorder()
        with calibrated(model, prefix, off, observer=baseline):
            model(**inputs)
        with calibrated(model, prefix, config, observer=calibrated_mass):
            model(**inputs)
    base, cal = baseline.means(), calibrated_mass.means()
    if not base:
        raise ValueError("no query position is calibrated: no row of inputs holds the safety prefix")
    first = min(baseline.count)
    tensors = prefix_tensors(prefix)
    per_row = tuple(int(n) for n in tensors.valid.sum(dim=1)) if tensors is not None else ()
    layers = tuple(
        LayerPrefixAttention(layer=i, baseline=base[i], calibrated=cal[i], gamma=calibrated_mass.gamma[i])
        for i in sorted(base)
    )
    return PrefixAttentionProfile(layers=layers, num_queries=baseline.queries[first], num_prefix_tokens=per_row)

"""Settings of the cross-modal attention calibration (GuardAlign, paper Eqs. 12-14).

What: one pydantic model, :class:`CalibrationConfig`, holding the strength ``gamma``, the
decoder layers it applies to, optional per-layer strengths, the attention backend and an
on/off switch. Why: the same object configures installation (:func:`apply_calibration`), each
call (:func:`calibrated`) and the diagnostic (:func:`prefix_attention_profile`), and it must
round-trip through ``model_dump()``/``model_validate()`` and JSON/YAML files.

The safety-prefix text, its placement and the guard policy are not here: they belong to the
runner and the guard, which decide *which* tokens are the prefix. This config only says how
strongly queries after those tokens are pulled towards them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

__all__ = ["CalibrationConfig", "DEFAULT_GAMMA", "DEFAULT_LAYER_FRACTIONS", "calibration_with"]

DEFAULT_GAMMA = 0.01
"""Default strength. Not tuned on a real model (no weights were reachable); see the class docs."""

DEFAULT_LAYER_FRACTIONS: tuple[float, float] = (0.25, 0.75)
"""The paper's middle layers, ``[L/4, 3L/4)`` of an ``L``-layer language decoder."""

LayerSpec = list[int] | tuple[float, float] | None


class CalibrationConfig(BaseModel):
    r"""How the safety-prefix attention calibration is applied.

    In every head of the selected decoder layers the pre-softmax scores become (Eq. 13)

    .. math::

        \hat Z = Z + \gamma \, M \circ Z, \qquad Z = QK^\top / \sqrt{d_k},
        \qquad M_{ij} = \max(0, \langle Q_i, K_j \rangle)

    for queries ``i`` after the safety prefix and keys ``j`` inside it (``M = 0`` elsewhere).
    For a positive score the added bias is therefore
    :math:`\gamma \max(0, \langle Q_i, K_j\rangle) Z_{ij} = \gamma \sqrt{d_k} Z_{ij}^2`.

    **Choosing gamma.** With ``d_k = 128`` (LLaVA-1.5-7B, Qwen2-VL) and the default
    ``gamma = 0.01``, a prefix key with score 3 gains about ``0.01 * 11.3 * 9 = 1.0`` nat (its
    attention weight grows by about ``e`` before renormalisation) and one with score 8 gains
    about 7; keys with negative scores are untouched. The paper gives no value for ``gamma``
    and **this default was not tuned on a real model** (no weights were reachable when it was
    chosen). Tune it with :func:`~guardalign_core.calibration.prefix_attention_profile`, which
    reports the attention mass on the prefix per layer with and without calibration; the bias
    grows with ``sqrt(d_k)``, so a model with ``d_k = 64`` needs about ``1.4x`` the gamma for
    the same effect.

    Example:
        >>> CalibrationConfig().resolve_layers(32)
        [8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23]
        >>> CalibrationConfig(layers=[1, 2], gamma=0.05).layer_gammas(4)
        {1: 0.05, 2: 0.05}
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(
        default=True,
        description="Apply the calibration at all. False turns every calibrated call into a plain one.",
    )
    gamma: float = Field(
        default=DEFAULT_GAMMA,
        description=(
            "Strength gamma of Eq. 13 (>= 0; 0 is a no-op). Bias on a positive score Z is "
            "gamma*sqrt(d_k)*Z^2. Default 0.01 is derived from that arithmetic, not tuned on a real model."
        ),
    )
    layers: LayerSpec = Field(
        default=None,
        description=(
            "Language-decoder layers to calibrate: None for the paper's middle half [L/4, 3L/4), "
            "a list of layer indices (ints, 0-based), or a (start_fraction, end_fraction) pair of "
            "floats in [0, 1] giving layers [floor(start*L), floor(end*L))."
        ),
    )
    layer_gamma: dict[int, float] = Field(
        default_factory=dict,
        description=(
            "Per-layer strength overrides {layer_index: gamma}. A listed layer is calibrated with "
            "that gamma even if it is outside `layers`; 0 switches a layer off."
        ),
    )
    backend: Literal["sdpa", "eager"] = Field(
        default="sdpa",
        description=(
            "Stock attention the calibrated function delegates to: 'sdpa' (fast; the bias is an "
            "additive float mask) or 'eager' (returns attention weights, for diagnostics)."
        ),
    )

    @field_validator("gamma")
    @classmethod
    def _check_gamma(cls, value: float) -> float:
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"gamma must be a finite number >= 0, got {value!r}")
        return value

    @field_validator("layers", mode="before")
    @classmethod
    def _check_layers(cls, value: Any) -> Any:
        # Two floats are a fraction range, ints are indices; decided here because a JSON/YAML
        # round trip turns tuples into lists.
        if value is None:
            return None
        if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
            raise ValueError(
                f"layers must be None, a list of layer indices or a (start, end) fraction pair, got {value!r}"
            )
        items = list(value)
        if any(isinstance(v, bool) for v in items):
            raise ValueError(f"layers must hold ints or floats, not booleans, got {value!r}")
        if any(isinstance(v, float) for v in items):
            if len(items) != 2 or not all(isinstance(v, (int, float)) for v in items):
                raise ValueError(f"layers as fractions must be a (start, end) pair of floats, got {value!r}")
            start, end = float(items[0]), float(items[1])
            if not 0.0 <= start < end <= 1.0:
                raise ValueError(f"layers fractions must satisfy 0 <= start < end <= 1, got ({start}, {end})")
            return (start, end)
        if not items:
            raise ValueError("layers must not be an empty list (use enabled=False to switch calibration off)")
        if not all(isinstance(v, int) for v in items):
            raise ValueError(f"layers as indices must be ints, got {value!r}")
        if any(v < 0 for v in items):
            raise ValueError(f"layers indices must be >= 0, got {value!r}")
        if len(set(items)) != len(items):
            raise ValueError(f"layers indices must be unique, got {value!r}")
        return sorted(items)

    @field_validator("layer_gamma")
    @classmethod
    def _check_layer_gamma(cls, value: dict[int, float]) -> dict[int, float]:
        for layer, gamma in value.items():
            if layer < 0:
                raise ValueError(f"layer_gamma keys must be layer indices >= 0, got {layer}")
            if not math.isfinite(gamma) or gamma < 0:
                raise ValueError(f"layer_gamma[{layer}] must be a finite number >= 0, got {gamma!r}")
        return value

    def resolve_layers(self, num_layers: int) -> list[int]:
        """The decoder layer indices selected by ``layers`` for an ``num_layers``-layer decoder.

        Args:
            num_layers: number of language-decoder layers ``L`` (> 0).

        Returns:
            Sorted layer indices (``layer_gamma`` overrides not included).

        Raises:
            ValueError: if an index is ``>= num_layers`` or a fraction range selects no layer.
        """
        if num_layers <= 0:
            raise ValueError(f"num_layers must be > 0, got {num_layers}")
        spec = DEFAULT_LAYER_FRACTIONS if self.layers is None else self.layers
        if isinstance(spec, tuple):
            start, end = math.floor(spec[0] * num_layers), math.floor(spec[1] * num_layers)
            if start >= end:
                raise ValueError(
                    f"layers fractions {spec} select no layer of a {num_layers}-layer decoder; widen the range"
                )
            return list(range(start, end))
        too_deep = [i for i in spec if i >= num_layers]
        if too_deep:
            raise ValueError(f"layers {too_deep} out of range for a {num_layers}-layer decoder")
        return list(spec)

    def layer_gammas(self, num_layers: int) -> dict[int, float]:
        """``{layer_index: gamma}`` for every layer calibrated with a positive strength.

        Empty when ``enabled`` is false or every strength is 0.

        Raises:
            ValueError: if ``layers`` or ``layer_gamma`` name a layer ``>= num_layers``.
        """
        gammas = {i: self.gamma for i in self.resolve_layers(num_layers)}
        too_deep = [i for i in self.layer_gamma if i >= num_layers]
        if too_deep:
            raise ValueError(f"layer_gamma keys {too_deep} out of range for a {num_layers}-layer decoder")
        gammas.update(self.layer_gamma)
        if not self.enabled:
            return {}
        return {i: g for i, g in sorted(gammas.items()) if g > 0}


def calibration_with(
    config: CalibrationConfig | dict[str, Any] | None = None,
    *,
    gamma: float | None = None,
    layers: Any = None,
) -> CalibrationConfig:
    """The :class:`CalibrationConfig` an adapter's ``gamma=``/``layers=`` shortcuts stand for.

    Shared by ``ChatGuardAlign(gamma=..., layers=...)`` and ``GuardAlignLLM.from_hf(..., gamma=...)``,
    like the guard's ``action=``/``fail_open=``. A shortcut left ``None`` takes ``config``'s value.

    Args:
        config: a config (or its ``dict``); default :class:`CalibrationConfig`.
        gamma: strength shortcut.
        layers: layer shortcut (indices, or a ``(start, end)`` fraction pair).

    Returns:
        The config with the shortcuts applied (validated).

    Raises:
        ValueError: a shortcut disagrees with a value given in ``config``, or is invalid.

    Example:
        >>> calibration_with(gamma=0.02, layers=[1, 2])
        CalibrationConfig(enabled=True, gamma=0.02, layers=[1, 2], layer_gamma={}, backend='sdpa')
    """
    explicit = config is not None
    base = config if isinstance(config, CalibrationConfig) else CalibrationConfig.model_validate(config or {})
    shortcuts = {name: value for name, value in (("gamma", gamma), ("layers", layers)) if value is not None}
    if not shortcuts:
        return base
    wanted = CalibrationConfig(**{**base.model_dump(exclude={"gamma", "layers"}), **shortcuts})
    if explicit:
        given = base.model_fields_set if isinstance(config, CalibrationConfig) else set(config or {})
        for name in shortcuts:
            if name in given and getattr(base, name) != getattr(wanted, name):
                raise ValueError(
                    f"{name}={shortcuts[name]!r} disagrees with calibration.{name}={getattr(base, name)!r}; "
                    f"give {name} once (the shortcut or the config)"
                )
    return base.model_copy(update={name: getattr(wanted, name) for name in shortcuts})

"""Safety-prefix cross-modal attention calibration for transformers LVLMs (GuardAlign Eqs. 12-14).

Install the backend once with :func:`apply_calibration`; calibrate individual calls with
:func:`calibrated` (thread- and task-local), which takes the call's strength and layers (a
:class:`CalibrationConfig`: the only holder of them); undo with :func:`remove_calibration`;
tune the strength with :func:`prefix_attention_profile`.

Example:
    >>> from guardalign_core.calibration import CalibrationConfig, apply_calibration, calibrated
    >>> from guardalign_core.calibration import find_prefix_spans
    >>> handle = apply_calibration(model)  # doctest: +SKIP
    >>> spans = find_prefix_spans(inputs["input_ids"], prefix_ids, inputs["attention_mask"])  # doctest: +SKIP
    >>> with calibrated(model, spans, CalibrationConfig(gamma=0.01)):  # doctest: +SKIP
    ...     output_ids = model.generate(**inputs, max_new_tokens=64)
"""

from guardalign_core.calibration._context import calibrated, calibrated_layers
from guardalign_core.calibration._install import (
    CalibrationHandle,
    apply_calibration,
    get_calibration,
    remove_calibration,
)
from guardalign_core.calibration._interface import EAGER_KEY, SDPA_KEY
from guardalign_core.calibration._state import AttentionCall
from guardalign_core.calibration.bias import prefix_score_bias
from guardalign_core.calibration.spans import PrefixSpans, find_prefix_spans, spans_to_prefix_mask
from guardalign_core.calibration.config import (
    DEFAULT_GAMMA,
    DEFAULT_LAYER_FRACTIONS,
    CalibrationConfig,
    calibration_with,
)
from guardalign_core.calibration.profile import (
    LayerPrefixAttention,
    PrefixAttentionProfile,
    prefix_attention_profile,
)

__all__ = [
    "DEFAULT_GAMMA",
    "DEFAULT_LAYER_FRACTIONS",
    "EAGER_KEY",
    "SDPA_KEY",
    "AttentionCall",
    "CalibrationConfig",
    "CalibrationHandle",
    "LayerPrefixAttention",
    "PrefixAttentionProfile",
    "PrefixSpans",
    "apply_calibration",
    "calibrated",
    "calibrated_layers",
    "calibration_with",
    "find_prefix_spans",
    "get_calibration",
    "prefix_attention_profile",
    "prefix_score_bias",
    "remove_calibration",
    "spans_to_prefix_mask",
]

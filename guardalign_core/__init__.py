"""GuardAlign core: OT-enhanced unsafe-patch detection and safety-prefix attention calibration.

The engine knows nothing of LangChain or LlamaIndex; adapters live in
``guardalign_integrations``.

What the docs hand to users is importable from here: the configs (:class:`GuardConfig`,
:class:`PrefixConfig`, :class:`CalibrationConfig`, ...), the guard (:class:`ImageGuard`, whose
``screen``/``check`` return a :class:`RequestVerdict` of :class:`ImageVerdict` s), the
detectors and :class:`GuardAlignPipeline` (the local calibrated LVLM). Names whose modules load
torch (detectors, guard, pipeline, calibration) are imported on first use, so
``import guardalign_core`` (and ``guardalign --help``, a text-only request, the adapters'
import) does not pay for torch; the torchvision repair (:mod:`._compat`) runs where open_clip
or transformers are imported.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .concepts import ConceptBank, ConceptCategory
from .config import (
    DetectorConfig,
    GuardConfig,
    PolicyConfig,
    PrefixConfig,
    SinkhornConfig,
    get_preset,
    list_presets,
    load_config,
    register_preset,
    save_config,
)
from .errors import (
    GuardAlignError,
    GuardAlignViolation,
    ImageError,
    ModelLoadError,
    UnsupportedModelError,
)
from .images import ImageLimits, load_image
from .results import Decision, PatchBox, ScanResult, Status
from .verdicts import DEFAULT_REFUSAL, Forward, ImageVerdict, RequestVerdict, SafetyPrompt

if TYPE_CHECKING:
    from .calibration import CalibrationConfig
    from .detector import BaseDetector, CosineDetector, OTDetector, create_detector
    from .guard import ImageGuard
    from .pipeline import GuardAlignPipeline

__version__ = "0.1.0"

_LAZY = {
    "BaseDetector": ".detector",
    "CosineDetector": ".detector",
    "OTDetector": ".detector",
    "create_detector": ".detector",
    "ImageGuard": ".guard",
    "GuardAlignPipeline": ".pipeline",
    "CalibrationConfig": ".calibration",
}
"""Public names whose modules import torch: resolved on first access (PEP 562)."""

__all__ = [
    "DEFAULT_REFUSAL",
    "BaseDetector",
    "CalibrationConfig",
    "ConceptBank",
    "ConceptCategory",
    "CosineDetector",
    "Decision",
    "DetectorConfig",
    "Forward",
    "GuardAlignError",
    "GuardAlignPipeline",
    "GuardAlignViolation",
    "GuardConfig",
    "ImageError",
    "ImageGuard",
    "ImageLimits",
    "ImageVerdict",
    "ModelLoadError",
    "OTDetector",
    "PatchBox",
    "PolicyConfig",
    "PrefixConfig",
    "RequestVerdict",
    "SafetyPrompt",
    "ScanResult",
    "SinkhornConfig",
    "Status",
    "UnsupportedModelError",
    "create_detector",
    "get_preset",
    "list_presets",
    "load_config",
    "load_image",
    "register_preset",
    "save_config",
    "__version__",
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later accesses skip this hook
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})

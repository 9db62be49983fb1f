"""GuardAlign core: OT-enhanced unsafe-patch detection and safety-prefix attention calibration.

The engine knows nothing of LangChain or LlamaIndex; adapters live in
``guardalign_integrations``.
"""

from ._compat import ensure_torchvision_importable as _ensure_torchvision_importable

_ensure_torchvision_importable()

from .concepts import ConceptBank, ConceptCategory  # noqa: E402
from .config import (  # noqa: E402
    DetectorConfig,
    GuardConfig,
    PolicyConfig,
    SinkhornConfig,
    get_preset,
    list_presets,
    load_config,
    register_preset,
    save_config,
)
from .detector import BaseDetector, CosineDetector, OTDetector, create_detector  # noqa: E402
from .errors import (  # noqa: E402
    GuardAlignError,
    GuardAlignViolation,
    ImageError,
    ModelLoadError,
    UnsupportedModelError,
)
from .images import ImageLimits, load_image  # noqa: E402
from .results import Decision, PatchBox, ScanResult, Status  # noqa: E402

__version__ = "0.1.0"

__all__ = [
    "BaseDetector",
    "ConceptBank",
    "ConceptCategory",
    "CosineDetector",
    "Decision",
    "DetectorConfig",
    "GuardAlignError",
    "GuardAlignViolation",
    "GuardConfig",
    "ImageError",
    "ImageLimits",
    "ModelLoadError",
    "OTDetector",
    "PatchBox",
    "PolicyConfig",
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

"""Import repairs for known-broken environments, applied once on import of the package.

The registry's torchvision wheel can be a CUDA build whose C++ extension does not load
against a CPU-only torch. Its import then fails with ``RuntimeError: operator
torchvision::nms does not exist`` (it registers fake kernels for ``nms``/``qnms`` without
checking that the ops exist), and because open_clip and transformers import torchvision
whenever it is installed, both fail with it. The repair defines the two missing op schemas
and imports again; only ``torchvision.ops`` stays unusable, and nothing here needs it.
It runs only when that exact failure happens and does nothing when torchvision is healthy.
"""

from __future__ import annotations

import importlib
import logging
import sys

logger = logging.getLogger(__name__)

_BROKEN_OP_MESSAGE = "operator torchvision::nms does not exist"
_MISSING_SCHEMAS = (
    "nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
    "qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor",
)
_repaired = False
_fragment = None  # keeps the torch.library registration alive for the process


def _purge_torchvision() -> None:
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]


def ensure_torchvision_importable() -> bool:
    """Make ``import torchvision`` work on a CPU torch with a CUDA-built torchvision.

    Returns:
        ``True`` if a repair was applied (now or earlier in this process), ``False`` if
        torchvision imported cleanly or is not installed.

    Raises:
        RuntimeError: if torchvision fails for any other reason than the known one.
    """
    global _repaired, _fragment
    if _repaired:
        return True
    try:
        importlib.import_module("torchvision")
        return False
    except ImportError:
        return False
    except RuntimeError as err:
        if _BROKEN_OP_MESSAGE not in str(err):
            raise
    import torch

    _purge_torchvision()
    _fragment = torch.library.Library("torchvision", "FRAGMENT")
    for schema in _MISSING_SCHEMAS:
        _fragment.define(schema)
    importlib.import_module("torchvision")
    _repaired = True
    logger.info(
        "torchvision's compiled ops do not match this torch build; defined the missing "
        "'torchvision::nms'/'qnms' schemas so that transforms, open_clip and transformers "
        "import (torchvision.ops stays unusable)."
    )
    return True

"""The mask / block / flag policy: the one function that turns a detector's finding into a decision.

The detector scores and decides per patch (the rule); whether an unsafe image is masked,
blocked or passed with a flag, and what happens to an image that could not be checked, is
decided here only. The screening step (:mod:`guardalign_core.screening`) applies it to every
freshly scanned image of a request; :meth:`BaseDetector.scan
<guardalign_core.detector.BaseDetector.scan>` applies the same function so that a direct scan
still returns a readable decision and masked image. There is no second copy.
"""

from __future__ import annotations

import time
from typing import Any

from .config import PolicyConfig
from .masking import mask_boxes
from .results import Decision, ScanResult, Status

__all__ = ["apply_policy"]


def apply_policy(
    result: ScanResult,
    policy: PolicyConfig,
    *,
    mask_mode: str = "zero",
    fill: tuple[int, int, int] = (0, 0, 0),
) -> ScanResult:
    """Apply the policy to one scan result; ``masked_image`` becomes what a model may see.

    Args:
        result: a result whose ``masked_image`` holds the checked, *unmasked* pixels (a
            finding: any earlier decision on it is ignored). Masking is not idempotent, so
            never pass a result that was already masked.
        policy: ``action`` for unsafe images (mask / block / flag) and ``fail_open`` for
            images that could not be checked.
        mask_mode: how unsafe patches are masked (``DetectorConfig.mask_mode``).
        fill: the fill colour of ``mask_mode='mean'`` (the backbone's mean colour).

    Returns:
        A copy with ``decision``, ``policy`` and ``masked_image`` set: ``allow`` (nothing
        unsafe; the pixels unchanged), ``mask`` (unsafe boxes masked, Eq. 11), ``block`` (no
        pixels), ``flag`` (pixels unchanged). A ``status=error`` result is blocked, or allowed
        under ``fail_open``; it never carries pixels, since they were not checked.

    Example:
        >>> from guardalign_core.config import PolicyConfig
        >>> apply_policy(finding, PolicyConfig(action="block")).decision  # doctest: +SKIP
        <Decision.BLOCK: 'block'>
    """
    if result.status != Status.OK:
        decision = Decision.ALLOW if policy.fail_open else Decision.BLOCK
        return result.model_copy(update={"decision": decision, "policy": policy.action, "masked_image": None})
    update: dict[str, Any] = {"policy": policy.action}
    if not result.unsafe:
        update["decision"] = Decision.ALLOW
    elif policy.action == "block":
        update.update(decision=Decision.BLOCK, masked_image=None)
    elif policy.action == "flag":
        update["decision"] = Decision.FLAG
    else:
        t0 = time.perf_counter()
        boxes = [(b.x0, b.y0, b.x1, b.y1) for b in result.unsafe_boxes]
        update.update(decision=Decision.MASK, masked_image=mask_boxes(result.masked_image, boxes, mask_mode, fill))
        timings = dict(result.timings_ms)
        timings["mask"] = round(timings.get("mask", 0.0) + (time.perf_counter() - t0) * 1000, 3)
        update["timings_ms"] = timings
    return result.model_copy(update=update)

"""What flows through the detector's pipeline: a prepared chunk, a finding, and the result built from it.

A :class:`PreparedImages` is one chunk after the CPU stage (decoded, model input built and on
the device); a :class:`Finding` is what a detector measured for one image; the two builders
turn a finding into the :class:`~guardalign_core.results.ScanResult` the policy is then
applied to (:func:`~guardalign_core.policy.apply_policy`). No decision is taken here beyond
the rule's per-patch one: an unsafe image comes out ``flag``, a clean one ``allow``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from ._decode import DecodedImage
from .config import PolicyConfig
from .errors import ImageError
from .masking import Box
from .results import Decision, PatchBox, ScanResult, Status


@dataclass
class Finding:
    """What a detector measured for one decoded image, before the policy is applied."""

    grid: tuple[int, int]
    boxes: list[Box]
    statistic: torch.Tensor  # (M,) what the rule compares with the threshold (lower = more unsafe)
    unsafe: torch.Tensor  # (M,) bool
    scores: torch.Tensor | None = None  # (M,) scale-free score, when it differs from the statistic
    d_ot: torch.Tensor | None = None  # (M,) raw Eq. 9
    safe_probability: torch.Tensor | None = None  # (M,)
    expected_costs: torch.Tensor | None = None  # (M, C)
    top_categories: list[str] = field(default_factory=list)
    error: str | None = None  # the check could not run on this image (e.g. non-finite features)


@dataclass(eq=False)
class PreparedImages(Sequence):
    """One chunk after the CPU stage: its decoded images and their model input, ready to encode.

    A sequence of the decoded RGB images (failures left out), so a detector's scoring code
    reads it like a list of images; ``pixels`` is their model input, concatenated per image
    in order and already on the encoder's device (``None`` when nothing decoded).
    """

    offset: int  # position of the chunk's first input in the whole scan
    labels: list[str]  # one per input of the chunk
    images: list[Image.Image]  # the decoded inputs, in order
    positions: list[int]  # each decoded image's position in the chunk
    errors: dict[int, ImageError]  # chunk position -> why that input could not be decoded
    reports: dict[int, DecodedImage]  # chunk position -> the decoder's report (bytes inputs)
    pixels: torch.Tensor | None = None  # (sum of per-image inputs, 3, S, S) on the device
    timings: dict[str, float] = field(default_factory=dict)  # ms, whole chunk

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index):  # type: ignore[override]
        return self.images[index]


def unsafe_boxes(finding: Finding) -> list[PatchBox]:
    """The finding's unsafe patches as pixel boxes with their statistic and closest category."""
    _, cols = finding.grid
    return [
        PatchBox(
            x0=finding.boxes[m][0], y0=finding.boxes[m][1], x1=finding.boxes[m][2], y1=finding.boxes[m][3],
            row=m // cols, col=m % cols, score=float(finding.statistic[m]), category=finding.top_categories[m],
        )
        for m in finding.unsafe.nonzero().flatten().tolist()
    ]


def finding_result(
    fields: dict[str, Any],
    image: Image.Image,
    finding: Finding,
    boxes: list[PatchBox],
    reason: str,
    categories: list[str] | None,
    timings: dict[str, float],
) -> ScanResult:
    """A ``status=ok`` result carrying the finding and the checked, unmasked pixels (``flag`` if unsafe, else ``allow``)."""
    rows, cols = finding.grid
    costs = finding.expected_costs

    def grid_of(values: torch.Tensor | None) -> list[list[float]] | None:
        return values.reshape(rows, cols).tolist() if values is not None else None

    return ScanResult(
        **fields,
        status=Status.OK,
        decision=Decision.FLAG if boxes else Decision.ALLOW,
        unsafe=bool(boxes),
        score=float(finding.statistic.min()),
        reason=reason,
        image_size=image.size,
        grid=(rows, cols),
        scores=grid_of(finding.scores if finding.scores is not None else finding.statistic),
        d_ot=grid_of(finding.d_ot),
        safe_probability=grid_of(finding.safe_probability),
        statistic=grid_of(finding.statistic) if finding.scores is not None else None,
        categories=categories if costs is not None else None,
        category_costs=costs.reshape(rows, cols, -1).tolist() if costs is not None else None,
        top_categories=[finding.top_categories[r * cols : (r + 1) * cols] for r in range(rows)],
        unsafe_boxes=boxes,
        timings_ms={**{k: round(v, 3) for k, v in timings.items()}, "mask": 0.0},
        masked_image=image,
    )


def error_finding(fields: dict[str, Any], err: ImageError | str, policy: PolicyConfig, image: Image.Image | None = None) -> ScanResult:
    """A ``status=error`` result: the check could not run (the policy then blocks it, or passes it under ``fail_open``)."""
    what = "forwarded unchecked (fail_open)" if policy.fail_open else "blocked (fail-closed)"
    kind = type(err).__name__ if isinstance(err, Exception) else "non-finite scores"
    return ScanResult(
        **fields,
        status=Status.ERROR,
        decision=Decision.BLOCK,
        unsafe=False,
        reason=f"image could not be checked ({kind}); {what}",
        error=str(err),
        image_size=image.size if image is not None else None,
    )

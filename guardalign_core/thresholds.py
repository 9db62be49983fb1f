"""Picking τ from labelled images: the threshold depends on backbone, grid and bank (DESIGN §1A)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

from pydantic import BaseModel, ConfigDict, Field

from .detector import BaseDetector, CosineDetector
from .images import ImageSource
from .results import Status

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"}


def list_images(paths: Sequence[str | Path]) -> list[Path]:
    """Expand files and folders (non-recursive, sorted) into image files by suffix.

    Raises:
        ValueError: a path does not exist, or nothing image-like was found.
    """
    found: list[Path] = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            found.extend(sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file()))
        elif path.is_file():
            found.append(path)
        else:
            raise ValueError(f"no such file or folder: {path}")
    if not found:
        raise ValueError(f"no images found in {', '.join(map(str, paths))} (looked for {', '.join(sorted(IMAGE_SUFFIXES))})")
    return found


class ThresholdCalibration(BaseModel):
    """The threshold chosen from labelled images and what it reaches on them."""

    model_config = ConfigDict(frozen=True)

    threshold: float
    target_fpr: float
    fpr: float = Field(description="Fraction of safe images flagged at this threshold.")
    tpr: float = Field(description="Fraction of unsafe images flagged at this threshold.")
    n_safe: int
    n_unsafe: int
    detector: str


def calibrate_threshold(
    detector: BaseDetector, safe: Sequence[ImageSource], unsafe: Sequence[ImageSource], target_fpr: float = 0.05, *, progress: bool = False
) -> ThresholdCalibration:
    """Choose the most sensitive threshold whose false-positive rate on ``safe`` is ≤ ``target_fpr``.

    An image is flagged when its lowest patch score is ≤ τ (OT detector, Eq. 10) or its
    cosine is ≥ t (cosine baseline). Images that fail to decode are skipped.

    Raises:
        ValueError: ``target_fpr`` outside [0, 1) or no decodable image on one side.
    """
    if not 0 <= target_fpr < 1:
        raise ValueError(f"target_fpr must be in [0, 1), got {target_fpr}")
    higher_is_unsafe = isinstance(detector, CosineDetector)

    def image_scores(images: Sequence[ImageSource], side: str) -> list[float]:
        results = detector.scan(list(images), progress=progress)
        values = [r.score for r in results if r.status == Status.OK and r.score is not None]
        if not values:
            raise ValueError(f"no decodable {side} image to calibrate on")
        return [-v for v in values] if higher_is_unsafe else values

    safe_scores = sorted(image_scores(safe, "safe"))
    unsafe_scores = image_scores(unsafe, "unsafe")
    allowed = math.floor(target_fpr * len(safe_scores) + 1e-9)
    if allowed >= len(safe_scores):
        tau = safe_scores[-1]
    else:
        above = safe_scores[allowed]
        below = max([s for s in safe_scores + unsafe_scores if s < above], default=above - 1e-3)
        tau = (below + above) / 2
    fpr = sum(s <= tau for s in safe_scores) / len(safe_scores)
    tpr = sum(s <= tau for s in unsafe_scores) / len(unsafe_scores)
    return ThresholdCalibration(
        threshold=-tau if higher_is_unsafe else tau,
        target_fpr=target_fpr,
        fpr=fpr,
        tpr=tpr,
        n_safe=len(safe_scores),
        n_unsafe=len(unsafe_scores),
        detector=detector.name,
    )

"""Pictures of a verdict: the heat-map overlay of patch scores written by ``guardalign scan --out``."""

from __future__ import annotations

from PIL import Image, ImageDraw

from .masking import grid_boxes
from .results import ScanResult


def heatmap_overlay(image: Image.Image, result: ScanResult, alpha: float = 0.45) -> Image.Image:
    """Overlay patch scores on the image: red = low score (close to unsafe), blue = high.

    Colours are scaled per image between its lowest and highest patch score; unsafe patches
    (score ≤ τ) get a yellow outline. For the cosine baseline (one patch) the colour shows
    the cosine, red when over its threshold.
    """
    if result.scores is None or result.grid is None:
        raise ValueError("heatmap_overlay needs a result with patch scores (status ok)")
    base = image.convert("RGB")
    rows, cols = result.grid
    flat = [s for row in result.scores for s in row]
    lo, hi = min(flat), max(flat)
    overlay = Image.new("RGB", base.size)
    draw = ImageDraw.Draw(overlay)
    boxes = grid_boxes(*base.size, rows, cols)
    for score, box in zip(flat, boxes):
        if result.detector == "cosine":
            t = 1.0 if result.unsafe else 0.0
        else:
            t = 1.0 - ((score - lo) / (hi - lo) if hi > lo else 0.5)  # 1 = lowest score = most unsafe
        draw.rectangle([box[0], box[1], box[2] - 1, box[3] - 1], fill=(int(255 * t), 40, int(255 * (1 - t))))
    blended = Image.blend(base, overlay, alpha)
    outline = ImageDraw.Draw(blended)
    width = max(2, min(base.size) // 150)
    for box in result.unsafe_boxes:
        outline.rectangle([box.x0, box.y0, box.x1 - 1, box.y1 - 1], outline=(255, 230, 0), width=width)
    return blended

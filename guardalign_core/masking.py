"""Patch geometry and masking (Eq. 11): which pixels a patch covers, and how they are hidden."""

from __future__ import annotations

from typing import Iterable, Literal

import numpy as np
from PIL import Image, ImageFilter

Box = tuple[int, int, int, int]  # (x0, y0, x1, y1), x1/y1 exclusive
MaskMode = Literal["zero", "mean", "blur"]


def grid_boxes(width: int, height: int, rows: int, cols: int) -> list[Box]:
    """Pixel boxes of a rows×cols grid over a width×height image, row-major.

    Edges are rounded fractions of the size, so the boxes tile the image exactly.

    Example:
        >>> grid_boxes(10, 10, 2, 2)
        [(0, 0, 5, 5), (5, 0, 10, 5), (0, 5, 5, 10), (5, 5, 10, 10)]
    """
    xs = [round(width * c / cols) for c in range(cols + 1)]
    ys = [round(height * r / rows) for r in range(rows + 1)]
    return [(xs[c], ys[r], xs[c + 1], ys[r + 1]) for r in range(rows) for c in range(cols)]


def mask_boxes(
    image: Image.Image, boxes: Iterable[Box], mode: MaskMode = "zero", fill: tuple[int, int, int] = (0, 0, 0)
) -> Image.Image:
    """Return an RGB copy of ``image`` with every box hidden; pixels outside boxes are unchanged.

    Args:
        image: RGB input (not modified).
        boxes: pixel boxes to hide.
        mode: ``'zero'`` sets them to black (the paper's Eq. 11), ``'mean'`` to ``fill``
            (the CLIP mean colour), ``'blur'`` replaces them with a strong Gaussian blur.

    Returns:
        A new RGB image of the same size.
    """
    boxes = [b for b in boxes if b[2] > b[0] and b[3] > b[1]]
    out = image.convert("RGB") if image.mode != "RGB" else image.copy()
    if not boxes:
        return out
    if mode == "blur":
        for box in boxes:
            region = out.crop(box)
            radius = max(4.0, max(box[2] - box[0], box[3] - box[1]) / 6)
            out.paste(region.filter(ImageFilter.GaussianBlur(radius)), box[:2])
        return out
    if mode not in ("zero", "mean"):
        raise ValueError(f"mask_mode must be 'zero', 'mean' or 'blur', got {mode!r}")
    pixels = np.array(out)  # (H, W, 3) uint8
    value = np.zeros(3, np.uint8) if mode == "zero" else np.array(fill, np.uint8)
    for x0, y0, x1, y1 in boxes:
        pixels[y0:y1, x0:x1] = value
    return Image.fromarray(pixels, mode="RGB")

"""Pixels → model input with bounded memory: squash (grid crops, whole image) and centre crop.

Whatever the image's shape, no intermediate here exceeds a small multiple of the model
input. A large image is first shrunk by an integer factor per axis with PIL's box filter
(:meth:`PIL.Image.Image.reduce`, on 8-bit pixels) until it is at most ``4×`` the target on
each axis; only then does it become a float tensor for the antialiased bicubic resize.
Images already within ``4×`` of the target (every normal photo at the default grid) take
exactly the path they always took. A 1×500,000 strip used to cost ~5 GB of float
intermediates here; now it costs a few MB.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

REDUCE_GAP = 2.0
"""An axis is box-reduced by ``floor(ratio / REDUCE_GAP)`` first, so at most ``2·REDUCE_GAP``× remains for the bicubic resize."""


def reduce_factors(size: tuple[int, int], target: tuple[int, int], gap: float = REDUCE_GAP) -> tuple[int, int]:
    """Integer (x, y) box-reduction factors that bring ``size`` (W, H) within ``2·gap``× of ``target`` (W, H)."""
    return tuple(max(1, int(s / max(1, t) / gap)) for s, t in zip(size, target))  # type: ignore[return-value]


def bounded_reduce(image: Image.Image, target: tuple[int, int]) -> Image.Image:
    """Shrink ``image`` by integer factors (box filter) to within ``4×`` of ``target`` (W, H); a no-op when already within."""
    factors = reduce_factors(image.size, target)
    return image if factors == (1, 1) else image.reduce(factors)


def to_tensor(image: Image.Image) -> torch.Tensor:
    """RGB PIL image → (3, H, W) float32 in [0, 255]."""
    if image.mode != "RGB":
        image = image.convert("RGB")
    return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()


def normalise(batch: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """[0, 255] pixels → CLIP's normalised input (float32); ``mean``/``std`` are (3, 1, 1)."""
    return (batch.clamp(0, 255) / 255.0 - mean) / std


def resize_pixels(pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(3, H, W) or (B, 3, H, W) in [0, 255] → (B, 3, *size), antialiased bicubic (PIL's kernel)."""
    batch = pixels if pixels.dim() == 4 else pixels.unsqueeze(0)
    if tuple(batch.shape[-2:]) != tuple(size):
        batch = torch.nn.functional.interpolate(batch, size=size, mode="bicubic", antialias=True, align_corners=False)
    return batch


def squash(image: Image.Image, size: tuple[int, int]) -> torch.Tensor:
    """The whole image resized to ``size`` (H, W) without cropping: (1, 3, H, W) in [0, 255], bounded memory."""
    height, width = size
    return resize_pixels(to_tensor(bounded_reduce(image, (width, height))), size)


def center_crop_box(width: int, height: int, size: int) -> tuple[tuple[int, int], tuple[float, float, float, float]]:
    """The geometry of CLIP's eval transform (resize the short side to ``size``, centre-crop ``size``²).

    Returns:
        ((resized W, resized H) as torchvision computes them, the crop's box in *source* pixels).
        Resampling exactly that source box to ``size``² equals resizing then cropping.
    """
    short, long = (width, height) if width <= height else (height, width)
    new_long = int(size * long / short)
    new_w, new_h = (size, new_long) if width <= height else (new_long, size)
    left, top = int(round((new_w - size) / 2.0)), int(round((new_h - size) / 2.0))
    sx, sy = width / new_w, height / new_h
    return (new_w, new_h), (left * sx, top * sy, (left + size) * sx, (top + size) * sy)


def center_crop(image: Image.Image, size: int) -> torch.Tensor:
    """CLIP's standard preprocessing (as ETA uses it): (1, 3, size, size) in [0, 255].

    Resizes the short side to ``size`` with bicubic filtering and takes the central square,
    as ``open_clip``'s eval transform does, but resamples only the source box of that square,
    so a 1×500,000 strip never becomes a 224×112,000,000 image on the way.
    """
    if image.mode != "RGB":
        image = image.convert("RGB")
    _, box = center_crop_box(*image.size, size)
    # reducing_gap: PIL box-reduces a large box by an integer factor first (bounded, near-exact).
    out = image.resize((size, size), Image.Resampling.BICUBIC, box=box, reducing_gap=REDUCE_GAP)
    return to_tensor(out).unsqueeze(0)

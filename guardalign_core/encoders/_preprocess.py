"""Pixels → model input with bounded memory: squash (grid crops, whole image) and centre crop.

Whatever the image's shape, no intermediate here exceeds a small multiple of the model
input. An image within ``2×`` of the target on each axis takes the float path it always
took (one antialiased bicubic resize in torch). A larger one is resized by PIL on 8-bit
pixels instead, with ``reducing_gap=3`` (an integer box-reduce first, then the same
antialiased bicubic kernel; Pillow: "indistinguishable from fair resampling in most
cases"): PIL resamples separably, so its intermediates are (output × input) along one axis
at a time, never the input as floats. A 1×500,000 strip used to cost ~5 GB of float
intermediates here; now it costs a few MB.
"""

from __future__ import annotations

import numpy as np
import torch
from PIL import Image

TORCH_MAX_RATIO = 2.0
"""Images at most this many times the target on every axis are resized in float by torch (the reference path)."""

REDUCE_GAP = 3.0
"""PIL's ``reducing_gap`` for larger images: box-reduce by ``floor(ratio / 3)`` first, then bicubic."""


def needs_pil_route(size: tuple[int, int], target: tuple[int, int]) -> bool:
    """Whether ``size`` (W, H) is more than :data:`TORCH_MAX_RATIO` × ``target`` (W, H) on some axis."""
    return any(s > TORCH_MAX_RATIO * t for s, t in zip(size, target))


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
    if image.mode != "RGB":
        image = image.convert("RGB")
    if needs_pil_route(image.size, (width, height)):
        image = image.resize((width, height), Image.Resampling.BICUBIC, reducing_gap=REDUCE_GAP)
    return resize_pixels(to_tensor(image), size)


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
    # PIL resamples separably, horizontal pass first: its intermediate is size × (box height + filter
    # support), at most size × the short side, so exact resampling is already bounded here.
    out = image.resize((size, size), Image.Resampling.BICUBIC, box=box)
    return to_tensor(out).unsqueeze(0)

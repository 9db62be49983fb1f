"""A tiny random-weight CLIP (``guardalign-tiny-clip``: 64-d, 2+2 layers, 64 px, 4×4 tokens).

Registered with open_clip from the shipped config, it runs the real loading path
(``create_model(name, pretrained=PATH)``) in tests, demos and benchmarks with no download.
Its scores mean nothing; the mechanics are real.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import DetectorConfig
from ..encoders import _register_shipped_configs

TINY_CLIP = "guardalign-tiny-clip"


def save_tiny_clip_checkpoint(path: str | Path, *, seed: int = 0, model: str = TINY_CLIP) -> Path:
    """Build a random-weight open_clip model from a registered config and save its state dict.

    Args:
        path: the checkpoint file to write (e.g. ``tmp_path / "tiny.pt"``).
        seed: the random seed of the weights (same seed → same checkpoint).
        model: any open_clip config name (e.g. ``"ViT-B-32"`` for real-size benchmarks).

    Returns:
        The path, to pass as ``DetectorConfig(model=model, pretrained=str(path))``.
    """
    from .. import _compat

    _compat.ensure_torchvision_importable()
    _register_shipped_configs()
    import open_clip

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        clip = open_clip.create_model(model, pretrained=None, pretrained_text=False)
    torch.save(clip.state_dict(), path)
    return path


def tiny_detector_config(checkpoint: str | Path, **overrides) -> DetectorConfig:
    """A :class:`DetectorConfig` for the tiny CLIP saved at ``checkpoint``.

    The backend is the torch reference unless ``backend=`` says otherwise: tests of the
    pipeline's mechanics (and memory-capped ones) must not pay, or depend on, an OpenVINO
    conversion; the fast paths have their own agreement tests.
    """
    overrides.setdefault("backend", "torch")
    return DetectorConfig(model=TINY_CLIP, pretrained=str(checkpoint), **overrides)

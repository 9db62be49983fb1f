"""Shared test configuration: offline hubs, the torchvision repair, and fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from guardalign_core._compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()

from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from shared_images import SHARED_DATA, shared_data  # noqa: E402,F401  (re-exported for fixtures)


@pytest.fixture(scope="session")
def tiny_clip_checkpoint(tmp_path_factory) -> Path:
    """A tiny random-weight open_clip checkpoint on disk, loaded through the real pretrained=PATH path."""
    from guardalign_core.testing.tiny_clip import save_tiny_clip_checkpoint

    return save_tiny_clip_checkpoint(tmp_path_factory.mktemp("clip") / "tiny-clip.pt")


@pytest.fixture(scope="session")
def embed_cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("embed-cache")

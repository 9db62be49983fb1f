"""Shared test configuration: offline hubs, the torchvision repair, and fixtures."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

from guardalign_core._compat import ensure_torchvision_importable  # noqa: E402

ensure_torchvision_importable()

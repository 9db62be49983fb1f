"""Constants and helpers the LangChain tests import (a module of its own, not ``conftest``:
``from conftest import ...`` resolves to whichever conftest pytest imported first)."""

from __future__ import annotations

import base64
from pathlib import Path

ALL_UNSAFE = 100.0
"""A threshold above every d_OT score: every patch is unsafe (masked)."""

ALL_SAFE = -1.0
"""A threshold below every d_OT score: nothing is unsafe."""


def b64(path: Path) -> str:
    """The base64 text of a file."""
    return base64.b64encode(Path(path).read_bytes()).decode("ascii")


def mime(path: Path) -> str:
    return "image/jpeg" if Path(path).suffix.lower() in (".jpg", ".jpeg") else "image/png"

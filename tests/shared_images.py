"""Where the shared test images are (../shared/data beside the repo), for every test directory.

A module of its own, not ``conftest``: several directories have a ``conftest.py``, and
``from conftest import ...`` resolves to whichever of them pytest imported first.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


def shared_data(subdir: str = "") -> Path:
    """The shared test images; skip when absent in a user's clone, fail when absent under CI."""
    path = SHARED_DATA / subdir
    if not path.is_dir():
        if os.environ.get("CI") == "true":
            pytest.fail(f"shared test data missing at {path}; CI must run with shared/ beside the repo")
        pytest.skip(f"shared test data not found at {path} (clone the project with shared/ beside it to run this test)")
    return path

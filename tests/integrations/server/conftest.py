"""Fixtures for the server tests (helpers live in server_helpers.py, a uniquely named module)."""

from __future__ import annotations

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")

from server_helpers import jpeg_bytes, make_guard, png_bytes  # noqa: E402,F401  (fixtures)

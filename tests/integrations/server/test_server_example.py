"""examples/serve_gateway.py runs offline and shows the masked image reaching the upstream."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("openai")
ROOT = Path(__file__).resolve().parents[3]


def test_serve_gateway_example_runs_offline():
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, str(ROOT / "examples" / "serve_gateway.py")], env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "decision header: mask" in out.stdout
    assert "the upstream received a masked PNG: data:image/png;base64," in out.stdout
    assert "streamed: Hello from the upstream." in out.stdout

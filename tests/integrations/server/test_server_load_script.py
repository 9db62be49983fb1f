"""The server benchmarks (benchmarks/server_load.py, server_batching.py) run in `make test` at a small size: they start, measure, stop by themselves.

The full-size run (1,000 requests at concurrency 32) is recorded in docs/performance.md; this
keeps the script working and its own checks (no status but 200 and a deliberate 429, bounded
memory growth, every process stopped) enforced on every change.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("uvicorn")

ROOT = Path(__file__).resolve().parents[3]


def test_the_load_script_runs_small_and_stops_by_itself(tmp_path):
    out = tmp_path / "load.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "server_load.py"), "--requests", "40", "--concurrency", "8",
         "--sequential", "5", "--image-rounds", "2", "--out", str(out)],
        env=env, capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] is True
    assert set(report["load"]["statuses"]) <= {"200", "429"} and sum(report["load"]["statuses"].values()) == 40
    assert report["one_image_ms"]["decision"] == "allow" and report["one_image_ms"]["guard_alone"]["median"] > 0
    for section in ("text_only_ms", "first_chunk_ms"):
        assert {"direct", "floor", "gateway", "gateway_minus_direct"} <= set(report[section])


def test_the_batching_benchmark_runs_small_and_stops_by_itself(tmp_path):
    out = tmp_path / "batching.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "server_batching.py"), "--bursts", "1", "--burst", "4", "--out", str(out)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(out.read_text())
    assert report["ok"] is True and report["statuses"] == {"200": 16}  # warm-up and timed burst, both gateways
    assert report["unbatched"]["mean_detector_batch"] == 1.0  # batching off really scans one request at a time
    assert report["throughput_ratio_batched_over_unbatched"] > 0

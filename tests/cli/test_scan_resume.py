"""``guardalign scan --jsonl --resume``: a killed scan resumes, and the file has every image exactly once."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shared_images import shared_data
from guardalign_cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny_args(tiny_clip_checkpoint, embed_cache_dir, tmp_path):
    config = tmp_path / "tiny.json"
    config.write_text(json.dumps({"detector": {"model": "guardalign-tiny-clip", "pretrained": str(tiny_clip_checkpoint),
                                               "cache_dir": str(embed_cache_dir), "grid_size": 2}}))
    return ["--config", str(config)]


def _images():
    files = sorted(p for p in shared_data("benign").iterdir() if p.suffix.lower() in (".png", ".jpg"))
    assert len(files) == 12
    return files


def _complete_rows(path: Path) -> list[dict]:
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text.split("\n")[:-1]]  # only newline-terminated lines


def _scan(args, out, **kwargs):
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "guardalign_cli", "scan", str(shared_data("benign")), "--jsonl", str(out), *args],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kwargs)


def test_killed_scan_resumes_with_every_image_exactly_once(tiny_args, tmp_path):
    out = tmp_path / "verdicts.jsonl"
    first = _scan([*tiny_args, "--chunk-size", "2", "--no-progress"], out)
    deadline = time.monotonic() + 300
    try:
        while not _complete_rows(out):  # the first chunk is on disk
            assert first.poll() is None, f"the scan ended before it could be interrupted: {first.communicate()}"
            assert time.monotonic() < deadline, "no chunk was written in time"
            time.sleep(0.02)
        first.send_signal(signal.SIGKILL)
    finally:
        first.kill()
        first.communicate()
    done_before = _complete_rows(out)
    assert 0 < len(done_before) < 12, "the kill must interrupt the scan part-way for this test to mean anything"
    with out.open("a") as handle:  # and as if it had been killed in the middle of writing a line
        handle.write('{"source": "' + str(_images()[-1].resolve()) + '", "stat')

    second = _scan([*tiny_args, "--chunk-size", "2", "--resume", "--progress"], out)
    stdout, stderr = second.communicate(timeout=300)
    assert second.returncode == 0, stderr
    rows = _complete_rows(out)
    assert out.read_text().endswith("\n")  # the torn line was cut off, not left in the middle
    assert sorted(r["source"] for r in rows) == sorted(str(f.resolve()) for f in _images())  # every image exactly once
    assert rows[: len(done_before)] == done_before  # what was on disk was kept as it was
    assert {r["config_fingerprint"] for r in rows} == {done_before[0]["config_fingerprint"]}
    assert f"{12 - len(done_before)} image(s) scanned" in stdout and f"{len(done_before)} already in" in stdout
    assert "img/s" in stderr and "ETA" in stderr  # the progress bar


def test_existing_file_is_not_overwritten_without_resume_or_force(tiny_args, tmp_path, capsys):
    out = tmp_path / "verdicts.jsonl"
    out.write_text('{"source": "/elsewhere.png", "config_fingerprint": "x"}\n')
    assert main(["scan", str(_images()[0]), "--jsonl", str(out), *tiny_args]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "guardalign scan: error: verdicts.jsonl already exists; pass --resume to continue it or --force to overwrite it"
    assert out.read_text() == '{"source": "/elsewhere.png", "config_fingerprint": "x"}\n'
    assert main(["scan", str(_images()[0]), "--jsonl", str(out), "--force", *tiny_args]) == 0
    assert [r["source"] for r in _complete_rows(out)] == [str(_images()[0].resolve())]


def test_resume_with_another_config_refuses_instead_of_mixing(tiny_args, tmp_path, capsys):
    out = tmp_path / "verdicts.jsonl"
    assert main(["scan", str(_images()[0]), "--jsonl", str(out), *tiny_args]) == 0
    before = out.read_text()
    assert main(["scan", *map(str, _images()[:2]), "--jsonl", str(out), "--resume", "--grid", "3", *tiny_args]) == 2
    err = capsys.readouterr().err
    assert "another detector configuration" in err and len(err.strip().splitlines()) == 1
    assert out.read_text() == before

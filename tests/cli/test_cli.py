"""The command line as a newcomer runs it."""

import json
import subprocess
import sys

import pytest

from conftest import shared_data
from guardalign_cli import main


@pytest.fixture
def tiny_args(tiny_clip_checkpoint):
    return ["--model", "guardalign-tiny-clip", "--pretrained", str(tiny_clip_checkpoint)]


def test_scan_json_prints_one_object_per_image(tiny_args, capsys):
    folder = shared_data("benign")
    assert main(["scan", str(folder), "--json", *tiny_args]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 12
    records = [json.loads(line) for line in lines]
    assert all(r["status"] == "ok" and len(r["scores"]) == 3 for r in records)
    assert {r["source"].rsplit("/", 1)[-1] for r in records} == {p.name for p in folder.iterdir() if p.suffix in (".png", ".jpg")}


def test_scan_out_writes_masked_and_heatmap(tiny_args, tmp_path, capsys):
    folder = shared_data("figstep-tiny")
    images = sorted(folder.glob("*.png"))[:3]
    assert main(["scan", *map(str, images), "--out", str(tmp_path), "--threshold", "1e9", "--grid", "2", *tiny_args]) == 0
    out = capsys.readouterr().out
    assert "3 image(s), 3 unsafe" in out
    for image in images:
        assert (tmp_path / f"{image.stem}.masked.png").is_file()
        assert (tmp_path / f"{image.stem}.heatmap.png").is_file()


def test_calibrate_writes_a_config_that_scan_loads(tiny_args, tmp_path, capsys):
    config = tmp_path / "tau.yaml"
    assert main(["calibrate", "--safe", str(shared_data("benign")), "--unsafe", str(shared_data("figstep-tiny")), "--out", str(config), *tiny_args]) == 0
    assert "TPR" in capsys.readouterr().out
    assert main(["scan", str(shared_data("benign") / "coins.png"), "--config", str(config), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    from guardalign_core import load_config

    assert record["threshold"] == pytest.approx(load_config(config).detector.threshold)


def test_errors_are_one_line(capsys):
    assert main(["scan", "/nonexistent/folder"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "no such file or folder" in err and "Traceback" not in err


def test_help_for_every_command():
    for command in ([], ["scan"], ["calibrate"], ["bench"]):
        proc = subprocess.run([sys.executable, "-m", "guardalign_cli", *command, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "usage: guardalign" in proc.stdout


def test_bench_runs_and_reports_ratios(tiny_args, capsys):
    assert main(["bench", "--images", str(shared_data("benign")), "--batch", "4", "--single", "2", "--json", *tiny_args]) == 0
    report = json.loads(capsys.readouterr().out)["detector"]
    assert report["ot"]["ot_over_encode"] > 0 and report["ot"]["batched_speedup"] > 0
    assert report["ot"]["masked_images"] > 0  # the bench threshold makes masking really run
    assert set(report["cosine"]["ms_per_image"]) >= {"decode", "encode", "ot"}

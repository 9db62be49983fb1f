"""The command line as a newcomer runs it."""

import json
import subprocess
import sys

import pytest

from shared_images import shared_data
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
    # Scanning again into the same folder would replace those files: refused unless --force.
    before = {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()}
    assert main(["scan", *map(str, images), "--out", str(tmp_path), "--grid", "2", *tiny_args]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "already exist" in err and "--force" in err
    assert {p.name: p.stat().st_mtime_ns for p in tmp_path.iterdir()} == before
    assert main(["scan", *map(str, images), "--out", str(tmp_path), "--grid", "2", "--force", *tiny_args]) == 0


def test_calibrate_writes_a_config_that_scan_loads(tiny_args, tmp_path, capsys):
    config = tmp_path / "tau.yaml"
    assert main(["calibrate", "--safe", str(shared_data("benign")), "--unsafe", str(shared_data("figstep-tiny")), "--out", str(config), *tiny_args]) == 0
    assert "TPR" in capsys.readouterr().out
    assert main(["scan", str(shared_data("benign") / "coins.png"), "--guard", str(config), "--json"]) == 0
    record = json.loads(capsys.readouterr().out)
    from guardalign_core import load_config

    assert record["threshold"] == pytest.approx(load_config(config).detector.threshold)
    # The old spelling still works for one release, with a warning.
    with pytest.warns(FutureWarning, match="--config is deprecated.*use --guard"):
        assert main(["scan", str(shared_data("benign") / "coins.png"), "--config", str(config), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["threshold"] == record["threshold"]


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


def test_calibrate_never_overwrites_an_existing_config(tiny_args, tmp_path, capsys):
    config = tmp_path / "tau.yaml"
    config.write_text("detector: {threshold: 0.123}\n")
    args = ["calibrate", "--safe", str(shared_data("benign")), "--unsafe", str(shared_data("figstep-tiny")), "--out", str(config), *tiny_args]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(config) in err and "--force" in err
    assert config.read_text() == "detector: {threshold: 0.123}\n"
    assert main([*args, "--force"]) == 0 and "0.123" not in config.read_text()


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err
    return err


BAD_DEVICES = [("banana", "is not a device"), ("cuda:7", "cuda:7")]


@pytest.mark.parametrize(("device", "message"), BAD_DEVICES)
def test_a_bad_clip_device_is_one_line_naming_the_flag(device, message, tiny_args, capsys):
    image = str(shared_data("benign") / "coins.png")
    assert main(["scan", image, *tiny_args, "--device", device]) == 2
    _one_line_error(capsys, "--device", message)
    assert main(["scan", image, *tiny_args, "--clip-device", device]) == 2  # the synonym in CLIP-only commands
    _one_line_error(capsys, "--clip-device", message)
    assert main(["bench", "--images", image, *tiny_args, "--device", device]) == 2
    _one_line_error(capsys, "--device", message)


def test_a_missing_clip_checkpoint_is_one_line_naming_the_flag(tmp_path, capsys):
    image = str(shared_data("benign") / "coins.png")
    missing = str(tmp_path / "no-such-clip.pt")
    assert main(["scan", image, "--model", "ViT-B-32", "--pretrained", missing]) == 2
    _one_line_error(capsys, "--pretrained", missing, "no such checkpoint file")
    assert main(["calibrate", "--safe", image, "--unsafe", image, "--out", str(tmp_path / "x.yaml"), "--pretrained", str(tmp_path)]) == 2
    _one_line_error(capsys, "--pretrained", "no such checkpoint file")


def test_io_errors_name_the_file(tiny_args, tmp_path, capsys):
    not_a_folder = tmp_path / "taken"
    not_a_folder.write_text("a file where the output folder should go")
    assert main(["scan", str(shared_data("benign") / "coins.png"), "--out", str(not_a_folder), *tiny_args]) == 2
    _one_line_error(capsys, str(not_a_folder))

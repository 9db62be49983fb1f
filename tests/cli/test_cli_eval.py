"""``guardalign eval`` as a newcomer runs it: tiny checkpoint, tiny CLIP config file, FigStep-Tiny."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from shared_images import shared_data

from guardalign_cli import main
from guardalign_core.config import GuardConfig, save_config
from guardalign_core.testing.tiny_clip import tiny_detector_config
from guardalign_core.testing.tiny_lvlm import save_tiny_lvlm


@pytest.fixture(scope="module")
def llava_dir(tmp_path_factory):
    return save_tiny_lvlm("llava", tmp_path_factory.mktemp("cli-llava") / "llava")


@pytest.fixture
def guard_file(tmp_path, tiny_clip_checkpoint, embed_cache_dir):
    config = GuardConfig(detector=tiny_detector_config(tiny_clip_checkpoint, threshold=1e9, cache_dir=str(embed_cache_dir)))
    return save_config(config, tmp_path / "tiny-guard.yaml")


def test_eval_runs_prints_the_table_and_rejudges(llava_dir, guard_file, tmp_path, capsys):
    out = tmp_path / "run"
    figstep = f"figstep:{shared_data('figstep-tiny')}"
    args = ["eval", "--model", str(llava_dir), "--benchmark", figstep, "--methods", "vanilla,guardalign", "--judge", "refusal",
            "--out", str(out), "--limit", "2", "--max-new-tokens", "3", "--guard", str(guard_file), "--suppress-special", "--no-progress"]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    lines = stdout.splitlines()
    assert lines[0].split()[:4] == ["Benchmark", "Method", "N", "USR"]
    assert lines[2].split()[:3] == ["figstep", "vanilla", "2"] and lines[3].split()[:3] == ["figstep", "guardalign", "2"]
    assert "4 generated, 0 resumed" in stdout
    for name in ("responses.jsonl", "items.jsonl", "results.csv", "results.json", "table.txt", "run.json"):
        assert (out / name).is_file(), name
    records = [json.loads(line) for line in (out / "responses.jsonl").read_text().splitlines()]
    assert len(records) == 4 and all(r["error"] is None and r["output_tokens"] == 3 for r in records)
    assert json.loads((out / "run.json").read_text())["options"]["max_new_tokens"] == 3

    assert main(args) == 0  # same command again: everything resumed
    assert "0 generated, 4 resumed" in capsys.readouterr().out

    assert main(["eval", "--rejudge", "--out", str(out), "--judge", "constant:unsafe", "--no-progress"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert [line.split()[3] for line in table[2:4]] == ["100.0", "100.0"]  # USR column
    assert (out / "usr_vs_time.png").is_file()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "vanilla,bogus"], "unknown method 'bogus'; known methods: vanilla, eta, ot, calibration, guardalign"),
        (["--benchmark", "nosuch:/data"], "unknown benchmark spec 'nosuch:/data'"),
        (["--benchmark", "figstep:/no/such/folder"], "/no/such/folder"),
        (["--judge", "nosuch-judge"], "unknown judge 'nosuch-judge'"),
        (["--judge", "md-judge@v2:/no/such/judge"], "no such model folder '/no/such/judge'"),
    ],
)
def test_bad_arguments_are_one_line_errors(extra, message, tmp_path, capsys):
    args = ["eval", "--model", str(tmp_path / "no-model"), "--benchmark", f"figstep:{shared_data('figstep-tiny')}",
            "--out", str(tmp_path / "out"), "--no-progress"]
    # A later --benchmark adds a spec; replace the good one so only the bad one is read.
    if extra[0] == "--benchmark":
        args[4] = extra[1]
        extra = []
    assert main([*args, *extra]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_model_and_benchmark_are_required_unless_rejudging(tmp_path, capsys):
    assert main(["eval", "--out", str(tmp_path)]) == 2
    assert "--model is required" in capsys.readouterr().err
    assert main(["eval", "--rejudge", "--out", str(tmp_path)]) == 2
    assert "no saved responses" in capsys.readouterr().err


def test_help_documents_the_spec_syntaxes_and_nothing_imports_langchain():
    proc = subprocess.run([sys.executable, "-m", "guardalign_cli", "eval", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "usage: guardalign eval" in proc.stdout
    for text in ("figstep:DIR", "spa-vl-harm:", "folder:DIR", "md-judge:PATH", "langchain:PROVIDER:MODEL", "guardalign"):
        assert text in proc.stdout
    code = (
        "import sys, guardalign_core.eval; from guardalign_cli import build_parser; build_parser();"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('langchain_core','langchain','llama_index')];"
        "print(bad); assert not bad"
    )
    check = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr


def _one_line_error(capsys, *needles):
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err, err
    for needle in needles:
        assert needle in err, err


@pytest.mark.parametrize(("flag", "device", "message"), [
    ("--device", "banana", "is not a device"), ("--device", "cuda:7", "cuda:7"),
    ("--clip-device", "banana", "is not a device"), ("--judge-device", "cuda:7", "cuda:7"),
])
def test_bad_devices_are_one_line_naming_the_flag(flag, device, message, llava_dir, tmp_path, capsys):
    args = ["eval", "--model", str(llava_dir), "--benchmark", f"figstep:{shared_data('figstep-tiny')}", "--out", str(tmp_path / "out"),
            "--no-progress", flag, device]
    assert main(args) == 2
    _one_line_error(capsys, flag, message)
    assert not (tmp_path / "out").exists()  # refused before anything was loaded or written


def test_a_missing_checkpoint_is_one_line_naming_the_flag(tmp_path, capsys):
    missing = tmp_path / "no-such-llava"
    args = ["--benchmark", f"figstep:{shared_data('figstep-tiny')}", "--out", str(tmp_path / "out"), "--no-progress"]
    assert main(["eval", "--model", str(missing), *args]) == 2
    _one_line_error(capsys, "--model", str(missing), "no such checkpoint folder")
    not_a_checkpoint = tmp_path / "empty"
    not_a_checkpoint.mkdir()
    assert main(["eval", "--model", str(not_a_checkpoint), *args]) == 2
    _one_line_error(capsys, "--model", "config.json")


def test_chat_device_is_the_lvlm_s_and_clip_device_is_clip_s(tmp_path, capsys):
    missing = str(tmp_path / "no-such-llava")
    assert main(["chat", "hi", "--model", missing]) == 2
    _one_line_error(capsys, "--model", "no such checkpoint folder")
    for flag in ("--device", "--clip-device"):
        assert main(["chat", "hi", "--model", missing, flag, "banana"]) == 2
        _one_line_error(capsys, f"{flag} 'banana' is not a device")
    from guardalign_cli import build_parser

    args = build_parser().parse_args(["chat", "hi", "--model", "m", "--device", "cuda:1", "--clip-device", "cpu"])
    assert (args.lvlm_device, args.clip_device) == ("cuda:1", "cpu")
    with pytest.warns(FutureWarning, match="--lvlm-device is deprecated"):
        old = build_parser().parse_args(["chat", "hi", "--model", "m", "--lvlm-device", "cuda:1"])
    assert old.lvlm_device == "cuda:1"


def test_outputs_of_a_different_run_are_refused_unless_forced(llava_dir, guard_file, tmp_path, capsys):
    out = tmp_path / "run"
    figstep = f"figstep:{shared_data('figstep-tiny')}"
    args = ["eval", "--model", str(llava_dir), "--benchmark", figstep, "--methods", "vanilla", "--out", str(out), "--limit", "1",
            "--max-new-tokens", "2", "--guard", str(guard_file), "--suppress-special", "--no-progress"]
    assert main(args) == 0
    capsys.readouterr()
    saved = (out / "responses.jsonl").read_text()
    other = [a if a != "2" else "3" for a in args]  # another setup: 3 new tokens
    assert main(other) == 2
    _one_line_error(capsys, "another setup", "generation options differ", "--force")
    assert main([*other, "--no-resume"]) == 2  # starting over would overwrite it just the same
    _one_line_error(capsys, "another setup")
    assert (out / "responses.jsonl").read_text() == saved
    assert main([*other, "--force"]) == 0
    assert "1 generated, 0 resumed" in capsys.readouterr().out
    (out / "run.json").write_text("{not json")
    assert main(args) == 2
    _one_line_error(capsys, "run.json is not a GuardAlign run record")


def test_os_errors_and_bad_judge_paths_are_one_line_errors(tmp_path, capsys, monkeypatch):
    import guardalign_cli._eval as cli_eval

    def boom(args):
        raise PermissionError(13, "Permission denied", str(tmp_path / "out"))

    monkeypatch.setattr(cli_eval, "_run", boom)
    assert main(["eval", "--model", "x", "--benchmark", "figstep:/x", "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Permission denied" in err and "Traceback" not in err


@pytest.mark.parametrize(("flag", "expected"), [([], {}), (["--skip-missing"], {"skip_missing": True})])
def test_skip_missing_reaches_the_readers(flag, expected, tmp_path, capsys, monkeypatch):
    import guardalign_core.eval.datasets as datasets

    seen = []

    def fake_load(spec, **kwargs):
        seen.append(kwargs)
        raise ValueError("stop here")

    monkeypatch.setattr(datasets, "load_benchmark", fake_load)
    assert main(["eval", "--model", "x", "--benchmark", "folder:/x", "--out", str(tmp_path), *flag]) == 2
    assert "stop here" in capsys.readouterr().err
    assert {k: v for k, v in seen[0].items() if k == "skip_missing"} == expected

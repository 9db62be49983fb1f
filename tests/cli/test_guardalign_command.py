"""The ``guardalign`` script: the core's commands plus ``serve``, from the package above both."""

import subprocess
import sys


def _run(*args):
    return subprocess.run([sys.executable, "-m", "guardalign_cli", *args], capture_output=True, text=True, timeout=120)


def test_serve_is_a_guardalign_command():
    proc = _run("serve", "--help")
    assert proc.returncode == 0, proc.stderr
    assert "usage: guardalign serve" in proc.stdout and "--upstream" in proc.stdout and "--api-key" in proc.stdout


def test_core_commands_are_all_there():
    proc = _run("--help")
    assert proc.returncode == 0
    for command in ("scan", "calibrate", "bench", "serve"):
        assert command in proc.stdout


def test_building_the_parser_does_not_start_the_web_stack():
    # `guardalign scan --help` must not pay for FastAPI/uvicorn: serve's flags are light.
    code = (
        "import sys; from guardalign_cli import build_parser; build_parser(); "
        "sys.exit(1 if any(m.split('.')[0] in ('fastapi', 'uvicorn', 'starlette') for m in sys.modules) else 0)"
    )
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0

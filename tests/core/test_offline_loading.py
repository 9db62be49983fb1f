"""A missing checkpoint with no hub fails in seconds, with one message, whether or not HF_HUB_OFFLINE is set.

Before: 47–49 s of ``huggingface_hub`` retries (every file, every safetensors alternative,
backing off 1, 2, 4, 8 s), more than 20 warning lines, and a hint about model names. "No hub"
is simulated with ``HF_ENDPOINT`` on a closed loopback port (nothing leaves the machine); each
case runs in a fresh interpreter (``huggingface_hub`` reads its environment at import) that
counts its TCP connection attempts, so the test asserts *how many times* the hub was tried,
not how long it took. The subprocess timeout only keeps a regression from hanging the suite.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

_SCRIPT = """
import json, socket, sys
attempts = []
real = socket.create_connection
def counting(address, *args, **kwargs):
    attempts.append(list(address))
    return real(address, *args, **kwargs)
socket.create_connection = counting
steps = {{}}
def step(name, load):
    del attempts[:]
    try:
        load()
        error = None
    except Exception as err:
        error = {{"type": type(err).__name__, "message": str(err)}}
    steps[name] = {{"attempts": list(attempts), "error": error}}
{body}
print(json.dumps(steps))
"""


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _run(body: str, tmp_path: Path, *, offline: bool) -> tuple[dict, str]:
    """Run ``body`` (calls of ``step(name, load)``) in a fresh interpreter with no hub; the steps' results and stderr."""
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")}
    env.update(PYTHONPATH=str(REPO), HF_HOME=str(tmp_path / "hf-home"), HF_ENDPOINT=f"http://127.0.0.1:{_closed_port()}",
               HOME=str(tmp_path), OMP_NUM_THREADS="1")
    if offline:
        env["HF_HUB_OFFLINE"] = "1"
    code = _SCRIPT.format(body=textwrap.dedent(body))
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, env=env, cwd=REPO)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


def _assert_one_clear_failure(out: dict, *, offline: bool, name: str, hint: str) -> None:
    assert out["error"] is not None and out["error"]["type"] == "ModelLoadError", out
    message = out["error"]["message"]
    assert "could not be fetched" in message and name in message and "point at a local copy" in message and hint in message, message
    assert ("HF_HUB_OFFLINE is set" in message) if offline else ("cannot be reached" in message), message
    # One probe at most (the HTTP client may open two sockets for it), none when offline.
    assert len(out["attempts"]) <= (0 if offline else 2), out["attempts"]


@pytest.mark.parametrize("offline", [False, True], ids=["hub-unreachable", "HF_HUB_OFFLINE"])
def test_missing_weights_fail_at_once_with_one_clear_error(tmp_path: Path, offline: bool) -> None:
    out, stderr = _run(
        """
        from guardalign_core.lvlm import LocalLVLM
        from guardalign_core.encoders._clip import ClipEncoder
        step("lvlm", lambda: LocalLVLM("guardalign-test/no-such-lvlm").load())
        step("clip-tag", lambda: ClipEncoder("ViT-B-32", "openai"))
        step("clip-hub", lambda: ClipEncoder("hf-hub:guardalign-test/no-such-clip", None))
        """,
        tmp_path,
        offline=offline,
    )
    _assert_one_clear_failure(out["lvlm"], offline=offline, name="guardalign-test/no-such-lvlm", hint="LocalLVLM('/path/to/checkpoint')")
    _assert_one_clear_failure(out["clip-tag"], offline=offline, name="ViT-B-32/openai", hint="DetectorConfig(pretrained=")
    _assert_one_clear_failure(out["clip-hub"], offline=offline, name="hf-hub:guardalign-test/no-such-clip", hint="DetectorConfig(pretrained=")
    assert "`hf download timm/vit_base_patch32_clip_224.openai`" in out["clip-tag"]["error"]["message"]
    assert "Retrying in" not in stderr and stderr.count("\n") < 10, stderr[-2000:]


def test_weights_on_disk_load_with_no_hub_and_no_connection_attempt(tmp_path: Path, tiny_clip_checkpoint: Path) -> None:
    """A CLIP checkpoint file and an LVLM folder load with the hub unreachable, without even a probe."""
    from guardalign_core.testing.tiny_clip import tiny_detector_config

    model = tiny_detector_config(tiny_clip_checkpoint).model
    out, _ = _run(
        f"""
        from guardalign_core.encoders._clip import ClipEncoder
        from guardalign_core.lvlm import LocalLVLM
        from guardalign_core.testing.tiny_clip import tiny_detector_config
        from guardalign_core.testing.tiny_lvlm import save_tiny_lvlm
        tiny_detector_config({str(tiny_clip_checkpoint)!r})
        step("clip", lambda: ClipEncoder({model!r}, {str(tiny_clip_checkpoint)!r}))
        folder = save_tiny_lvlm("llava", {str(tmp_path / "tiny-llava")!r})
        step("lvlm", lambda: LocalLVLM(str(folder)).load())
        """,
        tmp_path,
        offline=False,
    )
    assert out["clip"] == {"attempts": [], "error": None} and out["lvlm"] == {"attempts": [], "error": None}, out

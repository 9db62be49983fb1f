"""ServerConfig validation and the CLI's layering: file, then flags, then the environment (secrets only)."""

from __future__ import annotations

import argparse

import pytest

from guardalign_integrations.server import ServerConfig, load_server_config
from guardalign_integrations.server.cli import add_serve_arguments, build_config


def parse(*argv: str) -> argparse.Namespace:
    return add_serve_arguments(argparse.ArgumentParser()).parse_args(list(argv))


def test_flags_override_the_file(tmp_path):
    path = tmp_path / "server.yaml"
    path.write_text("upstream:\n  base_url: http://127.0.0.1:1/v1\n  read_timeout_s: 7\nguard: fast-cpu\nport: 9100\nmax_queue: 3\n")
    config = build_config(parse("--config", str(path), "--port", "9200", "--upstream", "http://127.0.0.1:2/v1/"), environ={})
    assert config.port == 9200 and config.max_queue == 3 and config.guard == "fast-cpu"
    assert config.upstream.base_url == "http://127.0.0.1:2/v1" and config.upstream.read_timeout_s == 7
    local = build_config(parse("--config", str(path), "--model", "some/model"), environ={})
    assert local.mode == "local" and local.upstream is None and local.model.model_id == "some/model"


def test_secrets_come_from_the_environment_only_at_the_edge():
    config = build_config(parse("--upstream", "http://127.0.0.1:1/v1", "--host", "0.0.0.0"),
                          environ={"GUARDALIGN_API_KEY": "k1", "GUARDALIGN_UPSTREAM_API_KEY": "up"})
    assert config.api_keys == ["k1"] and config.upstream.api_key == "up"


def test_one_precedence_for_every_setting_flag_then_environment_then_file(tmp_path):
    path = tmp_path / "server.yaml"
    path.write_text("upstream:\n  base_url: http://127.0.0.1:1/v1\n  api_key: file-upstream\napi_keys: [file-key]\n"
                    "guard: fast-cpu\nhost: 127.0.0.1\nport: 9100\n")
    environ = {"GUARDALIGN_API_KEY": "env-key", "GUARDALIGN_UPSTREAM_API_KEY": "env-upstream"}
    from_env = build_config(parse("--config", str(path)), environ=environ)
    assert from_env.api_keys == ["env-key"] and from_env.upstream.api_key == "env-upstream"  # both variables over the file
    flags = build_config(parse("--config", str(path), "--api-key", "flag-key", "--guard", "cpu-tokens", "--host", "::1"), environ=environ)
    assert flags.api_keys == ["flag-key"] and flags.guard == "cpu-tokens" and flags.host == "::1"  # flags over both
    from_file = build_config(parse("--config", str(path)), environ={})
    assert from_file.api_keys == ["file-key"] and from_file.upstream.api_key == "file-upstream"


@pytest.mark.parametrize("drain, expected", [(0.0, 0), (0.4, 1), (2.5, 3), (30.0, 30)])
def test_the_drain_timeout_reaches_uvicorn_in_whole_seconds_never_as_wait_forever(drain, expected):
    from guardalign_integrations.server.cli import uvicorn_limits

    config = ServerConfig(upstream={"base_url": "http://127.0.0.1:1/v1"}, drain_timeout_s=drain)
    assert uvicorn_limits(config)["timeout_graceful_shutdown"] == expected
    with pytest.raises(ValueError, match="requires api_keys"):
        build_config(parse("--upstream", "http://127.0.0.1:1/v1", "--host", "0.0.0.0"), environ={})


@pytest.mark.parametrize("data,field", [
    ({"upstream": {"base_url": "http://x/v1"}, "max_queeu": 1}, "max_queeu"),
    ({}, "exactly one of upstream"),
    ({"upstream": {"base_url": "ftp://x"}}, "base_url"),
    ({"upstream": {"base_url": "http://x/v1"}, "model": {"model_id": "m"}}, "exactly one"),
])
def test_invalid_configs_name_the_problem(data, field):
    with pytest.raises(ValueError, match=field):
        ServerConfig.model_validate(data)


def test_missing_file_does_not_echo_the_path(tmp_path):
    with pytest.raises(ValueError) as err:
        load_server_config(tmp_path / "secret-dir" / "server.yaml")
    assert "secret-dir" not in str(err.value)


def test_serve_command_starts_warms_logs_one_line_per_request_and_drains_on_sigterm(tmp_path, tiny_clip_checkpoint):
    """``guardalign serve`` (the main CLI, as users start it) in a subprocess.

    Ready after warm-up; one access line per request with the decision and never the
    content; SIGTERM lets the in-flight request finish.
    """
    import os
    import signal
    import socket
    import subprocess
    import sys
    import threading
    import time

    import httpx

    from guardalign_core.config import GuardConfig, save_config
    from guardalign_core.testing.tiny_clip import tiny_detector_config
    from guardalign_integrations.server.testing import ServerThread, create_upstream_imitation

    guard_file = save_config(GuardConfig(detector=tiny_detector_config(tiny_clip_checkpoint, cache_dir=str(tmp_path))), tmp_path / "guard.yaml")
    imitation, record = create_upstream_imitation()
    record.response_delay_s = 1.5
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "HF_HUB_OFFLINE": "1"}
    with ServerThread(imitation) as upstream:
        proc = subprocess.Popen([sys.executable, "-m", "guardalign_cli", "serve", "--upstream", upstream.url + "/v1",
                                 "--guard", str(guard_file), "--port", str(port), "--log-level", "info"], env=env,
                                stderr=subprocess.PIPE, text=True)
        try:
            url = f"http://127.0.0.1:{port}"
            deadline = time.monotonic() + 120
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, "the server did not become ready"
                try:
                    if httpx.get(url + "/readyz", timeout=2).status_code == 200:
                        break
                except httpx.HTTPError:
                    pass
                time.sleep(0.1)
            result = {}
            secret = "hi, my account number is canary-7731"
            slow = threading.Thread(target=lambda: result.update(r=httpx.post(
                url + "/v1/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": secret}]}, timeout=30)))
            slow.start()
            while not record.requests:  # the request has reached the upstream: it is in flight
                time.sleep(0.02)
            proc.send_signal(signal.SIGTERM)
            slow.join()
            assert result["r"].status_code == 200 and result["r"].json()["choices"][0]["message"]["content"]
            assert proc.wait(timeout=30) in (0, -signal.SIGTERM)  # uvicorn re-raises the signal after draining
            log = proc.stderr.read()
            chat_lines = [line for line in log.splitlines() if "POST /v1/chat/completions" in line]
            assert len(chat_lines) == 1 and "200 decision=allow images=0" in chat_lines[0], log
            assert "canary-7731" not in log and "HTTP Request:" not in log  # no content; no second line from httpx
        finally:
            if proc.poll() is None:
                proc.kill()

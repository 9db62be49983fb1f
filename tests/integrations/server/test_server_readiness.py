"""/readyz: not ready until the guard is warm (a load balancer must not send traffic to a cold replica), and a failed warm-up says so."""

from __future__ import annotations

import threading
import time

import httpx

from guardalign_integrations.server import ServerConfig, create_app
from guardalign_integrations.server.testing import ServerThread
from server_helpers import ALL_UNSAFE, make_guard, wait_ready  # noqa: F401


def _upstream_config() -> ServerConfig:
    return ServerConfig(upstream={"base_url": "http://127.0.0.1:9/v1"})


def test_readyz_is_503_warming_until_the_backbone_is_loaded(make_guard):
    guard = make_guard(ALL_UNSAFE)
    release, warming = threading.Event(), threading.Event()
    real = guard.screen

    def screen(images, **kwargs):
        if images and images[0].label == "warm-up":
            warming.set()
            assert release.wait(60)
        return real(images, **kwargs)

    guard.screen = screen
    with ServerThread(create_app(_upstream_config(), guard=guard)) as server:
        assert warming.wait(60)
        for _ in range(3):
            response = httpx.get(server.url + "/readyz", timeout=10)
            assert response.status_code == 503 and response.json()["status"] == "warming"
            assert httpx.get(server.url + "/healthz", timeout=10).status_code == 200  # alive, just not ready
            time.sleep(0.05)
        release.set()
        wait_ready(server.url)
        assert httpx.get(server.url + "/readyz", timeout=10).json()["status"] == "ready"


def test_a_failed_warm_up_keeps_readyz_at_503_failed(make_guard):
    guard = make_guard(ALL_UNSAFE)

    def screen(images, **kwargs):
        raise RuntimeError("the backbone could not be loaded")

    guard.screen = screen
    with ServerThread(create_app(_upstream_config(), guard=guard)) as server:
        deadline = time.monotonic() + 60
        while True:
            response = httpx.get(server.url + "/readyz", timeout=10)
            assert response.status_code == 503
            if response.json()["status"] == "failed":
                break
            assert time.monotonic() < deadline, "the failed warm-up was never reported"
            time.sleep(0.05)

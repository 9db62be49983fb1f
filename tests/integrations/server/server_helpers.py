"""Helpers for the server tests: shared data, the upstream imitation and a gateway on loopback (imported by conftest and tests)."""

from __future__ import annotations

import base64
import contextlib
import io
import time
from pathlib import Path
from typing import Any, Callable, Iterator

import pytest

pytest.importorskip("fastapi")  # the server extra
pytest.importorskip("uvicorn")

import httpx  # noqa: E402

from guardalign_core.config import GuardConfig, PolicyConfig, PrefixConfig  # noqa: E402
from guardalign_core.guard import ImageGuard  # noqa: E402
from guardalign_core.images import ImageLimits  # noqa: E402
from guardalign_core.testing.tiny_clip import tiny_detector_config  # noqa: E402
from guardalign_integrations.server import ServerConfig, create_app  # noqa: E402
from guardalign_integrations.server.testing import ServerThread, UpstreamRecord, create_upstream_imitation  # noqa: E402

from shared_images import SHARED_DATA, shared_data  # noqa: E402,F401  (one definition for every test directory)

ALL_UNSAFE = 100.0  # above every tiny-CLIP patch score: every patch is masked
NONE_UNSAFE = -1.0  # below every score: nothing is flagged


@pytest.fixture(scope="session")
def make_guard(tiny_clip_checkpoint: Path, embed_cache_dir: Path) -> Callable[..., ImageGuard]:
    """``make_guard(threshold, action="mask", fail_open=False, limits=None, **prefix)`` on the tiny CLIP."""

    def make(threshold: float, action: str = "mask", fail_open: bool = False, limits: dict[str, Any] | None = None, **prefix: Any) -> ImageGuard:
        return ImageGuard(GuardConfig(
            detector=tiny_detector_config(tiny_clip_checkpoint, threshold=threshold, cache_dir=str(embed_cache_dir)),
            policy=PolicyConfig(action=action, fail_open=fail_open),
            images=ImageLimits(**(limits or {})),
            prefix=PrefixConfig(**prefix),
        ))

    return make


@pytest.fixture(scope="session")
def jpeg_bytes() -> bytes:
    # rocket.jpg carries an Adobe RGB profile, so it is forwarded as its sRGB conversion, not as
    # sent (docs/threat-model.md); the tests of "the checked bytes go as they came" need one without.
    from PIL import Image

    buffer = io.BytesIO()
    Image.open(shared_data("benign") / "rocket.jpg").convert("RGB").save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


@pytest.fixture(scope="session")
def png_bytes() -> bytes:
    return (shared_data("benign") / "coffee.png").read_bytes()


def data_url(data: bytes, mime: str) -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def wait_ready(url: str, headers: dict[str, str] | None = None, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        response = httpx.get(url + "/readyz", timeout=5)
        if response.status_code == 200:
            return
        assert response.json()["status"] != "failed", response.text
        time.sleep(0.02)
    raise AssertionError("the server never became ready")


class Gateway:
    """A running gateway in front of a running upstream imitation."""

    def __init__(self, server: ServerThread, upstream: ServerThread | None, record: UpstreamRecord, app: Any) -> None:
        self.server, self.upstream, self.record, self.app = server, upstream, record, app

    @property
    def url(self) -> str:
        return self.server.url

    @property
    def base_url(self) -> str:
        return self.server.url + "/v1"

    @property
    def state(self) -> Any:
        return self.app.state.guardalign

    def forwarded(self) -> list[dict[str, Any]]:
        return [r for r in self.record.requests if r["path"] == "/v1/chat/completions"]


@contextlib.contextmanager
def run_gateway(guard: ImageGuard, *, upstream_url: str | None = None, record: UpstreamRecord | None = None,
                upstream: dict[str, Any] | None = None, **config: Any) -> Iterator[Gateway]:
    """Start the upstream imitation (unless ``upstream_url`` is given) and a gateway in front of it."""
    imitation, record = create_upstream_imitation(record)
    upstream_server = None if upstream_url else ServerThread(imitation).start()
    try:
        base = upstream_url or upstream_server.url + "/v1"
        server_config = ServerConfig(upstream={"base_url": base, **(upstream or {})}, **config)
        app = create_app(server_config, guard=guard)
        with ServerThread(app) as server:
            wait_ready(server.url)
            yield Gateway(server, upstream_server, record, app)
    finally:
        if upstream_server is not None:
            upstream_server.stop()


LITELLM_AS_SENT = {"forward_messages_as_sent": True, "additional_provider_specific_params": {"guardalign_rows": "as_sent"}}
"""The LiteLLM guardrail settings docs/server.md requires: rows as the client sent them, and saying so."""

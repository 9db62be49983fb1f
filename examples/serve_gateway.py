"""GuardAlign as an OpenAI-compatible gateway, offline: upstream imitation + gateway + the openai SDK.

Runs with nothing but this repository (tiny random CLIP, no network, loopback only):

    python examples/serve_gateway.py

In production the gateway is one command in front of any OpenAI-compatible API:

    guardalign-serve --upstream https://api.openai.com/v1 --guard fast-cpu

Tiny-CLIP scores are meaningless; the threshold below makes every patch "unsafe" so that the
masking path is visible.
"""

from __future__ import annotations

import base64
import io
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import httpx  # noqa: E402
from PIL import Image  # noqa: E402

from guardalign_core.config import GuardConfig  # noqa: E402
from guardalign_core.guard import ImageGuard  # noqa: E402
from guardalign_core.testing.tiny_clip import save_tiny_clip_checkpoint, tiny_detector_config  # noqa: E402
from guardalign_integrations.server import ServerConfig, create_app  # noqa: E402
from guardalign_integrations.server.testing import ServerThread, create_upstream_imitation  # noqa: E402


def demo_image() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (96, 96), (200, 40, 40)).save(buffer, format="PNG")
    return buffer.getvalue()


def main() -> None:
    import openai

    tmp = Path(tempfile.mkdtemp(prefix="guardalign-gateway-"))
    checkpoint = save_tiny_clip_checkpoint(tmp / "tiny-clip.pt")
    guard = ImageGuard(GuardConfig(detector=tiny_detector_config(checkpoint, threshold=100.0, cache_dir=str(tmp))))
    imitation, record = create_upstream_imitation()
    with ServerThread(imitation) as upstream:
        app = create_app(ServerConfig(upstream={"base_url": upstream.url + "/v1"}, guard="tiny-random"), guard=guard)
        with ServerThread(app) as gateway:
            while httpx.get(gateway.url + "/readyz").status_code != 200:  # the CLIP warms up at start-up
                time.sleep(0.05)
            client = openai.OpenAI(base_url=gateway.url + "/v1", api_key="unused")
            url = "data:image/png;base64," + base64.b64encode(demo_image()).decode()
            raw = client.chat.completions.with_raw_response.create(
                model="any-model",
                messages=[{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                       {"type": "image_url", "image_url": {"url": url}}]}],
            )
            print("answer:", raw.parse().choices[0].message.content)  # noqa: T201
            print("decision header:", raw.headers["x-guardalign-decision"])  # noqa: T201
            forwarded = record.requests[-1]["body"]["messages"]
            image = next(p for m in forwarded if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image_url")
            print("the upstream received a masked PNG:", image["image_url"]["url"][:40] + "...")  # noqa: T201
            stream = client.chat.completions.create(model="any-model", messages=[{"role": "user", "content": "hi"}], stream=True)
            print("streamed:", "".join(c.choices[0].delta.content or "" for c in stream if c.choices))  # noqa: T201


if __name__ == "__main__":
    main()

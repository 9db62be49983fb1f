"""LiteLLM's Generic Guardrail API (through LiteLLM's own classes, in-process) and the native /v1/scan."""

from __future__ import annotations

import base64
import io
import os

import httpx
import pytest
from PIL import Image

from server_helpers import ALL_UNSAFE, LITELLM_AS_SENT, NONE_UNSAFE, data_url, jpeg_bytes, make_guard, png_bytes, run_gateway  # noqa: F401

pytestmark = pytest.mark.filterwarnings("ignore:.*ReadOnly.*:UserWarning")  # LiteLLM's own TypedDicts under pydantic


@pytest.fixture(scope="module")
def litellm_classes():
    os.environ["LITELLM_LOCAL_MODEL_COST_MAP"] = "True"  # no network: LiteLLM otherwise fetches its price list
    pytest.importorskip("litellm")
    from litellm.llms.openai.chat.guardrail_translation.handler import OpenAIChatCompletionsHandler
    from litellm.proxy.guardrails.guardrail_hooks.generic_guardrail_api import GenericGuardrailAPI

    return GenericGuardrailAPI, OpenAIChatCompletionsHandler


def chat_data(png: bytes) -> dict:
    return {"model": "gpt-x", "messages": [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "text", "text": "what is this?"},
                                     {"type": "image_url", "image_url": {"url": data_url(png, "image/png"), "detail": "low"}}]},
    ]}


async def test_litellm_masks_images_in_the_request_it_forwards(make_guard, png_bytes, litellm_classes):
    GenericGuardrailAPI, Handler = litellm_classes
    with run_gateway(make_guard(ALL_UNSAFE), api_keys=["gk"]) as gw:
        guardrail = GenericGuardrailAPI(**LITELLM_AS_SENT, api_base=gw.url, api_key="gk", guardrail_name="guardalign", event_hook="pre_call")
        data = chat_data(png_bytes)
        original = data_url(png_bytes, "image/png")
        out = await Handler().process_input_messages(data, guardrail)
    user = out["messages"][1]
    assert out["messages"][0] == {"role": "system", "content": "Be brief."}
    assert user["content"][0] == {"type": "text", "text": "what is this?"}
    url = user["content"][1]["image_url"]["url"]
    assert url != original and url.startswith("data:image/png;base64,")
    assert user["content"][1]["image_url"]["detail"] == "low"
    masked = Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))
    assert masked.convert("RGB").getextrema() == ((0, 0), (0, 0), (0, 0))


async def test_litellm_allows_and_blocks(make_guard, png_bytes, litellm_classes):
    GenericGuardrailAPI, Handler = litellm_classes
    from litellm.exceptions import GuardrailRaisedException

    with run_gateway(make_guard(NONE_UNSAFE)) as gw:
        guardrail = GenericGuardrailAPI(**LITELLM_AS_SENT, api_base=gw.url, guardrail_name="guardalign", event_hook="pre_call")
        data = chat_data(png_bytes)
        out = await Handler().process_input_messages(data, guardrail)
        assert out["messages"] == chat_data(png_bytes)["messages"]
    with run_gateway(make_guard(ALL_UNSAFE, action="block")) as gw:
        guardrail = GenericGuardrailAPI(**LITELLM_AS_SENT, api_base=gw.url, guardrail_name="guardalign", event_hook="pre_call")
        with pytest.raises(GuardrailRaisedException, match="GuardAlign"):
            await Handler().process_input_messages(chat_data(png_bytes), guardrail)


async def test_litellm_wrong_key_fails_closed(make_guard, png_bytes, litellm_classes):
    GenericGuardrailAPI, Handler = litellm_classes
    with run_gateway(make_guard(NONE_UNSAFE), api_keys=["gk"]) as gw:
        guardrail = GenericGuardrailAPI(**LITELLM_AS_SENT, api_base=gw.url, api_key="wrong", guardrail_name="guardalign", event_hook="pre_call")
        with pytest.raises(Exception, match="Generic Guardrail API failed"):
            await Handler().process_input_messages(chat_data(png_bytes), guardrail)


def test_guardrail_endpoint_contract(make_guard, png_bytes):
    with run_gateway(make_guard(ALL_UNSAFE)) as gw:
        url = gw.url + "/beta/litellm_basic_guardrail_api"
        # images only (no structured messages) that need masking: blocked, since LiteLLM never
        # writes a returned images list back (test_server_litellm_attacks.py)
        answer = httpx.post(url, json={"input_type": "request", "texts": ["hi"], "images": [data_url(png_bytes, "image/png")],
                                       "request_data": {}}).json()
        assert answer["action"] == "BLOCKED" and "images[0]" in answer["blocked_reason"]
        assert httpx.post(url, json={"input_type": "request", "texts": ["hi"], "request_data": {}}).json() == {"action": "NONE"}
        # what cannot be screened is refused (LiteLLM would otherwise forward it)
        remote = httpx.post(url, json={"input_type": "request", "texts": ["x"], "images": ["https://example.com/a.png"], "request_data": {}}).json()
        assert remote["action"] == "BLOCKED"
        assert gw.forwarded() == []


def test_scan_json_and_multipart(make_guard, png_bytes, jpeg_bytes):
    with run_gateway(make_guard(ALL_UNSAFE)) as gw:
        response = httpx.post(gw.base_url + "/scan", json={"images": [data_url(png_bytes, "image/png"), {"image": base64.b64encode(jpeg_bytes).decode(), "name": "x"}],
                                                            "return_images": True, "include_scores": True})
        assert response.status_code == 200, response.text
        body = response.json()
        assert body["decision"] == "mask" and response.headers["x-guardalign-decision"] == "mask"
        first = body["images"][0]
        assert first["unsafe"] and first["unsafe_boxes"] and first["scores"] and first["sanitized_image"].startswith("data:image/png")
        assert first["fired_categories"]
        files = [("images", ("a.png", png_bytes, "image/png")), ("images", ("b.jpg", jpeg_bytes, "image/jpeg"))]
        multipart = httpx.post(gw.base_url + "/scan", files=files, data={"return_images": "false"}).json()
        assert [i["decision"] for i in multipart["images"]] == ["mask", "mask"]
        assert "sanitized_image" not in multipart["images"][0] and "scores" not in multipart["images"][0]
        # a local file is never read: the core's verdict is status=error, blocked (fail-closed), nothing of the file in it
        bad = httpx.post(gw.base_url + "/scan", json={"images": ["file:///etc/hosts"]})
        assert bad.status_code == 200 and bad.headers["x-guardalign-decision"] == "block; status=error"
        verdict = bad.json()["images"][0]
        assert verdict["status"] == "error" and verdict["decision"] == "block" and verdict["forward"] == "nothing"
        assert "localhost" not in bad.text and "127.0.0.1" not in bad.text
        assert gw.forwarded() == []


def test_ops_endpoints(make_guard, png_bytes):
    with run_gateway(make_guard(ALL_UNSAFE)) as gw:
        assert httpx.get(gw.url + "/healthz").json() == {"status": "ok"}
        assert httpx.get(gw.url + "/readyz").json()["status"] == "ready"
        assert gw.state.guard.detector_loaded  # warmed at start-up, before any request
        httpx.post(gw.base_url + "/chat/completions", json=chat_data(png_bytes))
        text = httpx.get(gw.url + "/metrics").text
        assert 'guardalign_decisions_total{decision="mask"} 1.0' in text
        assert "guardalign_images_scanned_total 1.0" in text
        assert 'guardalign_requests_total{endpoint="/v1/chat/completions",status="200"} 1.0' in text
        assert "guardalign_upstream_seconds_count 1.0" in text and "guardalign_scan_seconds_count 1.0" in text

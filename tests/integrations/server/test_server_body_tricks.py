"""Body tricks: JSON an upstream reads differently from the gateway, and images outside ``messages``.

Each test is the attack: a body whose image would reach the model unscreened (the guard here
blocks every image it sees), sent as raw bytes; the gateway must answer 400 with nothing forwarded.
"""

from __future__ import annotations

import base64
import json

import httpx
import pytest

openai = pytest.importorskip("openai")

from server_helpers import ALL_UNSAFE, data_url, make_guard, png_bytes, run_gateway  # noqa: E402,F401


@pytest.fixture(scope="module")
def gateway(make_guard):
    with run_gateway(make_guard(ALL_UNSAFE, action="block")) as gw:
        yield gw


@pytest.fixture(scope="module")
def image(png_bytes) -> str:
    return data_url(png_bytes, "image/png")


TEXT = [{"role": "user", "content": "hi"}]


def J(value) -> bytes:
    return json.dumps(value).encode()


def send(gw, raw: bytes) -> httpx.Response:
    before = len(gw.forwarded())
    response = httpx.post(gw.base_url + "/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=60)
    assert len(gw.forwarded()) == before, "the body reached the upstream"
    return response


def image_messages(url: str) -> bytes:
    return J([{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}])


@pytest.mark.parametrize("key", [
    b'"Messages"',
    b'"MESSAGES"',
    b'"me\\u017f\\u017fages"',  # U+017F long s: Go's case folding reads it as "s"
    "\"me\u017f\u017fages\"".encode(),  # the same, as raw UTF-8
])
def test_a_case_folded_twin_of_messages_is_refused(gateway, image, key):
    raw = b'{"model":"m","messages":' + J(TEXT) + b"," + key + b":" + image_messages(image) + b"}"
    response = send(gateway, raw)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "invalid_json" and "letter case" in error["message"]


def test_a_kelvin_sign_twin_is_refused_in_a_nested_object(gateway, image):
    # U+212A KELVIN SIGN folds to "k"; a part {"type": "text", "\u212aind": ...} vs "kind" is one key to Go
    part = b'{"type":"text","text":"x","kind":"a","\\u212aind":"b"}'
    raw = b'{"model":"m","messages":[{"role":"user","content":[' + part + b"]}]}"
    response = send(gateway, raw)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"


def test_case_folded_twins_inside_a_part_are_refused(gateway, image):
    raw = J({"model": "m", "messages": [{"role": "user", "content": [
        {"type": "text", "text": "x", "Type": "image_url", "image_url": {"url": "data:,", "URL": image}}]}]})
    response = send(gateway, raw)
    assert response.status_code == 400


def test_deep_nesting_is_a_400_not_a_500(gateway):
    raw = b'{"model":"m","messages":' + J(TEXT) + b',"x":' + b"[" * 200_000 + b"]" * 200_000 + b"}"
    response = send(gateway, raw)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "invalid_json"
    assert "Traceback" not in response.text and "/" not in response.json()["error"]["message"]


@pytest.mark.parametrize("field", ["input", "images", "prompt_images"])
def test_an_image_in_an_unknown_top_level_field_is_refused(gateway, image, field):
    value = {
        "input": [{"role": "user", "content": [{"type": "input_image", "image_url": image}]}],
        "images": [image],
        "prompt_images": [base64.b64encode(base64.b64decode(image.split(",", 1)[1])[:40]).decode()],  # short raw base64
    }[field]
    response = send(gateway, J({"model": "m", "messages": TEXT, field: value}))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "guardalign_unsupported_content" and error["param"] == field


def test_unknown_scalar_top_level_fields_still_pass(gateway):
    before = len(gateway.forwarded())
    client = openai.OpenAI(base_url=gateway.base_url, api_key="x")
    client.chat.completions.create(model="m", messages=TEXT, extra_body={"keep_alive": "5m", "options": {"num_ctx": 2048}, "think": True})
    assert len(gateway.forwarded()) == before + 1


def test_the_sdk_cannot_smuggle_an_image_through_extra_body(gateway, image):
    client = openai.OpenAI(base_url=gateway.base_url, api_key="x", max_retries=0)
    before = len(gateway.forwarded())
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="m", messages=TEXT, extra_body={"images": [image]})
    assert len(gateway.forwarded()) == before


def test_inline_media_in_a_known_message_field_is_refused(gateway, image):
    raw = J({"model": "m", "messages": [{"role": "assistant", "content": "x", "audio": {"id": "a", "data": image}}, *TEXT]})
    response = send(gateway, raw)
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[0].audio"


def test_short_base64_in_an_unknown_message_field_is_refused(gateway):
    from PIL import Image
    import io

    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, "PNG")
    b64 = base64.b64encode(buffer.getvalue()).decode()
    assert len(b64) < 256
    response = send(gateway, J({"model": "m", "messages": [{"role": "user", "content": "x", "images": [b64]}]}))
    assert response.status_code == 400 and response.json()["error"]["param"] == "messages[0].images"


def test_an_assistant_audio_reference_still_passes(gateway):
    before = len(gateway.forwarded())
    body = {"model": "m", "messages": [*TEXT, {"role": "assistant", "content": None, "audio": {"id": "audio_abc123"}}, *TEXT]}
    response = httpx.post(gateway.base_url + "/chat/completions", json=body, timeout=60)
    assert response.status_code == 200, response.text
    assert len(gateway.forwarded()) == before + 1


def test_image_bytes_sent_as_input_audio_are_refused(gateway, png_bytes):
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(png_bytes).decode(), "format": "wav"}}
    response = send(gateway, J({"model": "m", "messages": [{"role": "user", "content": [part]}]}))
    assert response.status_code == 400 and response.json()["error"]["code"] == "guardalign_unsupported_content"


def test_real_audio_still_passes(gateway):
    wav = b"RIFF\x24\x00\x00\x00WAVEfmt " + bytes(40)
    part = {"type": "input_audio", "input_audio": {"data": base64.b64encode(wav).decode(), "format": "wav"}}
    before = len(gateway.forwarded())
    response = httpx.post(gateway.base_url + "/chat/completions", json={"model": "m", "messages": [{"role": "user", "content": [part]}]}, timeout=60)
    assert response.status_code == 200 and len(gateway.forwarded()) == before + 1


@pytest.mark.parametrize("encode", [base64.urlsafe_b64encode, lambda b: b"\n".join(base64.encodebytes(b).split(b"\n"))])
def test_image_bytes_as_input_audio_are_refused_in_any_base64_spelling(gateway, png_bytes, encode):
    data = encode(png_bytes).decode()
    part = {"type": "input_audio", "input_audio": {"data": data, "format": "wav"}}
    response = send(gateway, J({"model": "m", "messages": [{"role": "user", "content": [part]}]}))
    assert response.status_code == 400 and response.json()["error"]["code"] == "guardalign_unsupported_content"

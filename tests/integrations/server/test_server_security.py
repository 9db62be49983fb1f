"""Attacks and limits: what the gateway must refuse, with nothing forwarded upstream."""

from __future__ import annotations

import base64
import io
import struct
import threading
import time
import zlib

import httpx
import pytest

openai = pytest.importorskip("openai")

from PIL import Image  # noqa: E402

from guardalign_integrations.server import ServerConfig  # noqa: E402
from server_helpers import ALL_UNSAFE, NONE_UNSAFE, data_url, jpeg_bytes, make_guard, png_bytes, run_gateway  # noqa: E402,F401


@pytest.fixture(scope="module")
def gateway(make_guard):
    with run_gateway(make_guard(NONE_UNSAFE)) as gw:
        yield gw


def post(gw, body, timeout: float = 30) -> httpx.Response:
    return httpx.post(gw.base_url + "/chat/completions", json=body, timeout=timeout)


def bomb_png(width: int = 30_000, height: int = 30_000) -> bytes:
    """A tiny PNG whose header claims 900 megapixels (decompression bomb)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\x00" * 1000)) + chunk(b"IEND", b"")


def user_with(part: dict) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}, part]}]}


@pytest.mark.parametrize("name,url", [
    ("svg disguised as png", "data:image/png;base64," + base64.b64encode(b"<svg xmlns='http://www.w3.org/2000/svg'><script>x</script></svg>").decode()),
    ("decompression bomb", "data:image/png;base64," + base64.b64encode(bomb_png()).decode()),
    ("truncated jpeg", None),
])
def test_hostile_image_is_refused_and_nothing_forwarded(gateway, jpeg_bytes, name, url):
    url = url or data_url(jpeg_bytes[:200], "image/jpeg")
    before = len(gateway.forwarded())
    response = post(gateway, user_with({"type": "image_url", "image_url": {"url": url}}))
    assert response.status_code == 400, response.text
    assert response.json()["error"]["code"] == "guardalign_image_unreadable"
    assert response.headers["x-guardalign-decision"] == "block; status=error"
    assert len(gateway.forwarded()) == before


@pytest.mark.parametrize("part", [
    {"type": "file", "file": {"file_data": "data:application/pdf;base64,JVBERi0=", "filename": "x.pdf"}},
    {"type": "input_image", "image_url": "data:image/png;base64,iVBORw0KGgo="},
    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "iVBORw0KGgo="}},
    {"type": "text", "text": "hi", "image_url": {"url": "https://example.com/x.png"}},
    {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo=", "fallback": "https://evil.example/x.png"}},
])
def test_unknown_data_carrying_parts_are_refused(gateway, part):
    before = len(gateway.forwarded())
    response = post(gateway, user_with(part))
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["code"] in ("guardalign_unsupported_content", "guardalign_invalid_image")
    assert len(gateway.forwarded()) == before


def test_unknown_part_type_is_named_in_the_error(gateway):
    response = post(gateway, user_with({"type": "file", "file": {"file_id": "file-abc"}}))
    assert response.status_code == 400 and "'file'" in response.json()["error"]["message"]


def test_unknown_part_without_data_is_forwarded(gateway):
    before = len(gateway.forwarded())
    body = user_with({"type": "marker", "label": "x"})
    assert post(gateway, body).status_code == 200
    assert gateway.forwarded()[before]["body"]["messages"] == body["messages"]


def test_message_level_images_field_is_refused(gateway, png_bytes):
    # Ollama's native shape: images beside the content would reach a model unscreened
    body = {"model": "m", "messages": [{"role": "user", "content": "hi", "images": [base64.b64encode(png_bytes).decode()]}]}
    before = len(gateway.forwarded())
    response = post(gateway, body)
    assert response.status_code == 400 and "'images'" in response.json()["error"]["message"]
    assert len(gateway.forwarded()) == before


@pytest.mark.parametrize("url", ["https://example.com/cat.png", "file:///etc/passwd", "/etc/passwd"])
def test_remote_and_local_sources_are_refused_by_default(gateway, url):
    before = len(gateway.forwarded())
    response = post(gateway, user_with({"type": "image_url", "image_url": {"url": url}}))
    assert response.status_code == 400
    error = response.json()["error"]
    # a bare path is never looked up on disk: read as (invalid) base64, it is not an image
    assert error["code"] in ("guardalign_invalid_image", "guardalign_image_unreadable")
    assert "passwd" not in error["message"] and "no such file" not in error["message"]
    assert len(gateway.forwarded()) == before


def test_unsafe_image_blocked_with_refusal_or_error(make_guard, png_bytes):
    body = user_with({"type": "image_url", "image_url": {"url": data_url(png_bytes, "image/png")}})
    with run_gateway(make_guard(ALL_UNSAFE, action="block")) as gw:
        client = openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0)
        raw = client.chat.completions.with_raw_response.create(**body)
        completion = raw.parse()
        assert completion.choices[0].finish_reason == "content_filter"
        assert "unsafe" in completion.choices[0].message.content
        assert raw.headers["x-guardalign-decision"] == "block"
        stream = client.chat.completions.create(**body, stream=True)
        chunks = list(stream)
        assert chunks[-1].choices[0].finish_reason == "content_filter"
        assert gw.forwarded() == []
    with run_gateway(make_guard(ALL_UNSAFE, action="block"), blocked_response="error") as gw:
        client = openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0)
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(**body)
        assert err.value.code == "guardalign_blocked"
        assert gw.forwarded() == []


def test_api_key_required_and_checked(make_guard):
    with run_gateway(make_guard(NONE_UNSAFE), api_keys=["s3cret"]) as gw:
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=gw.base_url, api_key="wrong", max_retries=0).chat.completions.create(**body)
        assert post(gw, body).status_code == 401
        assert httpx.get(gw.url + "/metrics").status_code == 401
        assert httpx.get(gw.url + "/readyz").status_code == 200  # probes need no key
        assert gw.forwarded() == []
        ok = openai.OpenAI(base_url=gw.base_url, api_key="s3cret", max_retries=0).chat.completions.create(**body)
        assert ok.choices[0].message.content
        assert "guardalign_rejections_total{reason=\"auth\"} 3.0" in httpx.get(gw.url + "/metrics", headers={"x-api-key": "s3cret"}).text


def test_non_loopback_bind_requires_a_key():
    with pytest.raises(ValueError, match="requires api_keys"):
        ServerConfig(host="0.0.0.0", upstream={"base_url": "http://127.0.0.1:1/v1"})
    assert ServerConfig(host="0.0.0.0", api_keys=["k"], upstream={"base_url": "http://127.0.0.1:1/v1"}).host == "0.0.0.0"


def test_body_size_limit(make_guard, png_bytes):
    with run_gateway(make_guard(NONE_UNSAFE), max_body_bytes=4096) as gw:
        body = user_with({"type": "image_url", "image_url": {"url": data_url(png_bytes, "image/png")}})
        response = post(gw, body)
        assert response.status_code == 413 and response.json()["error"]["code"] == "request_too_large"
        # chunked upload without a content length is cut off too
        payload = httpx.Request("POST", "/", json=body).content
        chunked = httpx.post(gw.base_url + "/chat/completions", content=iter([payload[i:i + 1000] for i in range(0, len(payload), 1000)]),
                             headers={"content-type": "application/json"})
        assert chunked.status_code == 413
        assert gw.forwarded() == []


def test_image_budget(make_guard, png_bytes):
    with run_gateway(make_guard(NONE_UNSAFE, limits={"max_images": 1})) as gw:
        part = {"type": "image_url", "image_url": {"url": data_url(png_bytes, "image/png")}}
        body = {"model": "m", "messages": [{"role": "user", "content": [part, part]}]}
        response = post(gw, body)
        assert response.status_code == 400 and response.json()["error"]["code"] == "guardalign_image_budget"
        assert gw.forwarded() == []
    size = Image.open(io.BytesIO(png_bytes)).size
    with run_gateway(make_guard(NONE_UNSAFE, limits={"max_total_pixels": size[0] * size[1] + 1})) as gw:
        response = post(gw, {"model": "m", "messages": [{"role": "user", "content": [part, part]}]})
        assert response.status_code == 400 and "pixels" in response.json()["error"]["message"]


def test_full_queue_answers_429_with_retry_after(make_guard):
    with run_gateway(make_guard(NONE_UNSAFE), max_concurrency=1, max_queue=1) as gw:
        gw.record.response_delay_s = 1.0
        body = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        results: list[int] = []
        threads = [threading.Thread(target=lambda: results.append(post(gw, body).status_code)) for _ in range(2)]
        for t in threads:
            t.start()
            time.sleep(0.15)  # the first holds the slot, the second waits in the queue
        third = post(gw, body)
        for t in threads:
            t.join()
        assert third.status_code == 429
        assert third.headers["retry-after"] == "1" and third.json()["error"]["code"] == "server_busy"
        assert sorted(results) == [200, 200]
        with pytest.raises(openai.RateLimitError):
            gw.record.response_delay_s = 1.0
            blocker = threading.Thread(target=lambda: post(gw, body))
            blocker2 = threading.Thread(target=lambda: post(gw, body))
            blocker.start(), time.sleep(0.15), blocker2.start(), time.sleep(0.15)
            try:
                openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0).chat.completions.create(**body)
            finally:
                blocker.join(), blocker2.join()


def test_upstream_down_is_502(make_guard):
    with run_gateway(make_guard(NONE_UNSAFE), upstream_url="http://127.0.0.1:9/v1") as gw:
        with pytest.raises(openai.InternalServerError) as err:
            openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0).chat.completions.create(
                model="m", messages=[{"role": "user", "content": "hi"}])
        assert err.value.status_code == 502 and err.value.code == "upstream_unreachable"


def test_upstream_slow_is_504(make_guard):
    with run_gateway(make_guard(NONE_UNSAFE), upstream={"read_timeout_s": 0.3}) as gw:
        gw.record.response_delay_s = 3.0
        response = post(gw, {"model": "m", "messages": [{"role": "user", "content": "hi"}]})
        assert response.status_code == 504 and response.json()["error"]["code"] == "upstream_timeout"


def test_client_disconnect_cancels_the_upstream_request(make_guard):
    with run_gateway(make_guard(NONE_UNSAFE)) as gw:
        gw.record.response_delay_s = 5.0
        with pytest.raises(httpx.ReadTimeout):
            post(gw, {"model": "m", "messages": [{"role": "user", "content": "hi"}]}, timeout=0.5)
        deadline = time.monotonic() + 4
        while gw.record.cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gw.record.cancelled == 1  # the upstream saw its client go long before its 5 s answer


def test_client_leaving_a_stream_cancels_the_upstream_stream(make_guard):
    with run_gateway(make_guard(NONE_UNSAFE)) as gw:
        gw.record.stream_chunks = [f"t{i} " for i in range(200)]
        gw.record.chunk_delay_s = 0.02
        with httpx.stream("POST", gw.base_url + "/chat/completions", timeout=10,
                          json={"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}) as response:
            next(response.iter_raw())
        deadline = time.monotonic() + 4
        while gw.record.cancelled == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert gw.record.cancelled == 1
        assert gw.record.sent_chunks < 200


def test_fail_open_forwards_an_unreadable_image_as_sent_and_says_so(make_guard, jpeg_bytes):
    # issue 10: "as sent" only under fail_open; the decision header and the summary say the check did not run
    broken = data_url(jpeg_bytes[:200], "image/jpeg")
    body = user_with({"type": "image_url", "image_url": {"url": broken, "detail": "low"}})
    with run_gateway(make_guard(NONE_UNSAFE, fail_open=True)) as gw:
        raw = openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0).chat.completions.with_raw_response.create(**body)
        assert raw.headers["x-guardalign-decision"].endswith("; status=error")
        summary = raw.http_response.json()["guardalign"]
        assert summary["status"] == "error" and summary["images"][0]["forward"] == "as_sent"
        assert gw.forwarded()[-1]["body"]["messages"] == body["messages"]  # the part exactly as the caller sent it
    with run_gateway(make_guard(NONE_UNSAFE)) as gw:  # the same request without fail_open: refused, nothing forwarded
        response = post(gw, body)
        assert response.status_code == 400 and response.headers["x-guardalign-decision"] == "block; status=error"
        assert gw.forwarded() == []


async def test_disconnect_watcher_leaves_no_stray_cancellation():
    """The client leaving just as the upstream answers: either outcome, but the handler's later awaits still run."""
    import asyncio

    from guardalign_integrations.server.app import ClientGone, until_disconnect

    class Leaving:
        def __init__(self, delay: float) -> None:
            self.delay = delay

        async def receive(self) -> dict:
            await asyncio.sleep(self.delay)
            return {"type": "http.disconnect"}

    async def answer(delay: float) -> str:
        await asyncio.sleep(delay)
        return "answer"

    outcomes = set()
    for delay in (0.0, 0.001, 0.002, 0.005):
        try:
            outcomes.add(await until_disconnect(Leaving(delay), answer(0.002)))
        except ClientGone:
            outcomes.add("gone")
        await asyncio.sleep(0.01)  # a stray cancel request would raise CancelledError here
    assert await until_disconnect(Leaving(1.0), answer(0.0)) == "answer"
    with pytest.raises(ClientGone):
        await until_disconnect(Leaving(0.0), answer(1.0))
    await asyncio.sleep(0.01)
    assert outcomes <= {"answer", "gone"}


@pytest.mark.parametrize("raw", [
    # the image hides in the first copy of a repeated key: screened as the last copy here, read as the first by some upstreams
    b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "IMAGE"}}]}], '
    b'"messages": [{"role": "user", "content": "hi"}]}',
    b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "IMAGE", "url": "data:,x"}}]}]}',
    b'{"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "hi", "type": "image_url", "image_url": {"url": "IMAGE"}}]}]}',
])
def test_repeated_json_keys_are_refused_not_forwarded(gateway, png_bytes, raw):
    raw = raw.replace(b"IMAGE", data_url(png_bytes, "image/png").encode())
    before = len(gateway.forwarded())
    response = httpx.post(gateway.base_url + "/chat/completions", content=raw, headers={"content-type": "application/json"}, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_json"
    assert "repeats a key" in response.json()["error"]["message"]
    assert len(gateway.forwarded()) == before

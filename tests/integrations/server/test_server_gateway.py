"""The OpenAI-compatible gateway, through real clients (openai SDK, langchain-openai) and a recording upstream."""

from __future__ import annotations

import base64
import io
import threading

import pytest

openai = pytest.importorskip("openai")

from PIL import Image  # noqa: E402

from server_helpers import ALL_UNSAFE, NONE_UNSAFE, data_url, jpeg_bytes, make_guard, png_bytes, run_gateway  # noqa: E402,F401 (fixtures)

TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "Look it up.",
                                           "parameters": {"type": "object", "properties": {"x": {"type": "integer"}}, "required": ["x"]}}}]


def image_message(url: str, text: str = "What is in this picture?", detail: str = "low") -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": text}, {"type": "image_url", "image_url": {"url": url, "detail": detail}}]}]


@pytest.fixture(scope="module")
def masking_gateway(make_guard):
    with run_gateway(make_guard(ALL_UNSAFE)) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def allowing_gateway(make_guard):
    with run_gateway(make_guard(NONE_UNSAFE)) as gateway:
        yield gateway


def client(gateway, **kwargs) -> "openai.OpenAI":
    return openai.OpenAI(base_url=gateway.base_url, api_key="caller-key", max_retries=0, **kwargs)


def test_text_only_request_is_forwarded_untouched(allowing_gateway):
    gateway = allowing_gateway
    before = len(gateway.forwarded())
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say hi. ünïcödé"}]
    raw = client(gateway).chat.completions.with_raw_response.create(model="m", messages=messages, temperature=0.3)
    completion = raw.parse()
    assert completion.choices[0].message.content == "Hello from the upstream."
    assert raw.headers["x-guardalign-decision"] == "allow"
    assert raw.http_response.json()["guardalign"]["decision"] == "allow"
    sent = gateway.forwarded()[before:]
    assert len(sent) == 1
    assert sent[0]["body"]["messages"] == messages
    assert sent[0]["body"]["temperature"] == 0.3
    # key_mode "server" without a server key: the caller's key is never forwarded
    assert "authorization" not in sent[0]["headers"]


def test_allowed_image_arrives_byte_identical(allowing_gateway, jpeg_bytes):
    gateway = allowing_gateway
    url = data_url(jpeg_bytes, "image/jpeg")
    before = len(gateway.forwarded())
    raw = client(gateway).chat.completions.with_raw_response.create(model="m", messages=image_message(url))
    assert raw.headers["x-guardalign-decision"] == "allow"
    body = gateway.forwarded()[before]["body"]
    assert body["messages"] == image_message(url)  # no safety prompt when nothing is unsafe (when_unsafe policy)


def test_mislabelled_image_goes_with_the_type_of_its_bytes(allowing_gateway, jpeg_bytes):
    # JPEG bytes declared as PNG: the upstream gets exactly the checked bytes, named by what they are
    gateway = allowing_gateway
    before = len(gateway.forwarded())
    client(gateway).chat.completions.create(model="m", messages=image_message(data_url(jpeg_bytes, "image/png")))
    body = gateway.forwarded()[before]["body"]
    part = next(p for m in body["messages"] if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image_url")
    assert part["image_url"]["url"] == data_url(jpeg_bytes, "image/jpeg")


def test_masked_image_arrives_sanitised_in_openai_shape(masking_gateway, jpeg_bytes):
    gateway = masking_gateway
    url = data_url(jpeg_bytes, "image/jpeg")
    before = len(gateway.forwarded())
    raw = client(gateway).chat.completions.with_raw_response.create(model="m", messages=image_message(url, detail="high"))
    assert raw.headers["x-guardalign-decision"] == "mask"
    summary = raw.http_response.json()["guardalign"]
    assert summary["decision"] == "mask" and summary["images"][0]["unsafe"] is True
    messages = gateway.forwarded()[before]["body"]["messages"]
    # the safety prompt is put first; the user's message keeps its text and part order
    assert messages[0]["role"] == "system" and "harmful" in messages[0]["content"]
    user = messages[1]
    assert user["content"][0] == {"type": "text", "text": "What is in this picture?"}
    part = user["content"][1]
    assert part["type"] == "image_url" and part["image_url"]["detail"] == "high"
    # the core keeps a sanitised JPEG a JPEG; the data URL names the format of its bytes
    assert part["image_url"]["url"].startswith("data:image/jpeg;base64,")
    sanitised = base64.b64decode(part["image_url"]["url"].split(",", 1)[1])
    masked = Image.open(io.BytesIO(sanitised))
    original = Image.open(io.BytesIO(jpeg_bytes))
    assert masked.format == "JPEG" and masked.size == original.size
    assert max(high for _, high in masked.convert("RGB").getextrema()) <= 2  # every patch unsafe: all black (Eq. 11), up to JPEG noise


def test_streaming_chunks_are_relayed_as_they_arrive(allowing_gateway):
    gateway = allowing_gateway
    release = threading.Event()
    gateway.record.release_last_chunk = release
    try:
        stream = client(gateway).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
        chunks = iter(stream)
        first = next(chunks)
        # the upstream is holding its last chunk back: the first arrived before the upstream finished
        assert first.choices[0].delta.content == "Hello"
        assert gateway.record.sent_chunks < len(gateway.record.stream_chunks)
        release.set()
        rest = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    finally:
        gateway.record.release_last_chunk = None
        release.set()
    assert "Hello" + "".join(rest) == "Hello from the upstream."


def test_streaming_response_carries_the_decision_header(masking_gateway, png_bytes):
    gateway = masking_gateway
    with client(gateway).chat.completions.with_streaming_response.create(
        model="m", messages=image_message(data_url(png_bytes, "image/png")), stream=True
    ) as response:
        assert response.headers["x-guardalign-decision"] == "mask"
        text = "".join(c.choices[0].delta.content or "" for c in response.parse() if c.choices)
    assert text == "Hello from the upstream."


async def test_async_client_plain_and_streaming(masking_gateway, png_bytes):
    gateway = masking_gateway
    aclient = openai.AsyncOpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)
    completion = await aclient.chat.completions.create(model="m", messages=image_message(data_url(png_bytes, "image/png")))
    assert completion.choices[0].message.content == "Hello from the upstream."
    stream = await aclient.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], stream=True)
    parts = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert "".join(parts) == "Hello from the upstream."
    await aclient.close()


def test_tools_and_response_format_round_trip(allowing_gateway):
    gateway = allowing_gateway
    before = len(gateway.forwarded())
    fmt = {"type": "json_schema", "json_schema": {"name": "answer", "schema": {"type": "object"}}}
    completion = client(gateway).chat.completions.create(
        model="m", messages=[{"role": "user", "content": "look up 1"}], tools=TOOLS, tool_choice="auto", response_format=fmt
    )
    call = completion.choices[0].message.tool_calls[0]
    assert call.function.name == "lookup" and call.function.arguments == '{"x": 1}'
    body = gateway.forwarded()[before]["body"]
    assert body["tools"] == TOOLS and body["tool_choice"] == "auto" and body["response_format"] == fmt
    # and streamed
    stream = client(gateway).chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}], tools=TOOLS, stream=True)
    calls = [tc for c in stream if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "lookup"


def test_langchain_chat_openai_through_the_gateway(masking_gateway, png_bytes):
    lc_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage

    gateway = masking_gateway
    before = len(gateway.forwarded())
    llm = lc_openai.ChatOpenAI(base_url=gateway.base_url, api_key="k", model="m", max_retries=0)
    message = HumanMessage(content=[{"type": "text", "text": "describe"},
                                    {"type": "image_url", "image_url": {"url": data_url(png_bytes, "image/png")}}])
    answer = llm.invoke([message])
    assert answer.content == "Hello from the upstream."
    forwarded = gateway.forwarded()[before]["body"]["messages"]
    image = next(p for m in forwarded if isinstance(m["content"], list) for p in m["content"] if p["type"] == "image_url")
    assert image["image_url"]["url"] != data_url(png_bytes, "image/png")
    assert image["image_url"]["url"].startswith("data:image/png;base64,")
    streamed = "".join(chunk.content for chunk in llm.stream("hi"))
    assert streamed == "Hello from the upstream."


def test_models_mirrors_the_upstream(allowing_gateway):
    import httpx

    gateway = allowing_gateway
    seen = len([r for r in gateway.record.requests if r["path"] == "/v1/models"])
    models = client(gateway).models.list()
    assert [m.id for m in models.data] == ["imitation-model"]
    # the upstream was asked (not a cached or made-up list), and its answer comes back as it sent it
    assert len([r for r in gateway.record.requests if r["path"] == "/v1/models"]) == seen + 1
    assert httpx.get(gateway.base_url + "/models").content == httpx.get(gateway.upstream.url + "/v1/models").content


def test_upstream_key_server_mode_and_passthrough(make_guard):
    guard = make_guard(NONE_UNSAFE)
    with run_gateway(guard, upstream={"api_key": "server-secret"}) as gateway:
        client(gateway).chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert gateway.forwarded()[-1]["headers"]["authorization"] == "Bearer server-secret"  # never the caller's "caller-key"
        client(gateway).models.list()
        assert gateway.record.requests[-1]["path"] == "/v1/models"
        assert gateway.record.requests[-1]["headers"]["authorization"] == "Bearer server-secret"
    with run_gateway(guard, upstream={"key_mode": "passthrough"}, api_keys=["gw-key"]) as gateway:
        caller = openai.OpenAI(base_url=gateway.base_url, api_key="caller-upstream-key", max_retries=0,
                               default_headers={"x-api-key": "gw-key"})
        caller.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}])
        assert gateway.forwarded()[-1]["headers"]["authorization"] == "Bearer caller-upstream-key"
        caller.models.list()
        assert gateway.record.requests[-1]["headers"]["authorization"] == "Bearer caller-upstream-key"


def test_collector_frozen_while_serving_and_given_back_at_shutdown(make_guard):
    import gc

    gc.unfreeze()
    with run_gateway(make_guard(NONE_UNSAFE)):
        assert gc.get_freeze_count() > 0  # the models' objects are out of the collector's walk on the request path
    assert gc.get_freeze_count() == 0  # an embedding process gets its collector back
    with run_gateway(make_guard(NONE_UNSAFE), gc_freeze=False):
        assert gc.get_freeze_count() == 0

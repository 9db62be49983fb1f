"""The safety prefill kept in the gateway's answer (``prefix.keep_in_output``), as every other adapter keeps it."""

from __future__ import annotations

import asyncio
import json
import threading

import pytest

openai = pytest.importorskip("openai")

from guardalign_integrations.server._kept_prefix import prefixed_completion, prefixed_stream  # noqa: E402
from server_helpers import ALL_UNSAFE, data_url, make_guard, png_bytes, run_gateway  # noqa: E402,F401 (fixtures)

PREFIX = "As an AI assistant, "  # the default safety prefix (PrefixConfig.text)


def image_request(png: bytes) -> list[dict]:
    return [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                         {"type": "image_url", "image_url": {"url": data_url(png, "image/png")}}]}]


@pytest.fixture(scope="module")
def prefill_gateway(make_guard):
    # every patch unsafe: the image is masked and the safety prompt (when_unsafe) goes out as a prefill
    with run_gateway(make_guard(ALL_UNSAFE, prefill=True)) as gateway:
        yield gateway


@pytest.fixture(scope="module")
def prefill_not_kept_gateway(make_guard):
    with run_gateway(make_guard(ALL_UNSAFE, prefill=True, keep_in_output=False)) as gateway:
        yield gateway


def client(gateway) -> "openai.OpenAI":
    return openai.OpenAI(base_url=gateway.base_url, api_key="k", max_retries=0)


def test_whole_answer_starts_with_the_kept_prefill(prefill_gateway, png_bytes):
    gateway = prefill_gateway
    before = len(gateway.forwarded())
    raw = client(gateway).chat.completions.with_raw_response.create(model="m", messages=image_request(png_bytes))
    completion = raw.parse()
    # the upstream continued the prefill; the client gets the prefix and the continuation, as GuardedChatModel returns them
    assert completion.choices[0].message.content == PREFIX + "Hello from the upstream."
    assert raw.headers["x-guardalign-decision"] == "mask"
    assert raw.http_response.json()["guardalign"]["decision"] == "mask"
    sent = gateway.forwarded()[before]["body"]["messages"]
    assert sent[-1] == {"role": "assistant", "content": PREFIX.rstrip()}


def test_prefill_space_is_not_doubled_when_the_answer_starts_with_one(prefill_gateway, png_bytes):
    gateway = prefill_gateway
    chunks = gateway.record.stream_chunks
    gateway.record.stream_chunks = [" I", " cannot", " help."]
    try:
        whole = client(gateway).chat.completions.create(model="m", messages=image_request(png_bytes))
        streamed = client(gateway).chat.completions.create(model="m", messages=image_request(png_bytes), stream=True)
        text = "".join(c.choices[0].delta.content or "" for c in streamed if c.choices)
    finally:
        gateway.record.stream_chunks = chunks
    assert whole.choices[0].message.content == "As an AI assistant, I cannot help."
    assert text == "As an AI assistant, I cannot help."


def test_streamed_answer_sends_the_prefill_first_and_keeps_streaming(prefill_gateway, png_bytes):
    gateway = prefill_gateway
    release = threading.Event()
    gateway.record.release_last_chunk = release
    sent_before = gateway.record.sent_chunks
    try:
        stream = client(gateway).chat.completions.create(model="m", messages=image_request(png_bytes), stream=True)
        chunks = iter(stream)
        first = next(chunks)
        second = next(chunks)
        # the prefix is the first content delta, then the upstream's own first chunk, while the upstream still holds its last
        assert first.choices[0].delta.content == PREFIX
        assert second.choices[0].delta.content == "Hello"
        assert gateway.record.sent_chunks - sent_before < len(gateway.record.stream_chunks)
        assert first.id == second.id == "chatcmpl-imitation"
        release.set()
        rest = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    finally:
        release.set()
        gateway.record.release_last_chunk = None
    assert PREFIX + "Hello" + "".join(rest) == PREFIX + "Hello from the upstream."


def test_langchain_sees_the_kept_prefill_too(prefill_gateway, png_bytes):
    lc_openai = pytest.importorskip("langchain_openai")
    from langchain_core.messages import HumanMessage

    llm = lc_openai.ChatOpenAI(base_url=prefill_gateway.base_url, api_key="k", model="m", max_retries=0)
    message = HumanMessage(content=image_request(png_bytes)[0]["content"])
    assert llm.invoke([message]).content == PREFIX + "Hello from the upstream."
    assert "".join(chunk.content for chunk in llm.stream([message])) == PREFIX + "Hello from the upstream."


def test_prefill_not_kept_when_the_config_says_so(prefill_not_kept_gateway, png_bytes):
    gateway = prefill_not_kept_gateway
    before = len(gateway.forwarded())
    whole = client(gateway).chat.completions.create(model="m", messages=image_request(png_bytes))
    stream = client(gateway).chat.completions.create(model="m", messages=image_request(png_bytes), stream=True)
    assert whole.choices[0].message.content == "Hello from the upstream."
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == "Hello from the upstream."
    # the prefill was still sent: only the answer leaves it out
    assert gateway.forwarded()[before]["body"]["messages"][-1] == {"role": "assistant", "content": PREFIX.rstrip()}


def test_no_prefill_no_change(make_guard, png_bytes):
    # without prefill the prefix is asked for by instruction: the answer is relayed as the upstream sent it
    with run_gateway(make_guard(ALL_UNSAFE)) as gateway:
        completion = client(gateway).chat.completions.create(model="m", messages=image_request(png_bytes))
        assert completion.choices[0].message.content == "Hello from the upstream."
        assert gateway.forwarded()[-1]["body"]["messages"][-1]["role"] == "user"


# -- the pure helpers -------------------------------------------------------------------------------

def kept(start: str) -> str:
    return PREFIX if start[:1] and not start[:1].isspace() else PREFIX.rstrip()


def event(payload: dict | str) -> bytes:
    return f"data: {payload if isinstance(payload, str) else json.dumps(payload)}\n\n".encode()


def chunk(content: str, **extra) -> dict:
    return {"id": "c1", "object": "chat.completion.chunk", "created": 7, "model": "m",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}], **extra}


async def collect(parts: list[bytes], choices: int = 1) -> bytes:
    async def source():
        for part in parts:
            yield part

    return b"".join([piece async for piece in prefixed_stream(source(), kept, choices)])


def test_stream_prefix_waits_for_a_whole_first_event_split_anywhere():
    stream = event(chunk("Hi")) + event(chunk(" there")) + event("[DONE]")
    for cut in (1, 7, len(event(chunk("Hi"))) - 1, len(event(chunk("Hi"))) + 3):
        out = asyncio.run(collect([stream[:cut], stream[cut:]]))
        first, rest = out.split(b"\n\n", 1)
        injected = json.loads(first[len(b"data: "):])
        assert injected["id"] == "c1" and injected["created"] == 7 and injected["model"] == "m"
        assert injected["choices"][0]["delta"] == {"role": "assistant", "content": PREFIX}
        assert rest == stream  # the upstream's bytes follow unchanged


def test_stream_prefix_for_every_choice():
    out = asyncio.run(collect([event(chunk(""))], choices=2))
    events = [json.loads(e[len(b"data: "):]) for e in out.split(b"\n\n") if e.startswith(b"data: {")]
    assert [e["choices"][0]["index"] for e in events[:2]] == [0, 1]
    assert all(e["choices"][0]["delta"]["content"] == PREFIX.rstrip() for e in events[:2])  # empty first delta: no space


@pytest.mark.parametrize("stream", [
    event({"error": {"message": "upstream broke", "type": "api_error", "param": None, "code": "x"}}),
    event("[DONE]"),
    b": keep-alive comment\n\n" + event(chunk("Hi")),
])
def test_stream_without_a_first_completion_chunk_is_relayed_unchanged(stream):
    assert asyncio.run(collect([stream])) == stream


def test_completion_prefix_handles_every_content_shape():
    body = {"id": "x", "choices": [
        {"index": 0, "message": {"role": "assistant", "content": "Sure."}},
        {"index": 1, "message": {"role": "assistant", "content": None, "tool_calls": [{"id": "t"}]}},
        {"index": 2, "message": {"role": "assistant", "content": [{"type": "text", "text": " ok"}]}},
    ], "usage": {"total_tokens": 3}}
    out = prefixed_completion(json.dumps(body).encode(), kept)
    assert [c["message"]["content"] for c in out["choices"]] == [PREFIX + "Sure.", PREFIX.rstrip(), [{"type": "text", "text": PREFIX.rstrip() + " ok"}]]
    assert out["choices"][1]["message"]["tool_calls"] == [{"id": "t"}] and out["usage"] == body["usage"]
    assert prefixed_completion(b'{"error": {"message": "no"}}', kept) is None
    assert prefixed_completion(b"not json", kept) is None

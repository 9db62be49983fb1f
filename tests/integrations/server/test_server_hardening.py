"""Attacks on the server's own machinery: slow bodies, costly JSON, lone surrogates, odd field types, the models
endpoint's admission, compressed upstream answers. Each test fails on the code before its fix (red team, round 11)."""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import socket
import threading
import time

import httpx
import pytest

from guardalign_integrations.server import ServerConfig
from server_helpers import ALL_UNSAFE, NONE_UNSAFE, data_url, make_guard, png_bytes, run_gateway  # noqa: F401 (fixtures)

TEXT = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
LITELLM = "/beta/litellm_basic_guardrail_api"


def rejections(gw, reason: str) -> float:
    return gw.state.metrics.registry.get_sample_value("guardalign_rejections_total", {"reason": reason}) or 0.0


def stalled_upload(port: int, path: str = "/v1/chat/completions", declared: int = 100) -> socket.socket:
    """A connection that sends the headers and one byte of a ``declared``-byte body, then nothing."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: {declared}\r\n\r\n{{".encode())
    return sock


def wait_for(condition, timeout: float = 20) -> bool:
    """Poll ``condition`` until it holds; the timeout only turns a hang into a failure."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.02)
    return True


# -- 1. slow bodies ----------------------------------------------------------------------------------------------------

def test_stalled_uploads_do_not_take_the_slots(make_guard):
    # two slots and one queue place, each "held" by a client that never finishes its body: everyone else got 429
    with run_gateway(make_guard(NONE_UNSAFE), max_concurrency=2, max_queue=1) as gw:
        sockets = [stalled_upload(gw.server.port) for _ in range(3)]
        try:
            assert wait_for(lambda: len(gw.server.server.server_state.tasks) >= 3)  # the three requests are in the app
            for _ in range(3):
                response = httpx.post(gw.base_url + "/chat/completions", json=TEXT, timeout=30)
                assert response.status_code == 200, response.text
            assert gw.state.gate.active == 0 and gw.state.gate.waiting == 0
        finally:
            for sock in sockets:
                sock.close()


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/scan", LITELLM])
def test_a_body_that_never_completes_gets_408_and_the_connection_is_closed(make_guard, path):
    with run_gateway(make_guard(NONE_UNSAFE), body_read_timeout_s=0.3) as gw:
        sock = stalled_upload(gw.server.port, path)
        try:
            received = b""
            while (chunk := sock.recv(65536)) != b"":  # the server must close the connection (30 s socket timeout)
                received += chunk
        finally:
            sock.close()
        head, _, payload = received.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 408"), head
        assert json.loads(payload)["error"]["code"] == "request_timeout"
        assert rejections(gw, "body_timeout") == 1
        assert gw.forwarded() == []


def test_a_client_leaving_mid_body_is_counted_quietly(make_guard):
    errors: list[logging.LogRecord] = []
    handler = logging.Handler(level=logging.ERROR)
    handler.emit = errors.append  # type: ignore[method-assign]
    with run_gateway(make_guard(NONE_UNSAFE)) as gw:
        uvicorn_log = logging.getLogger("uvicorn.error")  # configured by the server's start: attach afterwards
        uvicorn_log.addHandler(handler)
        try:
            sock = stalled_upload(gw.server.port)
            assert wait_for(lambda: len(gw.server.server.server_state.tasks) >= 1)
            sock.close()
            assert wait_for(lambda: rejections(gw, "client_disconnected") == 1), "the disconnect was not answered as one"
            assert wait_for(lambda: not gw.server.server.server_state.tasks)
        finally:
            uvicorn_log.removeHandler(handler)
    assert [r.getMessage() for r in errors] == []  # no "Exception in ASGI application"


def test_uvicorn_gets_connection_limits_from_the_config():
    from guardalign_integrations.server.cli import uvicorn_limits

    config = ServerConfig(upstream={"base_url": "http://127.0.0.1:9/v1"})
    assert uvicorn_limits(config) == {"limit_concurrency": 1280, "timeout_keep_alive": 5, "timeout_graceful_shutdown": 30}
    big = ServerConfig(upstream={"base_url": "http://127.0.0.1:9/v1"}, max_concurrency=10, max_queue=10, keep_alive_timeout_s=2)
    assert uvicorn_limits(big)["limit_concurrency"] == 1024 and uvicorn_limits(big)["timeout_keep_alive"] == 2
    with pytest.raises(ValueError, match="max_connections"):
        ServerConfig(upstream={"base_url": "http://127.0.0.1:9/v1"}, max_concurrency=8, max_queue=8, max_connections=16)


# -- 2. costly JSON ----------------------------------------------------------------------------------------------------

def test_json_with_too_many_values_is_refused_before_parsing(make_guard):
    with run_gateway(make_guard(NONE_UNSAFE), max_json_values=1000) as gw:
        body = {**TEXT, "metadata": {"k": [{"a": 0}] * 600}}  # 1,206 values
        response = httpx.post(gw.base_url + "/chat/completions", json=body, timeout=30)
        assert response.status_code == 413 and response.json()["error"]["code"] == "json_too_complex"
        assert "max_json_values=1000" in response.json()["error"]["message"]
        assert gw.forwarded() == []
        # commas and brackets inside strings are not values: a long text passes
        text = {"model": "m", "messages": [{"role": "user", "content": "a, {b}, [c], \\\", " * 2000}]}
        assert httpx.post(gw.base_url + "/chat/completions", json=text, timeout=30).status_code == 200


def test_count_of_json_values_is_exact_on_the_bytes():
    from guardalign_integrations.server._json_body import count_json_values

    def values(item) -> int:
        return 1 + sum(map(values, item.values() if isinstance(item, dict) else item)) if isinstance(item, (dict, list)) else 1

    samples = [{"a": [], "b": {}, "c": [[], {"d": "x,[{\"\\"}], "\\\\": ", ]"}, [1, 2.5, None, True, "]["], "plain", 0, [[[]]], ["a,b,[c],{d},e,f,g,h"]]
    for sample in samples:
        for indent in (None, 2):
            raw = json.dumps(sample, indent=indent).encode()
            for limit in range(0, 12):  # over the limit exactly when the body holds more values than that
                assert (count_json_values(raw, limit) > limit) == (values(sample) > limit), (raw, limit)
    assert count_json_values(b'["a,b,[c],{d},e,f,g,h"]', 5) == 2  # the exact path: the strings cut out


def _record_loop_use(monkeypatch, module, name: str) -> list[bool]:
    """Wrap ``module.name`` to record, per call, whether it ran on the event loop's thread."""
    calls: list[bool] = []
    original = getattr(module, name)

    def wrapped(*args, **kwargs):
        try:
            asyncio.get_running_loop()
            calls.append(True)
        except RuntimeError:
            calls.append(False)
        return original(*args, **kwargs)

    monkeypatch.setattr(module, name, wrapped)
    return calls


def test_a_large_body_is_parsed_and_walked_off_the_event_loop(make_guard, monkeypatch):
    # a 20 MB body of small objects took 5 s of parsing on the event loop: every other request (/healthz) waited
    from guardalign_integrations.server import _gateway, app

    parsed = _record_loop_use(monkeypatch, app, "parse_body")
    screened = _record_loop_use(monkeypatch, _gateway, "screen_chat_body")
    with run_gateway(make_guard(NONE_UNSAFE)) as gw:
        assert httpx.post(gw.base_url + "/chat/completions", json=TEXT, timeout=30).status_code == 200
        assert parsed == [True] and screened == [True]  # a small text body keeps its in-place fast path
        large = {**TEXT, "metadata": {"k": [{"a": "v" * 10}] * 20_000}}  # ~400 KB, 40,000 values: under the limit
        assert httpx.post(gw.base_url + "/chat/completions", json=large, timeout=60).status_code == 200
        assert parsed == [True, False] and screened == [True, False]


# -- 3. lone surrogates ------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("where", ["text", "key", "raw bytes", "litellm"])
def test_lone_surrogates_are_refused(make_guard, png_bytes, where):
    # the raw base64 image makes the body be re-serialised: json.dumps(...).encode() raised UnicodeEncodeError (500)
    raw_b64 = base64.b64encode(png_bytes).decode()
    text, key = ('x\\ud800y', "text") if where != "key" else ("x", 'te\\udc00xt')
    if where == "raw bytes":
        text = "x\udfffy"  # encoded with surrogatepass below: the CESU-8 bytes ED BF BF
    content = f'[{{"type":"text","{key}":"{text}"}},{{"type":"image_url","image_url":{{"url":"{raw_b64}"}}}}]'
    with run_gateway(make_guard(NONE_UNSAFE)) as gw:
        if where == "litellm":
            url, body = gw.url + LITELLM, f'{{"input_type":"request","structured_messages":[{{"role":"user","content":{content}}}]}}'
        else:
            url, body = gw.base_url + "/chat/completions", f'{{"model":"m","messages":[{{"role":"user","content":{content}}}]}}'
        response = httpx.post(url, content=body.encode("utf-8", "surrogatepass"), headers={"content-type": "application/json"}, timeout=60)
        assert response.status_code == 400, response.text
        assert response.json()["error"]["code"] == "invalid_json" and "surrogate" in response.json()["error"]["message"]
        assert gw.forwarded() == []


def test_surrogate_pairs_and_escaped_backslashes_are_not_lone_surrogates(make_guard, png_bytes):
    raw_b64 = base64.b64encode(png_bytes).decode()
    with run_gateway(make_guard(NONE_UNSAFE)) as gw:
        for text in ("\\ud83d\\ude00", "\\\\ud800"):  # an escaped emoji, and the six characters \ud800
            body = ('{"model":"m","messages":[{"role":"user","content":[{"type":"text","text":"%s"},'
                    '{"type":"image_url","image_url":{"url":"%s"}}]}]}') % (text, raw_b64)
            response = httpx.post(gw.base_url + "/chat/completions", content=body, headers={"content-type": "application/json"}, timeout=60)
            assert response.status_code == 200, response.text
        assert gw.forwarded()[0]["body"]["messages"][0]["content"][0]["text"] == "\U0001F600"
        assert gw.forwarded()[1]["body"]["messages"][0]["content"][0]["text"] == "\\ud800"


def test_an_upstream_lone_surrogate_is_relayed_escaped():
    from guardalign_integrations.server._json_body import dump_json

    assert dump_json({"a": "é"}) == '{"a":"é"}'.encode()
    assert json.loads(dump_json({"a": "x\ud800"})) == {"a": "x\ud800"}


# -- 4. types of the fields the gateway reads --------------------------------------------------------------------------

@pytest.mark.parametrize("field,value", [
    ("stream_options", "x"), ("stream_options", [1]), ("stream_options", 1), ("stream_options", True),
    ("stream_options", {"include_usage": "yes"}), ("stream", "true"), ("model", 5), ("n", "2"), ("messages", "hi"),
])
def test_fields_of_the_wrong_type_are_refused_with_their_name(make_guard, png_bytes, field, value):
    # a blocked streamed request read stream_options.get(...): AttributeError, 500
    with run_gateway(make_guard(ALL_UNSAFE, action="block")) as gw:
        body = {"model": "m", "stream": True, "messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": data_url(png_bytes, "image/png")}}]}], field: value}
        response = httpx.post(gw.base_url + "/chat/completions", json=body, timeout=60)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["code"] == "invalid_request" and error["param"].startswith(field)
        assert gw.forwarded() == []


# -- 5. /v1/models ---------------------------------------------------------------------------------------------------

def test_models_waits_for_a_slot_like_every_endpoint(make_guard):
    with run_gateway(make_guard(NONE_UNSAFE), max_concurrency=1, max_queue=0) as gw:
        gw.record.response_delay_s = 3.0
        holder = threading.Thread(target=lambda: httpx.post(gw.base_url + "/chat/completions", json=TEXT, timeout=30))
        holder.start()
        try:
            assert wait_for(lambda: gw.state.gate.active == 1)
            response = httpx.get(gw.base_url + "/models", timeout=30)
            assert response.status_code == 429 and response.json()["error"]["code"] == "server_busy"
        finally:
            holder.join()


def test_a_client_leaving_models_cancels_the_upstream_request(make_guard):
    with run_gateway(make_guard(NONE_UNSAFE)) as gw:
        gw.record.response_delay_s = 5.0
        with pytest.raises(httpx.ReadTimeout):
            httpx.get(gw.base_url + "/models", timeout=0.5)
        assert wait_for(lambda: gw.record.cancelled == 1, timeout=4)  # long before the upstream's 5 s answer
        assert wait_for(lambda: gw.state.gate.active == 0)


# -- 6. compressed upstream answers ------------------------------------------------------------------------------------

def _streamed_text(gw) -> str:
    import openai

    client = openai.OpenAI(base_url=gw.base_url, api_key="k", max_retries=0)
    stream = client.chat.completions.create(model="m", stream=True, messages=TEXT["messages"])
    return "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)


@pytest.mark.parametrize("compress", ["gzip", "always"])
def test_a_gzipping_upstream_gives_readable_answers(make_guard, compress):
    # the stream was relayed as gzip bytes (aiter_raw) without its content-encoding header: unreadable
    pytest.importorskip("openai")
    with run_gateway(make_guard(NONE_UNSAFE)) as gw:
        gw.record.compress = compress
        assert _streamed_text(gw) == "Hello from the upstream."
        whole = httpx.post(gw.base_url + "/chat/completions", json=TEXT, timeout=30)
        assert whole.status_code == 200 and "content-encoding" not in whole.headers
        assert whole.json()["choices"][0]["message"]["content"] == "Hello from the upstream."
        assert {r["headers"].get("accept-encoding") for r in gw.forwarded()} == {"identity"}


@pytest.mark.parametrize("encoding", ["utf-16-le", "utf-16", "utf-32"])
def test_a_body_in_another_unicode_encoding_is_refused_before_the_value_count_misreads_it(make_guard, encoding):
    # json.loads(bytes) detects UTF-16/32 by itself; the byte-level value count reads UTF-8. An
    # escaped quote in UTF-16 flipped the count's idea of what is inside a string, so a body of
    # thousands of objects counted as 3 values and was parsed (and forwarded as UTF-16).
    with run_gateway(make_guard(NONE_UNSAFE), max_json_values=100) as gw:
        text = '{"x":"\\"","model":"m","messages":[{"role":"user","content":"hi"}],"metadata":{"k":[' + ",".join(["{}"] * 5000) + "]}}"
        response = httpx.post(gw.base_url + "/chat/completions", content=text.encode(encoding),
                              headers={"content-type": "application/json"}, timeout=30)
        assert response.status_code in (400, 413) and response.json()["error"]["code"] in ("invalid_json", "json_too_complex")
        assert gw.forwarded() == []
        same_in_utf8 = httpx.post(gw.base_url + "/chat/completions", content=text.encode(), headers={"content-type": "application/json"}, timeout=30)
        assert same_in_utf8.status_code == 413  # the count reads UTF-8 right


@pytest.mark.parametrize("name, head", [
    ("413 streamed", b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\ntransfer-encoding: chunked\r\n\r\n"
                     + b"%x\r\n%s\r\n" % (20000, b"x" * 20000)),
    ("413 declared", b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\ncontent-length: 99999999\r\n\r\n"),
    ("401", b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ntransfer-encoding: chunked\r\n\r\n"),
    ("404", b"POST /nope HTTP/1.1\r\nhost: x\r\nx-api-key: k\r\ntransfer-encoding: chunked\r\n\r\n"),
])
def test_an_answer_sent_before_the_body_is_in_closes_the_connection(make_guard, name, head):
    # uvicorn keeps such a connection and discards what keeps arriving; one late byte disarms its
    # keep-alive timer for good, so without the close anyone (no key needed) could hold
    # connections open for ever and fill max_connections
    with run_gateway(make_guard(NONE_UNSAFE), api_keys=["k"], max_body_bytes=10_000) as gw:
        with socket.create_connection(("127.0.0.1", gw.server.port), timeout=30) as sock:
            sock.sendall(head)
            answer = sock.recv(65536)
            assert answer.split(b"\r\n", 1)[0].split()[1] in (b"401", b"404", b"413"), answer[:80]
            assert b"connection: close" in answer.lower()
            try:
                sock.sendall(b"1\r\n \r\n")  # one more byte of the body
            except OSError:
                return  # already closed
            while True:  # the server closes: recv reads what is left, then b"" (or a reset: unread bytes were discarded)
                try:
                    if not sock.recv(65536):
                        break
                except ConnectionResetError:
                    break


def test_a_complete_request_keeps_its_connection_alive(make_guard):
    with run_gateway(make_guard(NONE_UNSAFE)) as gw:
        with httpx.Client(timeout=30) as client:
            first = client.post(gw.base_url + "/chat/completions", json=TEXT)
            assert first.status_code == 200 and first.headers.get("connection", "").lower() != "close"
            assert client.get(gw.url + "/healthz").headers.get("connection", "").lower() != "close"


def test_a_gzip_bomb_from_the_upstream_stops_at_max_response_bytes(make_guard):
    # 64 KiB of gzip that decodes to 64 MiB: the whole answer used to be decompressed into memory
    import gzip

    from guardalign_integrations.server import create_app
    from guardalign_integrations.server.testing import ServerThread
    from server_helpers import wait_ready

    bomb = gzip.compress(b"0" * (64 * 1024 * 1024), compresslevel=9)
    assert len(bomb) < 200_000
    served = []

    def answer(request: httpx.Request) -> httpx.Response:
        served.append(request.url.path)
        return httpx.Response(200, content=bomb, headers={"content-type": "application/json", "content-encoding": "gzip"})

    config = ServerConfig(upstream={"base_url": "http://upstream.test/v1", "max_response_bytes": 1024 * 1024})
    app = create_app(config, guard=make_guard(NONE_UNSAFE), transport=httpx.MockTransport(answer))
    with ServerThread(app) as server:
        wait_ready(server.url)
        response = httpx.post(server.url + "/v1/chat/completions", json=TEXT, timeout=60)
        assert served and response.status_code == 502
        assert response.json()["error"]["code"] == "upstream_response_too_large"
        assert app.state.guardalign.gate.active == 0

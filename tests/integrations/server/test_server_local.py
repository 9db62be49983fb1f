"""Local mode: a tiny random LVLM checkpoint on disk, served with the full method, through the openai SDK."""

from __future__ import annotations

import contextlib
import time

import httpx
import pytest

openai = pytest.importorskip("openai")
pytest.importorskip("transformers")

from guardalign_integrations.server import ServerConfig, create_app  # noqa: E402
from guardalign_integrations.server.testing import ServerThread  # noqa: E402
from server_helpers import ALL_UNSAFE, NONE_UNSAFE, data_url, make_guard, png_bytes, wait_ready  # noqa: E402,F401

PREFIX = "As an AI assistant, "


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory):
    from guardalign_core.testing.tiny_lvlm import save_tiny_lvlm

    return save_tiny_lvlm("llava", tmp_path_factory.mktemp("tiny-llava") / "tiny-llava")


@pytest.fixture(scope="module")
def local_server(tiny_llava, make_guard):
    config = ServerConfig(model={"model_id": str(tiny_llava), "suppress_special_tokens": True, "max_new_tokens": 12})
    app = create_app(config, guard=make_guard(ALL_UNSAFE))
    with ServerThread(app) as server:
        wait_ready(server.url, timeout=120)
        yield server, app


def image_request(png: bytes) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(png, "image/png")}},
                                         {"type": "text", "text": "Describe the image."}]}]


def test_local_model_answers_with_prefix_calibration_and_usage(local_server, png_bytes):
    server, app = local_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
    raw = client.chat.completions.with_raw_response.create(model="tiny-llava", messages=image_request(png_bytes), max_tokens=5, seed=1)
    completion = raw.parse()
    assert raw.headers["x-guardalign-decision"] == "mask"
    assert completion.choices[0].message.content.startswith(PREFIX)  # the safety prefix, kept in the answer (ETA)
    assert completion.usage.completion_tokens <= 5 and completion.usage.prompt_tokens > 10
    assert completion.choices[0].finish_reason in ("length", "stop")
    summary = raw.http_response.json()["guardalign"]
    assert summary["decision"] == "mask" and summary["prefix_applied"] is True
    assert summary["calibration"]["layers"] == [1, 2]  # the middle half of the 4 decoder layers
    assert [m.id for m in client.models.list().data] == ["tiny-llava"]


def test_local_model_streams_tokens(local_server, png_bytes):
    server, _ = local_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
    stream = client.chat.completions.create(model="tiny-llava", messages=image_request(png_bytes), max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}, temperature=0.7, top_p=0.9, seed=3)
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text.startswith(PREFIX)
    assert len([c for c in chunks if c.choices and c.choices[0].delta.content]) >= 2  # more than one delta
    assert chunks[-1].usage is not None and 1 <= chunks[-1].usage.completion_tokens <= 6


def test_local_model_greedy_is_repeatable_and_honours_stop(local_server):
    server, _ = local_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
    messages = [{"role": "user", "content": "Describe the image."}]
    first = client.chat.completions.create(model="m", messages=messages, max_tokens=12).choices[0].message.content
    second = client.chat.completions.create(model="m", messages=messages, max_tokens=12).choices[0].message.content
    assert first == second
    answer = first[len(PREFIX):]
    assert len(answer) >= 2, first  # something beyond the prefix to stop in
    stop = answer[len(answer) // 2:][:2]
    cut = client.chat.completions.create(model="m", messages=messages, max_tokens=12, stop=[stop]).choices[0].message.content
    assert stop not in cut[len(PREFIX):] and first.startswith(cut) and len(cut) < len(first)


def test_local_model_refuses_tools_with_a_clear_400(local_server):
    server, _ = local_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model="m", messages=[{"role": "user", "content": "hi"}], tools=tools)
    assert err.value.code == "unsupported_parameter" and "tool" in str(err.value)


def test_local_model_blocks_without_generating(tiny_llava, make_guard, png_bytes):
    # one processing slot, no queue: a slot a blocked answer failed to give back would make the next request a 429
    config = ServerConfig(model={"model_id": str(tiny_llava), "suppress_special_tokens": True, "max_new_tokens": 4},
                          max_concurrency=1, max_queue=0)
    app = create_app(config, guard=make_guard(ALL_UNSAFE, action="block"))
    with ServerThread(app) as server:
        wait_ready(server.url, timeout=120)
        client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
        for _ in range(3):
            completion = client.chat.completions.create(model="m", messages=image_request(png_bytes))
            assert completion.choices[0].finish_reason == "content_filter"
            chunks = list(client.chat.completions.create(model="m", messages=image_request(png_bytes), stream=True))
            assert chunks[-1].choices[0].finish_reason == "content_filter"
        assert app.state.guardalign.gate.active == 0


@contextlib.contextmanager
def counted_long_generation(tiny_llava, make_guard):
    """A local server allowed 400 tokens, yielding (server, forward passes so far); on exit it waits for the generation to end.

    The tiny checkpoint's special tokens (EOS included) are suppressed, so a generation that is
    not cancelled runs all 400 steps.
    """
    config = ServerConfig(model={"model_id": str(tiny_llava), "suppress_special_tokens": True, "max_new_tokens": 400})
    app = create_app(config, guard=make_guard(NONE_UNSAFE))
    with ServerThread(app) as server:
        wait_ready(server.url, timeout=120)
        lvlm = app.state.guardalign.pipeline.lvlm
        steps: list[int] = []
        hook = lvlm.model.register_forward_hook(lambda *args: steps.append(1))
        try:
            yield server, steps
            deadline = time.monotonic() + 60
            # the runner's generation slot (max_concurrent=1) comes free when the generation ends
            while not lvlm._slots.acquire(blocking=False):
                assert time.monotonic() < deadline, "the generation never ended"
                time.sleep(0.05)
            lvlm._slots.release()
        finally:
            hook.remove()


def test_leaving_a_local_stream_stops_generation(tiny_llava, make_guard):
    with counted_long_generation(tiny_llava, make_guard) as (server, steps):
        body = {"model": "m", "stream": True, "max_tokens": 400, "messages": [{"role": "user", "content": "hi"}]}
        with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as response:
            for _ in zip(range(3), response.iter_lines()):
                pass
    assert 0 < len(steps) < 200  # cancelled, not run to 400


def test_leaving_a_whole_answer_request_stops_generation(tiny_llava, make_guard):
    # not streamed: the client closes its connection while the answer is being generated
    import json
    import socket

    with counted_long_generation(tiny_llava, make_guard) as (server, steps):
        body = json.dumps({"model": "m", "max_tokens": 400, "messages": [{"role": "user", "content": "hi"}]}).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
            sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n"
                         + f"content-length: {len(body)}\r\n\r\n".encode() + body)
            deadline = time.monotonic() + 60
            while len(steps) < 3:  # generation has started
                assert time.monotonic() < deadline, "generation never started"
                time.sleep(0.01)
    assert 0 < len(steps) < 200  # cancelled, not run to 400


@pytest.mark.parametrize("field, value", [
    ("stop", 5), ("stop", True), ("stop", 1.5), ("stop", ["ok", 1]), ("stop", ["a", "b", "c", "d", "e"]),
    ("seed", 2**70), ("seed", True), ("seed", "7"),
    ("temperature", "hot"), ("temperature", -1), ("temperature", float("nan")), ("temperature", 1e308), ("temperature", 2.5),
    ("top_p", 0), ("top_p", 1.5),
    ("max_tokens", 0), ("max_tokens", "5"), ("max_tokens", True), ("max_completion_tokens", -3),
])
def test_bad_decoding_parameters_are_a_400_naming_the_field(field, value):
    from guardalign_integrations.server._errors import ServerError
    from guardalign_integrations.server._local import generation_options

    with pytest.raises(ServerError) as err:
        generation_options({"messages": [], field: value}, max_new_tokens=32)
    assert err.value.status == 400 and err.value.param == field


def test_good_decoding_parameters_pass_and_the_server_cap_holds():
    from guardalign_integrations.server._local import generation_options

    options = generation_options({"max_tokens": 999, "temperature": 1, "top_p": 0.5, "stop": "END", "seed": 2**63}, max_new_tokens=32)
    assert (options.max_new_tokens, options.temperature, options.top_p, options.stop, options.seed) == (32, 1.0, 0.5, ["END"], 2**63)
    assert generation_options({}, max_new_tokens=32).max_new_tokens == 32


@pytest.mark.parametrize("temperature", [1e-300, 5e-324, 1e-45])
def test_a_vanishing_temperature_decodes_greedily_instead_of_failing(local_server, temperature):
    # dividing the logits by ~0 made sampling raise on inf/nan probabilities (a 500; on CUDA a device assert)
    server, _ = local_server
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="k", max_retries=0)
    messages = [{"role": "user", "content": "Describe the image."}]
    greedy = client.chat.completions.create(model="m", messages=messages, max_tokens=6).choices[0].message.content
    tiny = client.chat.completions.create(model="m", messages=messages, max_tokens=6, temperature=temperature).choices[0].message.content
    assert tiny == greedy

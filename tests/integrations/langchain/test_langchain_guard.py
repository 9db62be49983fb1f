"""GuardAlignGuard: sanitising chains, policies, events, async and batching, fail-closed."""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lc_support import ALL_SAFE, ALL_UNSAFE, b64
from guardalign_lc_fakes import RecordingChatModel, decode_block, image_blocks
from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from langchain_core.prompts import ChatPromptTemplate
from langchain_core.tracers.context import collect_runs

from guardalign_core import encoders
from guardalign_core.config import DEFAULT_SAFETY_INSTRUCTION
from guardalign_core.detector import create_detector
from guardalign_core.errors import GuardAlignViolation
from guardalign_integrations.langchain import EVENT_NAME, METADATA_KEY, GuardAlignGuard


def _pixels(image: Any) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def _user(text: str, *blocks: dict[str, Any]) -> HumanMessage:
    return HumanMessage(content=[{"type": "text", "text": text}, *blocks])


@pytest.fixture(scope="module")
def decisions_alone(make_config: Callable[..., Any], mixed_threshold: float, image_paths: list[Path]) -> dict[Path, Any]:
    """Each test image scanned on its own by the detector (the reference for the guard)."""
    detector = create_detector(make_config(mixed_threshold))
    return {p: detector.scan([str(p)])[0] for p in image_paths}


@pytest.fixture(scope="module")
def masked_path(decisions_alone: dict[Path, Any]) -> Path:
    return next(p for p, r in decisions_alone.items() if r.decision.value == "mask")


@pytest.fixture(scope="module")
def allowed_path(decisions_alone: dict[Path, Any]) -> Path:
    return next(p for p, r in decisions_alone.items() if r.decision.value == "allow")


def test_chain_forwards_the_masked_image_and_the_text_untouched(
    make_config: Callable[..., Any], mixed_threshold: float, masked_path: Path, decisions_alone: dict[Path, Any]
) -> None:
    prompt = ChatPromptTemplate.from_messages(
        [
            ("system", "You describe images."),
            ("user", [{"type": "text", "text": "{question}"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,{image}"}}]),
        ]
    )
    llm = RecordingChatModel()
    chain = prompt | GuardAlignGuard(config=make_config(mixed_threshold)) | llm
    question = "What does this picture show? Answer in one line."
    answer = chain.invoke({"question": question, "image": b64(masked_path)})

    assert answer.text == llm.reply
    (sent,) = llm.received
    system, user = sent
    assert system.content.startswith("You describe images.") and DEFAULT_SAFETY_INSTRUCTION in system.content
    assert user.content[0] == {"type": "text", "text": question}
    (image,) = image_blocks(user)
    assert image["mime_type"] == "image/png"
    expected = decisions_alone[masked_path].masked_image
    received = decode_block(image)
    assert received.size == expected.size
    assert np.array_equal(_pixels(received), _pixels(expected))
    assert (_pixels(received) == 0).all(axis=-1).any()  # some patch really is black


def test_five_images_get_five_independent_decisions(
    make_config: Callable[..., Any], mixed_threshold: float, decisions_alone: dict[Path, Any], v1_block: Callable[[Path], dict]
) -> None:
    masked = [p for p, r in decisions_alone.items() if r.decision.value == "mask"][:2]
    allowed = [p for p, r in decisions_alone.items() if r.decision.value == "allow"][:3]
    paths = [allowed[0], masked[0], allowed[1], masked[1], allowed[2]]
    blocks = [v1_block(p) for p in paths]
    guard = GuardAlignGuard(config=make_config(mixed_threshold))
    message = _user("Compare these.", *blocks)

    decision = guard.check([message])
    assert decision.decision.value == "mask" and len(decision.results) == 5
    for i, (path, result) in enumerate(zip(paths, decision.results)):
        alone = decisions_alone[path]
        assert result.index == i and result.source == f"messages[0].content[{i + 1}]"
        assert result.decision == alone.decision
        assert np.allclose(result.scores, alone.scores, atol=1e-5)

    out = guard.invoke([message]).to_messages()[-1]
    for i, (path, block) in enumerate(zip(paths, blocks)):
        sent = out.content[i + 1]
        if decisions_alone[path].decision.value == "allow":
            assert sent == block  # passed unchanged, not re-encoded
        else:
            assert np.array_equal(_pixels(decode_block(sent)), _pixels(decisions_alone[path].masked_image))


def test_block_policy_raises_with_the_decision(make_config: Callable[..., Any], image_paths: list[Path], openai_block: Callable) -> None:
    llm = RecordingChatModel()
    chain = GuardAlignGuard(config=make_config(ALL_UNSAFE, action="block")) | llm
    with pytest.raises(GuardAlignViolation) as info:
        chain.invoke([_user("hi", openai_block(image_paths[0]))])
    assert info.value.decision.blocked and info.value.decision.policy == "block"
    assert "messages[0].content[1]" in str(info.value)
    assert llm.received == []


def test_flag_policy_passes_images_and_adds_the_safety_prompt(
    make_config: Callable[..., Any], image_paths: list[Path], openai_block: Callable
) -> None:
    block = openai_block(image_paths[0])
    guard = GuardAlignGuard(config=make_config(ALL_UNSAFE, action="flag"))
    out = guard.invoke([_user("hi", block)]).to_messages()
    assert out[0].type == "system" and DEFAULT_SAFETY_INSTRUCTION in out[0].content
    assert 'Begin your answer with "As an AI assistant,".' in out[0].content
    assert out[1].content[1] == block
    assert guard.check([_user("hi", block)]).decision.value == "flag"


def test_prefix_options(make_config: Callable[..., Any], image_paths: list[Path], openai_block: Callable) -> None:
    request = [SystemMessage(content="Sys."), _user("hi", openai_block(image_paths[0]))]
    prefill = GuardAlignGuard(config=make_config(ALL_UNSAFE, prefix={"prefill": True})).invoke(request).to_messages()
    assert isinstance(prefill[-1], AIMessage) and prefill[-1].content == "As an AI assistant,"
    never = GuardAlignGuard(config=make_config(ALL_UNSAFE, prefix={"when": "never"})).invoke(request).to_messages()
    assert never[0].content == "Sys." and len(never) == 2
    always = GuardAlignGuard(config=make_config(ALL_SAFE, prefix={"when": "always"})).invoke("text only").to_messages()
    assert always[0].type == "system" and DEFAULT_SAFETY_INSTRUCTION in always[0].content


def test_check_only_changes_nothing_and_dispatches_nothing(
    make_config: Callable[..., Any], image_paths: list[Path], openai_block: Callable
) -> None:
    message = _user("hi", openai_block(image_paths[0]))
    before = message.model_copy(deep=True)
    decision = GuardAlignGuard(config=make_config(ALL_UNSAFE)).check([message])
    assert decision.decision.value == "mask" and decision.results[0].unsafe
    assert message == before
    assert decision.summary()["images"][0]["source"] == "messages[0].content[1]"


def test_text_only_requests_never_load_the_detector(make_config: Callable[..., Any], monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a text-only request loaded CLIP")

    monkeypatch.setattr("guardalign_core.detector.get_clip_encoder", refuse)
    guard = GuardAlignGuard(config=make_config(ALL_UNSAFE))
    llm = RecordingChatModel()
    (guard | llm).invoke([SystemMessage(content="s"), HumanMessage(content=[{"type": "text", "text": "no image"}])])
    assert guard.check("plain").decision.value == "allow"
    assert asyncio.run(guard.ainvoke("plain")).to_messages() == [HumanMessage(content="plain")]
    assert not guard.engine.detector_loaded
    assert llm.received[0][1].content == [{"type": "text", "text": "no image"}]


# -- fail-closed -------------------------------------------------------------------------------


def _broken_png(path: Path) -> str:
    data = path.read_bytes()
    return base64.b64encode(data[: len(data) // 3]).decode()


@pytest.mark.parametrize(
    ("make_block", "why"),
    [
        (lambda p: {"type": "image", "base64": _broken_png(p), "mime_type": "image/png"}, "CorruptImageError"),
        (lambda p: {"type": "image", "base64": base64.b64encode(b"just some text, not pixels").decode(), "mime_type": "image/png"}, "UnsupportedImageFormatError"),
        (lambda p: {"type": "image_url", "image_url": {"url": "data:image/png;base64,@@not-base64@@"}}, "InvalidImageSourceError"),
        (lambda p: {"type": "image", "url": "https://example.com/cat.png"}, "RemoteImageError"),
        (lambda p: {"type": "image", "file_id": "file-abc"}, "file_id"),
    ],
    ids=["truncated-png", "text-bytes", "bad-base64", "remote-url", "file-id"],
)
def test_undecodable_images_block_the_request_and_name_the_image(
    make_config: Callable[..., Any], image_paths: list[Path], make_block: Callable, why: str
) -> None:
    llm = RecordingChatModel()
    guard = GuardAlignGuard(config=make_config(ALL_SAFE))
    ok = {"type": "image", "base64": b64(image_paths[0]), "mime_type": "image/png"}
    with pytest.raises(GuardAlignViolation) as info:
        (guard | llm).invoke([_user("look", ok, make_block(image_paths[0]))])
    message = str(info.value)
    assert "messages[0].content[2]" in message and why in message and "fail-closed" in message
    assert "messages[0].content[1]" not in message  # the good image is not blamed
    decision = info.value.decision
    assert decision.status.value == "error" and decision.results[1].status.value == "error"
    assert llm.received == []  # never forwarded


def test_fail_open_forwards_the_raw_block_with_status_error(make_config: Callable[..., Any], image_paths: list[Path]) -> None:
    broken = {"type": "image", "base64": _broken_png(image_paths[0]), "mime_type": "image/png"}
    guard = GuardAlignGuard(config=make_config(ALL_SAFE, fail_open=True))
    llm = RecordingChatModel()
    events: list[dict] = []

    class Listener(BaseCallbackHandler):
        def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
            events.append(data)

    (guard | llm).invoke([_user("look", broken)], config={"callbacks": [Listener()]})
    assert llm.received[0][0].content[1] == broken
    assert events[0]["status"] == "error" and events[0]["decision"] == "allow"
    assert "CorruptImageError" in events[0]["images"][0]["reason"]


# -- events and run metadata -------------------------------------------------------------------


async def test_astream_events_show_the_decision(make_config: Callable[..., Any], image_paths: list[Path], openai_block: Callable) -> None:
    chain = GuardAlignGuard(config=make_config(ALL_UNSAFE)) | RecordingChatModel()
    events = [e async for e in chain.astream_events([_user("hi", openai_block(image_paths[0]))], version="v2")]
    (custom,) = [e for e in events if e["event"] == "on_custom_event"]
    assert custom["name"] == EVENT_NAME
    assert custom["data"]["decision"] == "mask" and custom["data"]["images"][0]["unsafe"]
    (end,) = [e for e in events if e["event"] == "on_chain_end" and e["name"] == "GuardAlignGuard"]
    assert end["metadata"][METADATA_KEY]["decision"] == "mask"
    assert any(e["event"] == "on_chat_model_stream" for e in events)


def test_decision_is_in_the_traced_run_metadata(make_config: Callable[..., Any], image_paths: list[Path], openai_block: Callable) -> None:
    guard = GuardAlignGuard(config=make_config(ALL_UNSAFE))
    with collect_runs() as collector:
        guard.invoke([_user("hi", openai_block(image_paths[0]))], config={"run_name": "my-guard", "tags": ["t1"]})
    (run,) = collector.traced_runs
    assert run.name == "my-guard" and "t1" in run.tags
    assert run.extra["metadata"][METADATA_KEY]["decision"] == "mask"


# -- async, batching, streaming ------------------------------------------------------------------


async def test_ainvoke_scans_off_the_event_loop(make_config: Callable[..., Any], image_paths: list[Path], openai_block: Callable) -> None:
    guard = GuardAlignGuard(config=make_config(ALL_UNSAFE))
    detector = guard.engine.detector
    threads: list[int] = []
    scan = detector.scan

    def recording_scan(*args: Any, **kwargs: Any) -> Any:
        threads.append(threading.get_ident())
        return scan(*args, **kwargs)

    detector.scan = recording_scan  # type: ignore[method-assign]
    out = await guard.ainvoke([_user("hi", openai_block(image_paths[0]))])
    assert threads and threads[0] != threading.get_ident()
    assert image_blocks(out.to_messages()[-1])[0]["mime_type"] == "image/png"
    assert (await guard.acheck([_user("hi", openai_block(image_paths[0]))])).decision.value == "mask"


async def test_abatch_matches_sequential_and_loads_clip_once(
    make_config: Callable[..., Any], mixed_threshold: float, image_paths: list[Path], v1_block: Callable, monkeypatch: pytest.MonkeyPatch
) -> None:
    constructed: list[str] = []

    class CountingEncoder(encoders.ClipEncoder):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            constructed.append(args[0])
            super().__init__(*args, **kwargs)

    encoders.clear_clip_cache()
    monkeypatch.setattr(encoders, "ClipEncoder", CountingEncoder)
    broken = {"type": "image", "base64": _broken_png(image_paths[0]), "mime_type": "image/png"}
    requests: list[Any] = []
    for i in range(32):
        kind = i % 4
        if kind == 0:
            requests.append(f"text-only request {i}")
        elif kind == 1:
            requests.append([_user(f"one image {i}", v1_block(image_paths[i % len(image_paths)]))])
        elif kind == 2:
            requests.append([_user(f"two images {i}", v1_block(image_paths[i % 8]), v1_block(image_paths[(i + 3) % 8]))])
        else:
            requests.append([_user(f"broken {i}", broken if i % 8 == 3 else v1_block(image_paths[(i + 5) % 8]))])

    guard = GuardAlignGuard(config=make_config(mixed_threshold), reuse_checked=False)  # every request really scans
    detector = guard.engine.detector
    in_flight, peak, lock = [0], [0], threading.Lock()
    scan = detector.scan

    def counting_scan(*args: Any, **kwargs: Any) -> Any:
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        try:
            time.sleep(0.01)  # make overlap observable
            return scan(*args, **kwargs)
        finally:
            with lock:
                in_flight[0] -= 1

    detector.scan = counting_scan  # type: ignore[method-assign]
    outputs = await guard.abatch(requests, config={"max_concurrency": 8}, return_exceptions=True)

    def verdict(output: Any) -> tuple:
        if isinstance(output, GuardAlignViolation):
            d = output.decision
            return ("blocked", d.decision.value, tuple(r.decision.value for r in d.results))
        return ("ok", [b.get("type") for m in output.to_messages() for b in m.content_blocks])

    sequential = []
    for request in requests:
        decision = guard.check(request)
        sequential.append(decision)
    for output, decision in zip(outputs, sequential):
        if isinstance(output, GuardAlignViolation):
            assert output.decision.decision == decision.decision
            assert [r.decision for r in output.decision.results] == [r.decision for r in decision.results]
        else:
            assert not decision.blocked
    batch_sync = guard.batch(requests, config={"max_concurrency": 8}, return_exceptions=True)
    assert [verdict(o) for o in batch_sync] == [verdict(o) for o in outputs]
    assert sum(isinstance(o, GuardAlignViolation) for o in outputs) == 4
    assert {d.decision.value for d in sequential} >= {"allow", "mask", "block"}
    assert constructed == ["guardalign-tiny-clip"]  # one CLIP for 32 concurrent requests
    assert 1 < peak[0] <= 8


def test_transform_assembles_streamed_input(make_config: Callable[..., Any]) -> None:
    guard = GuardAlignGuard(config=make_config(ALL_SAFE))
    (out,) = list(guard.transform(iter(["hel", "lo"])))
    assert out.to_messages() == [HumanMessage(content="hello")]


@pytest.mark.parametrize("use_async", [False, True], ids=["stream", "astream"])
def test_streaming_through_the_guard_is_not_buffered(
    make_config: Callable[..., Any], image_paths: list[Path], openai_block: Callable, use_async: bool
) -> None:
    llm = RecordingChatModel(reply="one two three four five", delay_s=0.15)
    prompt = ChatPromptTemplate.from_messages([("user", "{q}")])
    chain = prompt | GuardAlignGuard(config=make_config(ALL_UNSAFE)) | llm
    arrivals: list[float] = []

    if use_async:

        async def consume() -> None:
            async for _ in chain.astream({"q": "hello"}):
                arrivals.append(time.perf_counter())

        asyncio.run(consume())
    else:
        for _ in chain.stream({"q": "hello"}):
            arrivals.append(time.perf_counter())
    assert len(arrivals) >= 5
    assert arrivals[0] < llm.produced_at[-1]  # the caller had chunk 1 before the model produced its last
    assert arrivals[-1] - arrivals[0] > 0.4  # and the chunks kept arriving as they were produced


def test_resent_images_are_not_rescanned(make_config: Callable[..., Any], image_paths: list[Path], v1_block: Callable) -> None:
    calls: list[int] = []
    guard = GuardAlignGuard(config=make_config(ALL_UNSAFE))
    scan = guard.engine.detector.scan

    def counting_scan(images: Any, **kwargs: Any) -> Any:
        calls.append(len(images))
        return scan(images, **kwargs)

    guard.engine.detector.scan = counting_scan  # type: ignore[method-assign]
    request = [_user("first turn", v1_block(image_paths[0]))]
    first = guard.invoke(request).to_messages()
    second = guard.invoke([*request, AIMessage(content="ok"), HumanMessage(content="and now?")]).to_messages()
    assert calls == [1]  # the second turn reused the verdict
    assert second[1].content[1] == first[1].content[1]  # the same sanitised pixels, not a re-masked image
    decision = guard.check(first)  # the guard's own output comes back: recognised, not masked again
    assert calls == [1] and "already sanitised" in decision.results[0].reason
    assert guard.invoke(first).to_messages()[1].content[1] == first[1].content[1]

    fresh = GuardAlignGuard(config=make_config(ALL_UNSAFE), reuse_checked=False)
    fresh_scan = fresh.engine.detector.scan
    fresh_calls: list[int] = []
    fresh.engine.detector.scan = lambda images, **kw: fresh_calls.append(1) or fresh_scan(images, **kw)  # type: ignore[method-assign]
    fresh.invoke(request)
    fresh.invoke(request)
    assert len(fresh_calls) == 2


def test_policy_shortcuts(make_config: Callable[..., Any]) -> None:
    guard = GuardAlignGuard(config=make_config(ALL_UNSAFE), action="block", fail_open=True)
    assert (guard.config.policy.action, guard.config.policy.fail_open) == ("block", True)
    assert guard.config.detector.threshold == ALL_UNSAFE
    assert GuardAlignGuard(config="tiny-random", action="flag").config.detector.model == "guardalign-tiny-clip"
    with pytest.raises(ValueError, match="action"):
        GuardAlignGuard(action="drop")


def test_a_block_with_two_sources_is_forwarded_with_the_checked_one_only(
    make_config: Callable[..., Any], image_paths: list[Path]
) -> None:
    """A v1 block with base64 and a URL is checked on the base64; the URL must never reach the model."""
    data = b64(image_paths[0])
    block = {"type": "image", "base64": data, "mime_type": "image/png", "url": "https://evil.example/x.png"}
    guard = GuardAlignGuard(config=make_config(ALL_SAFE))
    for turn in range(2):  # fresh, then reused from the guard's memory
        forwarded = image_blocks(guard.invoke([_user("look", dict(block))]).to_messages()[0])
        assert len(forwarded) == 1 and "url" not in forwarded[0], turn
        assert forwarded[0]["base64"] == data


def test_a_copy_with_another_config_decides_with_it(make_config: Callable[..., Any], image_paths: list[Path], openai_block: Callable) -> None:
    import copy

    lenient = GuardAlignGuard(config=make_config(ALL_SAFE))
    request = [_user("hi", openai_block(image_paths[0]))]
    assert lenient.check(request).decision.value == "allow"
    strict = make_config(ALL_UNSAFE, action="block")
    assert lenient.model_copy(update={"config": strict}).check(request).decision.value == "block"
    clone = copy.deepcopy(lenient)
    clone.config = strict
    assert clone.check(request).decision.value == "block" and lenient.check(request).decision.value == "allow"


def test_check_returns_pixels_also_for_reused_verdicts(make_config: Callable[..., Any], image_paths: list[Path], openai_block: Callable) -> None:
    guard = GuardAlignGuard(config=make_config(ALL_UNSAFE))
    request = [_user("hi", openai_block(image_paths[0]))]
    first, second = guard.check(request), guard.check(request)
    assert "(reused)" in second.results[0].reason
    assert np.array_equal(np.asarray(first.images[0].pixels()), np.asarray(second.images[0].pixels()))
    assert second.images[0].data == first.images[0].data  # the stored sanitised bytes, not a second masking

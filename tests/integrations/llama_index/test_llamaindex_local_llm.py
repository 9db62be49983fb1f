"""GuardAlignLocalLLM: the calibrated local LVLM as a LlamaIndex LLM (tiny random LLaVA on disk).

The checkpoint is saved once and loaded through the real hub-id/path code. Random weights
emit image placeholders and other special tokens; the tests suppress them through
``generate_kwargs``, as a user of such a checkpoint would.
"""

from __future__ import annotations

import asyncio
import copy
import shutil
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest

pytest.importorskip("transformers")

from llama_index.core.base.llms.types import ChatMessage, ImageBlock, MessageRole, TextBlock  # noqa: E402
from llama_index.core.callbacks import CallbackManager, TokenCountingHandler  # noqa: E402

from guardalign_core.config import PrefixConfig  # noqa: E402
from guardalign_core.errors import GuardAlignViolation  # noqa: E402
from guardalign_core.images import load_image  # noqa: E402
from guardalign_core.lvlm import LocalLVLM  # noqa: E402
from guardalign_core.testing.tiny_lvlm import save_tiny_lvlm  # noqa: E402
from guardalign_integrations.llama_index import GuardAlignLLM, GuardAlignLocalLLM  # noqa: E402

PREFIX = "As an AI assistant, "


@pytest.fixture(scope="module")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_lvlm("llava", tmp_path_factory.mktemp("li-tiny-llava") / "llava")


@pytest.fixture(scope="module")
def tokenizer(tiny_llava: Path) -> Any:
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_llava).tokenizer


@pytest.fixture
def make_llm(tiny_llava: Path, tokenizer: Any, make_config: Callable[..., Any]) -> Callable[..., GuardAlignLocalLLM]:
    def make(
        threshold: float = -1.0, *, action: str = "mask", fail_open: bool = False, letters_only: bool = False,
        guard_prefix: dict[str, Any] | None = None, checkpoint: Path | None = None, **kwargs: Any,
    ) -> GuardAlignLocalLLM:
        suppress = list(tokenizer.all_special_ids)
        if letters_only:  # transformers' streamer holds symbols back until a space: keep every token a delta
            suppress += [i for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip().isalpha()]
        kwargs.setdefault("max_new_tokens", 6)
        kwargs.setdefault("generate_kwargs", {"suppress_tokens": sorted(set(suppress))})
        config = make_config(threshold, action=action, fail_open=fail_open, **(guard_prefix or {}))
        return GuardAlignLLM.from_hf(checkpoint or tiny_llava, config, **kwargs)

    return make


def _image_message(path: Path, text: str = "Describe this image.") -> ChatMessage:
    return ChatMessage(role=MessageRole.USER, blocks=[ImageBlock(path=path), TextBlock(text=text)])


def _prepare_spy(monkeypatch: pytest.MonkeyPatch) -> list[tuple[list[dict[str, Any]], list[Any]]]:
    """Record the (messages, images) every ``LocalLVLM.prepare`` call receives: what the template renders."""
    seen: list[tuple[list[dict[str, Any]], list[Any]]] = []
    original = LocalLVLM.prepare
    monkeypatch.setattr(LocalLVLM, "prepare", lambda self, m, i=(), **k: seen.append((m, list(i))) or original(self, m, i, **k))
    return seen


def _texts(message: dict[str, Any]) -> str:
    return "".join(p.get("text", "") for p in message["content"])


def test_from_hf_builds_lazily(make_llm: Callable[..., GuardAlignLocalLLM], tiny_llava: Path, tmp_path: Path) -> None:
    fresh = shutil.copytree(tiny_llava, tmp_path / "llava")  # a checkpoint no other test has loaded
    llm = make_llm(checkpoint=fresh)
    assert isinstance(llm, GuardAlignLocalLLM) and not llm.is_loaded and not llm.guard.detector_loaded
    assert llm.metadata.is_chat_model and llm.metadata.num_output == 6


def test_from_hf_gamma_shortcut_is_the_calls_calibration(make_llm: Callable[..., GuardAlignLocalLLM], benign_path: Path) -> None:
    from guardalign_core.calibration import CalibrationConfig

    weak, strong = make_llm(gamma=0.25, layers=[2]), make_llm(gamma=2.0)
    assert weak.calibration == CalibrationConfig(gamma=0.25, layers=[2]) and strong.calibration.gamma == 2.0
    assert weak.lvlm is strong.lvlm  # one shared runner; each adapter passes its own strength per call
    records = [llm.chat([_image_message(benign_path)]).raw["guardalign_generation"]["calibration"] for llm in (weak, strong, weak)]
    assert [(r["gamma"], r["layers"]) for r in records] == [(0.25, [2]), (2.0, [1, 2]), (0.25, [2])]
    with pytest.raises(ValueError, match="gamma=0.5 disagrees"):
        make_llm(gamma=0.5, calibration=CalibrationConfig(gamma=0.1))


def test_is_loaded_reflects_the_shared_weights(make_llm: Callable[..., GuardAlignLocalLLM]) -> None:
    make_llm().complete("warm up")
    assert make_llm().is_loaded  # another adapter loaded this checkpoint: its weights are in memory


def test_chat_runs_the_full_method_with_token_counts(make_llm: Callable[..., GuardAlignLocalLLM], benign_path: Path) -> None:
    llm = make_llm(100.0)
    response = llm.chat([ChatMessage(role=MessageRole.SYSTEM, content="Be brief."), _image_message(benign_path)])
    assert response.message.content.startswith(PREFIX)
    record, generation = response.raw["guardalign"], response.raw["guardalign_generation"]
    assert record["decision"] == "mask" and generation["prefix_used"] and generation["calibration"]["layers"] == [1, 2]
    usage = response.raw["usage"]
    assert usage == {"prompt_tokens": generation["input_tokens"], "completion_tokens": 6, "total_tokens": generation["input_tokens"] + 6}
    assert response.additional_kwargs["completion_tokens"] == 6


def test_the_model_sees_the_detectors_masked_image(
    make_llm: Callable[..., GuardAlignLocalLLM], benign_path: Path, expected_pixels: Callable[..., np.ndarray],
    partial_threshold: float, monkeypatch: pytest.MonkeyPatch,
) -> None:
    llm = make_llm(partial_threshold)
    seen: list[Any] = []
    original = LocalLVLM.prepare
    monkeypatch.setattr(LocalLVLM, "prepare", lambda self, m, i=(), **k: seen.append((m, list(i))) or original(self, m, i, **k))
    llm.chat([_image_message(benign_path, "What is shown?")])
    (messages, images), = seen
    assert np.array_equal(np.asarray(images[0]), expected_pixels(benign_path, partial_threshold))
    assert messages[-1]["content"] == [{"type": "image"}, {"type": "text", "text": "What is shown?"}]


def test_all_eight_endpoints_agree(make_llm: Callable[..., GuardAlignLocalLLM], benign_path: Path) -> None:
    llm = make_llm()
    messages = [_image_message(benign_path)]
    text = llm.chat(messages).message.content
    streamed = list(llm.stream_chat(messages))
    assert "".join(r.delta or "" for r in streamed) == text and streamed[-1].message.content == text
    assert streamed[-1].raw["usage"]["completion_tokens"] == 6

    async def run_async() -> tuple[str, str]:
        achat = (await llm.achat(messages)).message.content
        chunks = [r async for r in await llm.astream_chat(messages)]
        return achat, "".join(r.delta or "" for r in chunks)

    assert asyncio.run(run_async()) == (text, text)
    completion = llm.complete("Tell me a story.")
    assert completion.text.startswith(PREFIX) and completion.raw["usage"]["completion_tokens"] == 6
    assert "".join(r.delta or "" for r in llm.stream_complete("Tell me a story.")) == completion.text

    async def run_async_completion() -> tuple[str, str]:
        acomplete = (await llm.acomplete("Tell me a story.")).text
        chunks = [r async for r in await llm.astream_complete("Tell me a story.")]
        return acomplete, chunks[-1].text

    assert asyncio.run(run_async_completion()) == (completion.text, completion.text)


def test_stream_chat_yields_while_generating(make_llm: Callable[..., GuardAlignLocalLLM], benign_path: Path) -> None:
    llm = make_llm(letters_only=True, max_new_tokens=12)
    llm.complete("warm up")
    generating: list[bool] = []
    deltas = []
    for response in llm.stream_chat([_image_message(benign_path)]):
        generating.append(any(t.name != "MainThread" and t.is_alive() for t in threading.enumerate()))
        deltas.append(response.delta)
    assert deltas[0] == PREFIX and len(deltas) >= 6
    assert generating[1] is True  # the first decoded token arrived before generation finished


def test_block_refuses_or_raises_without_generating(
    make_llm: Callable[..., GuardAlignLocalLLM], figstep_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(LocalLVLM, "generate_ids", lambda *a, **k: pytest.fail("a blocked request reached the model"))
    llm = make_llm(100.0, action="block")
    response = llm.chat([_image_message(figstep_path)])
    assert response.message.content == llm.refusal_text and response.additional_kwargs["guardalign"]["decision"] == "block"
    assert [r.delta for r in llm.stream_chat([_image_message(figstep_path)])] == [llm.refusal_text]
    with pytest.raises(GuardAlignViolation):
        make_llm(100.0, action="block", on_block="raise").chat([_image_message(figstep_path)])


def test_decision_events_one_per_image(
    make_llm: Callable[..., GuardAlignLocalLLM], benign_path: Path, figstep_path: Path, decision_events: list[Any]
) -> None:
    message = ChatMessage(role=MessageRole.USER, blocks=[ImageBlock(path=benign_path), ImageBlock(path=figstep_path), TextBlock(text="Compare.")])
    make_llm().chat([message])
    assert [e.source for e in decision_events] == ["messages[0].blocks[0]", "messages[0].blocks[1]"]


def test_undecodable_image_fails_closed_unless_fail_open(make_llm: Callable[..., GuardAlignLocalLLM]) -> None:
    broken = ChatMessage(role=MessageRole.USER, blocks=[ImageBlock(image=b"not an image at all"), TextBlock(text="What is this?")])
    with pytest.raises(GuardAlignViolation, match=r"messages\[0\]\.blocks\[0\]"):
        make_llm(on_block="raise").chat([broken])
    response = make_llm(fail_open=True).chat([broken])
    record = response.raw["guardalign"]
    assert record["status"] == "error" and response.message.content.startswith(PREFIX)


def test_token_counting_handler_reads_the_counts(make_llm: Callable[..., GuardAlignLocalLLM], benign_path: Path) -> None:
    counter = TokenCountingHandler()
    llm = make_llm(callback_manager=CallbackManager([counter]))
    response = llm.chat([_image_message(benign_path)])
    assert counter.completion_llm_token_count == 6
    assert counter.prompt_llm_token_count == response.raw["usage"]["prompt_tokens"]


def test_the_model_gets_the_checked_pixels_without_a_second_read(
    make_llm: Callable[..., GuardAlignLocalLLM], benign_path: Path, expected_pixels: Callable[..., np.ndarray],
    partial_threshold: float, monkeypatch: pytest.MonkeyPatch,
) -> None:
    from guardalign_integrations.llama_index import local_llm

    llm = make_llm(partial_threshold)
    expected = expected_pixels(benign_path, partial_threshold)
    seen = _prepare_spy(monkeypatch)
    decoded: list[Any] = []
    from guardalign_core import images

    monkeypatch.setattr(images, "load_image", lambda source, *a, **k: decoded.append(source) or pytest.fail("decoded again"))
    message = ChatMessage(role=MessageRole.USER, blocks=[ImageBlock(image=benign_path.read_bytes()), TextBlock(text="What?")])
    llm.chat([message])
    assert np.array_equal(np.asarray(seen[-1][1][0]), expected) and decoded == []
    monkeypatch.undo()  # a reused verdict carries no pixels: the sanitised (masked) PNG is decoded
    seen = _prepare_spy(monkeypatch)
    response = llm.chat([message])
    assert response.raw["guardalign"]["images"][0]["reason"].endswith("(reused)")
    assert np.array_equal(np.asarray(seen[-1][1][0]), expected)


def test_assistant_role_aliases_and_tool_turns(make_llm: Callable[..., GuardAlignLocalLLM], monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _prepare_spy(monkeypatch)
    make_llm().chat([
        ChatMessage(role=MessageRole.USER, content="Hi."),
        ChatMessage(role=MessageRole.MODEL, content="Hello."),
        ChatMessage(role=MessageRole.USER, content="Again?"),
        ChatMessage(role=MessageRole.CHATBOT, content="Sure."),
        ChatMessage(role=MessageRole.TOOL, content="42"),
        ChatMessage(role=MessageRole.FUNCTION, content="43"),
    ])
    (messages, _), = seen
    assert [m["role"] for m in messages] == ["user", "assistant", "user", "assistant", "user", "user"]
    assert _texts(messages[1]) == "Hello." and _texts(messages[4]) == "Result of a tool call:\n42"
    assert _texts(messages[5]) == "Result of a tool call:\n43"


def test_model_copy_and_deepcopy_use_their_own_settings(make_llm: Callable[..., GuardAlignLocalLLM]) -> None:
    llm = make_llm()
    text = llm.complete("Tell me a story.").text
    assert text.startswith(PREFIX)
    changed = llm.model_copy(update={"prefix": PrefixConfig(when="always", text="NEW: ")})
    assert changed.complete("Tell me a story.").text.startswith("NEW: ")
    assert llm.complete("Tell me a story.").text == text  # the original is untouched
    clone = copy.deepcopy(llm)  # after a call: nothing unpicklable is held by the adapter
    assert clone.guard is llm.guard and clone.complete("Tell me a story.").text == text


def test_the_guard_configs_prefix_is_used(make_llm: Callable[..., GuardAlignLocalLLM]) -> None:
    llm = make_llm(guard_prefix={"text": "Custom prefix: "})  # policy when_unsafe in the config: the local model uses it always
    response = llm.complete("Tell me a story.")
    assert response.text.startswith("Custom prefix: ") and response.raw["guardalign_generation"]["prefix_text"] == "Custom prefix: "
    never = make_llm(prefix=PrefixConfig(when="never")).complete("Tell me a story.")
    assert not never.raw["guardalign_generation"]["prefix_used"]


def test_bad_generate_kwargs_raise_before_any_scan(make_llm: Callable[..., GuardAlignLocalLLM], benign_path: Path) -> None:
    llm = make_llm()
    messages = [_image_message(benign_path)]
    with pytest.raises(TypeError, match="not_an_option"):
        llm.chat(messages, not_an_option=1)
    with pytest.raises(TypeError, match="input_ids"):
        llm.stream_chat(messages, input_ids=None)  # at the call, not at the first chunk
    with pytest.raises(TypeError, match="streamer"):
        asyncio.run(llm.astream_chat(messages, streamer=None))
    with pytest.raises(TypeError, match="not_an_option"):
        make_llm(generate_kwargs={"not_an_option": 1}).complete("hi")
    assert not llm.guard.detector_loaded


def test_stop_string_and_generation_options(make_llm: Callable[..., GuardAlignLocalLLM], monkeypatch: pytest.MonkeyPatch) -> None:
    options: list[Any] = []
    original = LocalLVLM.generate_ids
    monkeypatch.setattr(LocalLVLM, "generate_ids", lambda self, p, o=None, **k: options.append(o) or original(self, p, o, **k))
    llm = make_llm(stop=["zz"])
    llm.complete("hi", stop="ab")
    llm.complete("hi", stop=["ab", "cd"], max_tokens=3)
    llm.complete("hi")
    assert [o.stop for o in options] == [["ab"], ["ab", "cd"], ["zz"]] and options[1].max_new_tokens == 3


def test_system_prompt_reaches_the_model_in_complete(make_llm: Callable[..., GuardAlignLocalLLM], monkeypatch: pytest.MonkeyPatch) -> None:
    seen = _prepare_spy(monkeypatch)
    llm = make_llm(system_prompt="Answer in French.")
    llm.complete("Tell me a story.")
    asyncio.run(llm.acomplete("Tell me a story."))
    list(llm.stream_complete("Tell me a story."))
    for messages, _ in seen:
        assert [(m["role"], _texts(m)) for m in messages] == [("system", "Answer in French."), ("user", "Tell me a story.")]
    llm.complete("Tell me a story.", formatted=True)  # already formatted: the prompt as it is
    llm.chat([ChatMessage(role=MessageRole.USER, content="hi")])  # chat: the messages as given
    assert [m["role"] for m in seen[-2][0]] == ["user"] and [m["role"] for m in seen[-1][0]] == ["user"]


class _TokenCounter:
    """A logits processor that counts generated tokens, slowly enough that a full run takes seconds."""

    def __init__(self, delay: float = 0.005) -> None:
        self.calls = 0
        self.delay = delay

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        self.calls += 1
        time.sleep(self.delay)
        return scores


@pytest.fixture
def token_streams(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """The runner's token streams started during the test (each holds its worker thread)."""
    streams: list[Any] = []
    original = LocalLVLM.stream_text
    monkeypatch.setattr(LocalLVLM, "stream_text", lambda self, *a, **k: streams.append(original(self, *a, **k)) or streams[-1])
    return streams


def test_breaking_out_of_stream_chat_stops_generation(make_llm: Callable[..., GuardAlignLocalLLM], token_streams: list[Any]) -> None:
    from transformers import LogitsProcessorList

    llm = make_llm(letters_only=True, max_new_tokens=400)
    counter = _TokenCounter()
    for i, response in enumerate(llm.stream_chat([ChatMessage(role=MessageRole.USER, content="hi")], logits_processor=LogitsProcessorList([counter]))):
        if i == 1:  # the prefix, then one token
            break
    (stream,) = token_streams
    stream.thread.join(30)
    assert not stream.thread.is_alive() and counter.calls < 100


def test_closing_astream_chat_stops_generation(make_llm: Callable[..., GuardAlignLocalLLM], token_streams: list[Any]) -> None:
    from transformers import LogitsProcessorList

    llm = make_llm(letters_only=True, max_new_tokens=400)
    counter = _TokenCounter()

    async def consume() -> None:
        agen = await llm.astream_chat([ChatMessage(role=MessageRole.USER, content="hi")], logits_processor=LogitsProcessorList([counter]))
        i = 0
        async for _ in agen:
            i += 1
            if i == 2:
                break
        await agen.aclose()
        (stream,) = token_streams
        await asyncio.to_thread(stream.thread.join, 30)

    asyncio.run(consume())
    assert not token_streams[0].thread.is_alive() and counter.calls < 100


def test_a_file_swapped_after_its_check_never_reaches_the_model(
    make_llm: Callable[..., GuardAlignLocalLLM], benign_path: Path, figstep_path: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A path block's file replaced right after each check: the model gets the checked pixels, fresh or reused."""
    upload = tmp_path / "upload.png"
    shutil.copy(benign_path, upload)
    llm = make_llm()  # allows everything: the model would get the file as it is
    original = llm.guard.screen

    def racing(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        shutil.copy(figstep_path, upload)  # a concurrent writer swaps the file after its check
        return out

    monkeypatch.setattr(llm.guard, "screen", racing)
    seen = _prepare_spy(monkeypatch)
    checked = np.asarray(load_image(benign_path))
    message = ChatMessage(role=MessageRole.USER, blocks=[ImageBlock(path=upload, url="https://evil.example/x.png"), TextBlock(text="What?")])
    for turn in ("fresh", "reused"):
        shutil.copy(benign_path, upload)
        response = llm.chat([message])
        assert response.raw["guardalign"]["images"][0]["reason"].endswith("(reused)") == (turn == "reused")
        (image,) = seen[-1][1]
        assert np.array_equal(np.asarray(image), checked), turn

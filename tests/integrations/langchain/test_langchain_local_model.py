"""ChatGuardAlign: the calibrated local LVLM as a LangChain chat model (tiny random LLaVA on disk).

The checkpoint is written once per session and loaded through the real hub-id/path code
(``AutoModelForImageTextToText``/``AutoProcessor``); every ChatGuardAlign on it shares the
loaded weights. Random weights emit image placeholders and other special tokens, so the
tests suppress them (``model_kwargs``), as a user of such a checkpoint would.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lc_support import ALL_SAFE, ALL_UNSAFE, b64, mime

pytest.importorskip("transformers")

from langchain_core.language_models import BaseChatModel  # noqa: E402
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage  # noqa: E402
from langchain_tests.integration_tests import ChatModelIntegrationTests  # noqa: E402
from langchain_tests.unit_tests import ChatModelUnitTests  # noqa: E402

from guardalign_core.detector import create_detector  # noqa: E402
from guardalign_core.errors import GuardAlignViolation  # noqa: E402
from guardalign_core.lvlm import LocalLVLM  # noqa: E402
from guardalign_core.runners import get_local_lvlm  # noqa: E402
from guardalign_core.testing.tiny_lvlm import save_tiny_lvlm  # noqa: E402
from guardalign_integrations.langchain import ChatGuardAlign, GuardAlignGuard  # noqa: E402

PREFIX = "As an AI assistant, "


@pytest.fixture(scope="session")
def tiny_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny random LLaVA checkpoint folder (model + processor)."""
    return save_tiny_lvlm("llava", tmp_path_factory.mktemp("tiny-llava") / "llava")


@pytest.fixture(scope="session")
def other_llava(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A second tiny LLaVA (other weights, same tokenizer) for per-call ``model=`` overrides."""
    return save_tiny_lvlm("llava", tmp_path_factory.mktemp("tiny-llava-2") / "llava", seed=1)


@pytest.fixture(scope="session")
def special_ids(tiny_llava: Path) -> list[int]:
    from transformers import AutoProcessor

    return list(AutoProcessor.from_pretrained(tiny_llava).tokenizer.all_special_ids)


@pytest.fixture
def make_chat(tiny_llava: Path, special_ids: list[int], make_config: Callable[..., Any]) -> Callable[..., ChatGuardAlign]:
    def make(threshold: float = ALL_SAFE, *, action: str = "mask", fail_open: bool = False, **kwargs: Any) -> ChatGuardAlign:
        guard = GuardAlignGuard(config=make_config(threshold, action=action, fail_open=fail_open))
        kwargs.setdefault("max_tokens", 6)
        kwargs.setdefault("model_kwargs", {"suppress_tokens": special_ids})
        return ChatGuardAlign(model=str(tiny_llava), guard=guard, **kwargs)

    return make


def _image_message(path: Path, text: str = "Describe this image.") -> HumanMessage:
    return HumanMessage(content=[{"type": "text", "text": text}, {"type": "image", "base64": b64(path), "mime_type": mime(path)}])


def test_construction_loads_nothing(make_chat: Callable[..., ChatGuardAlign]) -> None:
    chat = make_chat()
    assert not chat.is_loaded and not chat.guard.engine.detector_loaded
    with pytest.raises(ValueError):
        ChatGuardAlign(model="x", dtype="float8")  # validated at construction, still nothing loaded


def test_invoke_runs_the_full_method_and_reports_it(make_chat: Callable[..., ChatGuardAlign], image_paths: list[Path]) -> None:
    chat = make_chat(ALL_UNSAFE)
    answer = chat.invoke([SystemMessage("Be brief."), _image_message(image_paths[0])])
    assert isinstance(answer, AIMessage) and answer.text.startswith(PREFIX)
    record = answer.response_metadata["guardalign"]
    assert record["decision"] == "mask" and record["images"][0]["unsafe"] is True
    generation = answer.response_metadata["guardalign_generation"]
    assert generation["prefix_used"] and generation["calibration"]["layers"] == [1, 2]
    assert answer.usage_metadata == {
        "input_tokens": generation["input_tokens"], "output_tokens": 6, "total_tokens": generation["input_tokens"] + 6,
    }
    assert answer.response_metadata["finish_reason"] == "length" and answer.response_metadata["model_name"] == chat.model


def test_the_model_sees_the_detectors_masked_image(
    make_chat: Callable[..., ChatGuardAlign], image_paths: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    chat = make_chat(ALL_UNSAFE)
    seen: list[Any] = []
    lvlm = chat.pipeline.lvlm
    original = LocalLVLM.prepare

    def spy(self: LocalLVLM, messages: Any, images: Any = (), **kwargs: Any) -> Any:
        seen.append((messages, list(images)))
        return original(self, messages, images, **kwargs)

    monkeypatch.setattr(LocalLVLM, "prepare", spy)
    chat.invoke([_image_message(image_paths[1], "What is shown?")])
    (messages, images), = seen
    expected = create_detector(chat.guard.config).scan([str(image_paths[1])])[0].masked_image
    assert len(images) == 1 and np.array_equal(np.asarray(images[0]), np.asarray(expected))
    assert messages[-1]["content"] == [{"type": "text", "text": "What is shown?"}, {"type": "image"}]
    assert lvlm is get_local_lvlm(chat.model, backend=chat.calibration.backend)  # one runner per checkpoint


def test_gamma_and_layers_shortcuts_per_adapter_on_one_shared_model(
    make_chat: Callable[..., ChatGuardAlign], image_paths: list[Path]
) -> None:
    from guardalign_core.calibration import CalibrationConfig

    weak, strong = make_chat(gamma=0.25, layers=[2]), make_chat(gamma=2.0)
    assert weak.calibration == CalibrationConfig(gamma=0.25, layers=[2]) and strong.calibration.gamma == 2.0
    assert weak.pipeline.lvlm is strong.pipeline.lvlm  # one shared runner and model object
    records = [chat.invoke([_image_message(image_paths[0])]).response_metadata["guardalign_generation"]["calibration"]
               for chat in (weak, strong, weak)]  # the first caller's strength does not stick to the runner
    assert [(r["gamma"], r["layers"]) for r in records] == [(0.25, [2]), (2.0, [1, 2]), (0.25, [2])]
    assert make_chat(gamma=0.5, calibration=CalibrationConfig(gamma=0.5)).calibration.gamma == 0.5  # agreeing is fine
    with pytest.raises(ValueError, match="layers=\\[1\\] disagrees"):
        make_chat(layers=[1], calibration=CalibrationConfig(layers=[2]))


def test_stream_yields_tokens_as_they_are_decoded(
    make_chat: Callable[..., ChatGuardAlign], image_paths: list[Path], tiny_llava: Path, special_ids: list[int]
) -> None:
    from transformers import AutoProcessor

    # transformers' streamer holds back symbols until the next space (they may be half a
    # character); keep the random model to letters so that every token is a delta.
    tokenizer = AutoProcessor.from_pretrained(tiny_llava).tokenizer
    not_letters = [i for i in range(len(tokenizer)) if not tokenizer.decode([i]).strip().isalpha()]
    chat = make_chat(max_tokens=12, model_kwargs={"suppress_tokens": sorted(set(special_ids + not_letters))})
    chat.invoke("warm up")  # load once, so the timing below is about decoding
    generating_at: list[bool] = []
    chunks: list[AIMessageChunk] = []
    for chunk in chat.stream([_image_message(image_paths[0])]):
        generating_at.append(any(t.name != "MainThread" and t.is_alive() for t in threading.enumerate()))
        chunks.append(chunk)
    assert chunks[0].content == PREFIX and len(chunks) >= 6
    assert generating_at[1] is True  # the first decoded delta arrived while generation was still running
    last = chunks[-1]
    assert last.chunk_position == "last" and last.usage_metadata["output_tokens"] == 12
    full = chunks[0]
    for chunk in chunks[1:]:
        full = full + chunk
    assert full.response_metadata["guardalign"]["decision"] == "allow"
    assert full.text == chat.invoke([_image_message(image_paths[0])]).text  # greedy: same tokens


async def test_async_invoke_and_stream(make_chat: Callable[..., ChatGuardAlign], image_paths: list[Path]) -> None:
    chat = make_chat()
    answer = await chat.ainvoke([_image_message(image_paths[0])])
    chunks = [chunk async for chunk in chat.astream([_image_message(image_paths[0])])]
    assert answer.text.startswith(PREFIX) and "".join(c.text for c in chunks) == answer.text


def test_block_refuses_or_raises_without_generating(
    make_chat: Callable[..., ChatGuardAlign], image_paths: list[Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    chat = make_chat(ALL_UNSAFE, action="block")
    monkeypatch.setattr(LocalLVLM, "generate_ids", lambda *a, **k: pytest.fail("a blocked request reached the model"))
    answer = chat.invoke([_image_message(image_paths[4])])
    assert answer.text == chat.refusal and any(b.get("type") == "refusal" for b in answer.content if isinstance(b, dict))
    assert answer.response_metadata["guardalign"]["decision"] == "block" and answer.usage_metadata["output_tokens"] == 0
    streamed = list(chat.stream([_image_message(image_paths[4])]))
    assert len(streamed) == 1 and streamed[0].chunk_position == "last"
    with pytest.raises(GuardAlignViolation, match="block"):
        make_chat(ALL_UNSAFE, action="block", on_block="raise").invoke([_image_message(image_paths[4])])


def test_undecodable_image_fails_closed_and_fail_open_drops_it(make_chat: Callable[..., ChatGuardAlign]) -> None:
    broken = HumanMessage(content=[{"type": "text", "text": "What is this?"},
                                   {"type": "image", "base64": "aGVsbG8gd29ybGQ=", "mime_type": "image/png"}])
    with pytest.raises(GuardAlignViolation, match=r"messages\[0\]\.content\[1\]"):
        make_chat(on_block="raise").invoke([broken])
    answer = make_chat(fail_open=True).invoke([broken])
    record = answer.response_metadata["guardalign"]
    assert record["status"] == "error" and record["decision"] == "allow" and answer.text.startswith(PREFIX)


def test_history_and_roles_reach_the_chat_template(make_chat: Callable[..., ChatGuardAlign], monkeypatch: pytest.MonkeyPatch) -> None:
    chat = make_chat()
    seen: list[Any] = []
    original = LocalLVLM.prepare
    monkeypatch.setattr(LocalLVLM, "prepare", lambda self, m, i=(), **k: seen.append(m) or original(self, m, i, **k))
    chat.invoke([SystemMessage("Be brief."), HumanMessage("Hi"), AIMessage("Hello."), HumanMessage("And now?")])
    assert [(m["role"], m["content"][0]["text"]) for m in seen[0]] == [
        ("system", "Be brief."), ("user", "Hi"), ("assistant", "Hello."), ("user", "And now?"),
    ]


def test_text_only_request_never_loads_clip(make_chat: Callable[..., ChatGuardAlign]) -> None:
    chat = make_chat()
    answer = chat.invoke("Hello")
    assert answer.response_metadata["guardalign"]["images"] == [] and not chat.guard.engine.detector_loaded


def test_tools_are_refused_clearly(make_chat: Callable[..., ChatGuardAlign]) -> None:
    with pytest.raises(NotImplementedError, match="GuardedChatModel"):
        make_chat().bind_tools([])


def test_stop_strings_cut_the_text_at_their_first_occurrence(make_chat: Callable[..., ChatGuardAlign]) -> None:
    chat = make_chat(max_tokens=12)
    free = chat.invoke("Tell me something.").text
    answer = free[len(PREFIX):]
    cut = answer[3:5]
    if len(cut.strip()) < 2:
        pytest.skip("the random model produced no usable stop string")
    expected = PREFIX + answer[: answer.index(cut)]
    assert chat.invoke("Tell me something.", stop=[cut]).text == expected  # the stop string is not returned
    assert "".join(c.text for c in chat.stream("Tell me something.", stop=[cut])) == expected


def test_an_abandoned_stream_stops_generating(make_chat: Callable[..., ChatGuardAlign]) -> None:
    from transformers import LogitsProcessor

    steps: list[int] = []

    class Count(LogitsProcessor):
        def __call__(self, input_ids: Any, scores: Any) -> Any:
            steps.append(1)
            time.sleep(0.01)
            return scores

    chat = make_chat(max_tokens=200)
    chat.invoke("warm up", max_tokens=1)
    steps.clear()
    stream = chat.stream("Tell me a long story.", logits_processor=[Count()])
    next(stream)
    stream.close()
    deadline = time.monotonic() + 5
    while any(t.name != "MainThread" and t.is_alive() and t.daemon for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(steps) < 100  # cancelled long before max_tokens


def test_streamed_history_keeps_its_roles(make_chat: Callable[..., ChatGuardAlign], monkeypatch: pytest.MonkeyPatch) -> None:
    chat = make_chat()
    seen: list[Any] = []
    original = LocalLVLM.prepare
    monkeypatch.setattr(LocalLVLM, "prepare", lambda self, m, i=(), **k: seen.append(m) or original(self, m, i, **k))
    chat.invoke([HumanMessage("Hi"), AIMessageChunk(content="Hello there"), HumanMessage("And?")])
    assert [m["role"] for m in seen[0]] == ["user", "assistant", "user"]


def test_settings_that_change_answers_change_the_cache_key(make_chat: Callable[..., ChatGuardAlign]) -> None:
    from guardalign_core.config import PrefixConfig

    base = make_chat()
    keys = {
        str(sorted(chat._identifying_params.items()))
        for chat in (base, base.model_copy(update={"prefix": PrefixConfig(when="always", text="Careful: ")}),
                     base.model_copy(update={"model_kwargs": {**base.model_kwargs, "repetition_penalty": 5.0}}),
                     base.model_copy(update={"top_p": 0.5}), base.model_copy(update={"seed": 3}))
    }
    assert len(keys) == 5


def test_copies_use_their_own_settings_and_deepcopy_works(make_chat: Callable[..., ChatGuardAlign]) -> None:
    import copy

    from guardalign_core.config import PrefixConfig

    chat = make_chat()
    chat.invoke("Hello")
    other = chat.model_copy(update={"prefix": PrefixConfig(when="always", text="NEW: ")})
    assert other.invoke("Hello").text.startswith("NEW: ")
    clone = copy.deepcopy(chat)
    assert clone.invoke("Hello").text == chat.invoke("Hello").text and clone.is_loaded


def test_guard_config_prefix_is_honoured(make_chat: Callable[..., ChatGuardAlign], make_config: Callable[..., Any]) -> None:
    config = make_config(ALL_SAFE, prefix={"text": "CUSTOM PREFIX: "})
    chat = make_chat().model_copy(update={"guard": GuardAlignGuard(config=config)})
    assert chat.invoke("Hello").text.startswith("CUSTOM PREFIX: ")


def test_unknown_generate_keyword_fails_before_any_scan(make_chat: Callable[..., ChatGuardAlign], image_paths: list[Path]) -> None:
    chat = make_chat()
    with pytest.raises(TypeError, match="foo"):
        chat.invoke([_image_message(image_paths[0])], foo=1)
    with pytest.raises(TypeError, match="input_ids"):
        chat.invoke("Hello", input_ids=None)
    assert not chat.guard.engine.detector_loaded
    with pytest.raises(NotImplementedError, match="structured output"):
        chat.with_structured_output({"title": "x", "type": "object", "properties": {}})


# -- langchain-tests standard suites ----------------------------------------------------------


class _LocalParams:
    _params: dict[str, Any] = {}

    _other: str | None = None

    @pytest.fixture(autouse=True)
    def _tiny(self, tiny_llava: Path, other_llava: Path, special_ids: list[int], make_config: Callable[..., Any]) -> None:
        self._other = str(other_llava)
        self._params = {
            "model": str(tiny_llava),
            "guard": GuardAlignGuard(config=make_config(ALL_SAFE)),
            "model_kwargs": {"suppress_tokens": special_ids},
        }

    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return ChatGuardAlign

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return self._params or {"model": "tiny-llava"}

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        return {"temperature": 0, "max_tokens": 8, "stop": []}

    @property
    def has_tool_calling(self) -> bool:
        return False

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def returns_usage_metadata(self) -> bool:
        return True

    @property
    def supports_anthropic_inputs(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str | None:
        return self._other  # a second checkpoint: a per-call model= loads (and shares) it


class TestChatGuardAlignUnit(_LocalParams, ChatModelUnitTests):
    """Standard unit tests (construction must not load weights: it is timed)."""


class TestChatGuardAlignIntegration(_LocalParams, ChatModelIntegrationTests):
    """Standard integration tests on the tiny model (``test_image_inputs`` downloads: marked network)."""

    def test_image_inputs_offline(self, model: BaseChatModel, image_paths: list[Path]) -> None:
        """OpenAI data-URL, v1 base64 and Anthropic base64 image blocks all reach the model as images."""
        path = image_paths[0]
        data = b64(path)
        for block in (
            {"type": "image_url", "image_url": {"url": f"data:{mime(path)};base64,{data}"}},
            {"type": "image", "base64": data, "mime_type": mime(path)},
            {"type": "image", "source": {"type": "base64", "media_type": mime(path), "data": data}},
        ):
            start = time.perf_counter()
            result = model.invoke([HumanMessage(content=[{"type": "text", "text": "Describe this image."}, block])])
            assert isinstance(result, AIMessage) and result.text and time.perf_counter() > start
            assert len(result.response_metadata["guardalign"]["images"]) == 1

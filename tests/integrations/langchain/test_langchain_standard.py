"""langchain-tests standard suites for GuardedChatModel (wrapping a fake vision model).

Capability flags describe what the wrapper plus its fake inner model really do: text and
image inputs, streaming, usage metadata and per-call model override pass through; tool
calling and structured output are not claimed because the fake cannot choose tools (the
delegation itself is tested in ``test_langchain_chat_models.py``).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from lc_support import ALL_SAFE, b64, mime
from guardalign_lc_fakes import RecordingChatModel, ScriptedToolModel, image_blocks
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_tests.integration_tests import ChatModelIntegrationTests
from langchain_tests.unit_tests import ChatModelUnitTests

from guardalign_integrations.langchain import GuardAlignGuard, GuardedChatModel

NETWORK_TESTS = {"test_image_inputs"}
"""Standard tests that download (marked ``network`` and skipped offline by this folder's conftest)."""


class _GuardedParams:
    """Shared set-up: a guard over the session's tiny CLIP, a fresh fake inner model per model."""

    _guard_config: Any = None

    @pytest.fixture(autouse=True)
    def _tiny_guard(self, make_config: Callable[..., Any]) -> None:
        self._guard_config = make_config(ALL_SAFE)

    @property
    def chat_model_class(self) -> type[BaseChatModel]:
        return GuardedChatModel

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": RecordingChatModel(), "guard": GuardAlignGuard(config=self._guard_config or "tiny-random")}

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        # Sampling settings are forwarded to the wrapped model; credentials, timeouts and
        # retries belong to the wrapped model and are rejected here with a pointer to it.
        return {"temperature": 0, "max_tokens": 100, "stop": []}

    @property
    def has_tool_calling(self) -> bool:
        return False  # the fake inner model cannot pick tools; delegation is tested separately

    @property
    def has_structured_output(self) -> bool:
        return False

    @property
    def supports_image_inputs(self) -> bool:
        return True

    @property
    def model_override_value(self) -> str:
        return "fake-vision-2"


class TestGuardedChatModelUnit(_GuardedParams, ChatModelUnitTests):
    """Standard unit tests."""


class TestGuardedChatModelIntegration(_GuardedParams, ChatModelIntegrationTests):
    """Standard integration tests (``test_image_inputs`` downloads, so it is marked network)."""

    def test_image_inputs_offline(self, model: BaseChatModel, image_paths: list[Path]) -> None:
        """The standard image-input shapes, with local images: OpenAI data URL, v1 base64, tool message."""
        path = image_paths[0]
        data = b64(path)
        shapes = [
            {"type": "image_url", "image_url": {"url": f"data:{mime(path)};base64,{data}"}},
            {"type": "image", "base64": data, "mime_type": mime(path)},
        ]
        for block in shapes:
            result = model.invoke([HumanMessage(content=[{"type": "text", "text": "Describe this image."}, block])])
            assert isinstance(result, AIMessage) and result.text
        tool_turn = [
            HumanMessage("get an image with the tool and describe it"),
            AIMessage([], tool_calls=[{"type": "tool_call", "id": "1", "name": "random_image", "args": {}}]),
            ToolMessage(content=[shapes[1]], tool_call_id="1", name="random_image"),
        ]
        assert isinstance(model.invoke(tool_turn), AIMessage)
        inner = model.model  # type: ignore[attr-defined]
        assert len(inner.received) == 3
        assert all(image_blocks(request[-1]) for request in inner.received)


class TestGuardedToolModelUnit(TestGuardedChatModelUnit):
    """Standard unit tests again, wrapping a tool-calling fake: ``bind_tools`` delegates to it."""

    @property
    def chat_model_params(self) -> dict[str, Any]:
        return {"model": ScriptedToolModel(script=[AIMessage("done")]), "guard": GuardAlignGuard(config=self._guard_config or "tiny-random")}

    @property
    def standard_chat_model_params(self) -> dict[str, Any]:
        return {"max_tokens": 100, "stop": []}  # the scripted fake has no temperature

    @property
    def has_tool_calling(self) -> bool:
        return True

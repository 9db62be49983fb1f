"""The LangChain examples run offline (tiny CLIP, fake models) and show what they promise."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from types import ModuleType

import pytest

EXAMPLES = Path(__file__).resolve().parents[3] / "examples"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(f"guardalign_example_{name}", EXAMPLES / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(autouse=True)
def _offline(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("GUARDALIGN_PRESET", raising=False)


def test_guard_chain_example(capsys: pytest.CaptureFixture[str]) -> None:
    _load("langchain_guard_chain").main()
    out = capsys.readouterr().out
    assert "[event] decision=mask" in out
    assert "raised GuardAlignViolation" in out and "refuses instead: I can't help" in out
    assert out.count("|") > 5  # streamed chunk by chunk


def test_agent_example(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("langchain.agents", reason="the agents extra (langchain>=1) is not installed")
    _load("langchain_agent").main()
    out = capsys.readouterr().out
    assert "call 0: mask" in out and "call 1: mask — 2 image(s)" in out  # the tool's image was moved to a user turn, and screened
    assert "tool: ['text']" in out  # OpenAI rejects images in role "tool" messages


def test_local_model_example(capsys: pytest.CaptureFixture[str]) -> None:
    pytest.importorskip("transformers")
    pytest.importorskip("llama_index.core")
    _load("local_model_chat").main()
    out = capsys.readouterr().out
    assert "loaded at construction? False" in out
    assert "[langchain] decision=mask prefix_used=True calibrated_layers=[1, 2]" in out
    assert "'output_tokens': 16" in out and "'completion_tokens': 16" in out
    assert out.count("|") > 3  # streamed in several chunks

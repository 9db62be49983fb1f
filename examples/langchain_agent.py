"""GuardAlign in a LangChain agent (``create_agent``) with ``GuardAlignMiddleware``.

The agent gets a user image, calls a tool that returns another image, and answers. Before
each model call the middleware masks unsafe patches in every image the model would see
(the agent's state keeps the originals) and records the decision.

Runs offline with a tiny random-weight CLIP (every patch flagged, to show masking) and a
scripted fake tool-calling model. With ``OPENAI_API_KEY`` set and ``langchain-openai``
installed it uses ``gpt-4o-mini``; ``GUARDALIGN_PRESET=fast-cpu`` selects a real CLIP.
Needs ``pip install "guardalign[agents]"``.

    python examples/langchain_agent.py
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import tempfile
from pathlib import Path
from typing import Any

from langchain.agents import create_agent
from langchain.agents.middleware import AgentMiddleware, ModelRequest
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage, HumanMessage, ToolMessage
from langchain_core.tools import tool
from PIL import Image

from guardalign_core.config import GuardConfig
from guardalign_core.testing.tiny_clip import save_tiny_clip_checkpoint, tiny_detector_config
from guardalign_integrations.langchain import GuardAlignMiddleware

DATA = Path(__file__).resolve().parents[1] / ".." / "shared" / "data"


def image_b64(name: str, fallback_size: int) -> str:
    """A shared test image if present, else a generated one."""
    path = DATA / name
    if path.is_file():
        return base64.b64encode(path.read_bytes()).decode()
    buffer = io.BytesIO()
    Image.linear_gradient("L").convert("RGB").resize((fallback_size, fallback_size)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@tool(response_format="content_and_artifact")
def fetch_chart(name: str) -> tuple[str, dict[str, Any]]:
    """Fetch the stored chart image with this name."""
    # OpenAI rejects images in role "tool" messages: the tool answers in text and hands the
    # image over as an artifact, which ImagesAsUserTurn shows the model in a user turn.
    return f"Chart {name!r} fetched; it is shown in the next message.", {
        "type": "image", "base64": image_b64("benign/coins.png", 200), "mime_type": "image/png",
    }


class ImagesAsUserTurn(AgentMiddleware):
    """Show each tool's image artifact to the model as a user turn right after the tool's message.

    Placed before GuardAlignMiddleware, so the guard screens the moved images with every other.
    """

    def wrap_model_call(self, request: ModelRequest, handler: Any) -> Any:
        messages = []
        for message in request.messages:
            messages.append(message)
            if isinstance(message, ToolMessage) and isinstance(message.artifact, dict) and message.artifact.get("type") == "image":
                messages.append(HumanMessage(content=[{"type": "text", "text": f"Image returned by {message.name}:"}, message.artifact]))
        return handler(request.override(messages=messages))


class ScriptedToolModel(GenericFakeChatModel):
    """A fake chat model that 'calls' tools from a script (bind_tools accepts and ignores the tools)."""

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedToolModel:
        return self


def make_model() -> BaseChatModel:
    if os.environ.get("OPENAI_API_KEY") and importlib.util.find_spec("langchain_openai"):
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(model="gpt-4o-mini")
    script = [
        AIMessage(content="", tool_calls=[{"name": "fetch_chart", "args": {"name": "q3"}, "id": "call-1", "type": "tool_call"}]),
        AIMessage(content="(fake model) Both images reached me with their unsafe patches masked."),
    ]
    return ScriptedToolModel(messages=iter(script))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        preset = os.environ.get("GUARDALIGN_PRESET")
        if preset:
            guard_config: GuardConfig | str = preset
        else:
            checkpoint = save_tiny_clip_checkpoint(Path(tmp) / "tiny-clip.pt")
            guard_config = GuardConfig(detector=tiny_detector_config(checkpoint, threshold=100.0, cache_dir=tmp))

        agent = create_agent(
            make_model(),
            tools=[fetch_chart],
            system_prompt="You compare images for the user.",
            middleware=[ImagesAsUserTurn(), GuardAlignMiddleware(guard_config)],  # on_block="raise" to raise instead of refusing
        )
        question = HumanMessage(
            content=[
                {"type": "text", "text": "Fetch the q3 chart and compare it with my picture."},
                {"type": "image", "base64": image_b64("figstep-tiny/query_ForbidQI_1_1_6.png", 320), "mime_type": "image/png"},
            ]
        )
        result = agent.invoke({"messages": [question]})

        for message in result["messages"]:
            kinds = [block["type"] for block in message.content_blocks]
            print(f"{message.type:>5}: {kinds} {message.text[:80]}")
        print("guard decisions, one per model call:")
        for i, decision in enumerate(result["guardalign_decisions"]):
            print(f"  call {i}: {decision['decision']} — {decision['reason']}")


if __name__ == "__main__":
    main()

"""GuardAlign in a LangChain chain: ``prompt | guard | llm``, check-only mode, events, streaming.

Runs offline: a tiny random-weight CLIP (its scores mean nothing, so the threshold below
simply makes every patch "unsafe" to show masking) and a fake chat model. With
``OPENAI_API_KEY`` set and ``langchain-openai`` installed it talks to ``gpt-4o-mini``
instead; set ``GUARDALIGN_PRESET=fast-cpu`` (or a calibrated config file) to use a real
CLIP (downloads weights).

    python examples/langchain_guard_chain.py
"""

from __future__ import annotations

import base64
import importlib.util
import io
import os
import tempfile
from pathlib import Path
from typing import Any

from langchain_core.callbacks import BaseCallbackHandler
from langchain_core.language_models import BaseChatModel
from langchain_core.language_models.fake_chat_models import GenericFakeChatModel
from langchain_core.messages import AIMessage
from langchain_core.prompts import ChatPromptTemplate
from PIL import Image

from guardalign_core.config import GuardConfig, PolicyConfig
from guardalign_core.errors import GuardAlignViolation
from guardalign_core.testing.tiny_clip import save_tiny_clip_checkpoint, tiny_detector_config
from guardalign_integrations.langchain import EVENT_NAME, GuardAlignGuard, GuardedChatModel

SHARED_IMAGE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "figstep-tiny" / "query_ForbidQI_1_1_6.png"


def demo_image_b64() -> str:
    """A FigStep test image if the shared data is there, else a generated picture."""
    if SHARED_IMAGE.is_file():
        return base64.b64encode(SHARED_IMAGE.read_bytes()).decode()
    buffer = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").resize((320, 320)).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def make_guard_config(workdir: Path) -> GuardConfig | str:
    """A real preset or config file if GUARDALIGN_PRESET is set, else the tiny offline CLIP (every patch flagged)."""
    preset = os.environ.get("GUARDALIGN_PRESET")
    if preset:
        return preset
    checkpoint = save_tiny_clip_checkpoint(workdir / "tiny-clip.pt")
    detector = tiny_detector_config(checkpoint, threshold=100.0, cache_dir=str(workdir))  # τ above every score
    return GuardConfig(detector=detector, policy=PolicyConfig(action="mask"))


def make_llm() -> BaseChatModel:
    """ChatOpenAI when a key and the package are available, otherwise a fake model."""
    if os.environ.get("OPENAI_API_KEY") and importlib.util.find_spec("langchain_openai"):
        from langchain_openai import ChatOpenAI

        return ChatOpenAI(model="gpt-4o-mini")
    answers = iter([AIMessage(content=f"(fake model) answer {i}: I see a picture with parts hidden.") for i in range(100)])
    return GenericFakeChatModel(messages=answers)


class PrintDecisions(BaseCallbackHandler):
    """Prints every guard decision as it is dispatched (the ``guardalign_decision`` event)."""

    def on_custom_event(self, name: str, data: Any, **kwargs: Any) -> None:
        if name == EVENT_NAME:
            print(f"  [event] decision={data['decision']} status={data['status']} images={len(data['images'])}: {data['reason']}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        config = make_guard_config(Path(tmp))
        guard = GuardAlignGuard(config=config)
        llm = make_llm()
        prompt = ChatPromptTemplate.from_messages(
            [
                ("system", "You are a helpful assistant that describes images."),
                ("user", [{"type": "text", "text": "{question}"}, {"type": "image_url", "image_url": {"url": "data:image/png;base64,{image}"}}]),
            ]
        )
        inputs = {"question": "What does this image ask me to do?", "image": demo_image_b64()}

        print("1. prompt | guard | llm")
        chain = prompt | guard | llm
        answer = chain.invoke(inputs, config={"callbacks": [PrintDecisions()]})
        print("  answer:", answer.text)

        print("2. check-only mode: the decision, nothing changed")
        decision = guard.check(prompt.invoke(inputs))
        first = decision.results[0]
        print(f"  {decision.decision.value}: {first.source} has {len(first.unsafe_boxes)} unsafe patch(es), categories {first.fired_categories[:3]}")

        print("3. streaming stays streaming")
        print("  ", end="")
        for chunk in chain.stream(inputs):
            print(chunk.text, end="|", flush=True)
        print()

        print("4. GuardedChatModel: any chat model behind the guard")
        guarded = GuardedChatModel(model=make_llm(), guard=guard)
        reply = guarded.invoke(prompt.invoke(inputs))
        print("  answer:", reply.text, "| decision in response_metadata:", reply.response_metadata["guardalign"]["decision"])

        print("5. the block policy")
        blocking = GuardAlignGuard(config=config, action="block")
        try:
            (prompt | blocking | llm).invoke(inputs)
        except GuardAlignViolation as err:
            print("  raised GuardAlignViolation:", str(err)[:120], "...")
        refusal = GuardedChatModel(model=make_llm(), guard=blocking).invoke(prompt.invoke(inputs))
        print("  GuardedChatModel refuses instead:", refusal.text)


if __name__ == "__main__":
    main()

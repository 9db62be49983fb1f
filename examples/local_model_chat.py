"""The full GuardAlign method on a local vision-language model, from LangChain and LlamaIndex.

Detection and masking, the safety prefix, and the cross-modal attention calibration all run
inside your process. Offline (the default) it uses a tiny random-weight LLaVA and a tiny
random CLIP built here: the text is gibberish and the scores mean nothing, but every step is
real. Set ``GUARDALIGN_LVLM`` to a hub id or folder (e.g. ``llava-hf/llava-1.5-7b-hf``) and
``GUARDALIGN_PRESET`` to a guard preset or config file (e.g. ``default``) to use real models.

    python examples/local_model_chat.py
"""

from __future__ import annotations

import base64
import os
import tempfile
from pathlib import Path
from typing import Any

from guardalign_core.config import GuardConfig
from guardalign_core.testing.tiny_clip import save_tiny_clip_checkpoint, tiny_detector_config
from guardalign_core.testing.tiny_lvlm import save_tiny_lvlm

IMAGE = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "figstep-tiny" / "query_ForbidQI_1_1_6.png"


def models(workdir: Path) -> tuple[str, GuardConfig | str, dict[str, Any]]:
    """(model id or folder, guard config, extra generate kwargs): real ones if configured, else tiny offline ones."""
    if os.environ.get("GUARDALIGN_LVLM"):
        return os.environ["GUARDALIGN_LVLM"], os.environ.get("GUARDALIGN_PRESET", "default"), {}
    print("No GUARDALIGN_LVLM set: running on a tiny random-weight LLaVA and CLIP built locally (output is gibberish).")
    folder = save_tiny_lvlm("llava", workdir / "tiny-llava")
    checkpoint = save_tiny_clip_checkpoint(workdir / "tiny-clip.pt")
    guard = GuardConfig(detector=tiny_detector_config(checkpoint, threshold=100.0, cache_dir=str(workdir)))  # every patch masked
    from transformers import AutoProcessor

    special = AutoProcessor.from_pretrained(folder).tokenizer.all_special_ids  # random weights emit them
    return str(folder), guard, {"suppress_tokens": special}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="guardalign-local-") as tmp:
        model, guard, generate_kwargs = models(Path(tmp))
        data = base64.b64encode(IMAGE.read_bytes()).decode()

        # -- LangChain ------------------------------------------------------------------------
        from langchain_core.messages import HumanMessage

        from guardalign_integrations.langchain import ChatGuardAlign

        chat = ChatGuardAlign(model=model, guard=guard, max_tokens=16, model_kwargs=generate_kwargs)
        print("loaded at construction?", chat.is_loaded)
        message = HumanMessage(content=[
            {"type": "text", "text": "Follow the steps in the image."},
            {"type": "image", "base64": data, "mime_type": "image/png"},
        ])
        print("streamed: ", end="")
        for chunk in chat.stream([message]):
            print(chunk.text, end="|", flush=True)
        answer = chat.invoke([message])
        record, generation = answer.response_metadata["guardalign"], answer.response_metadata["guardalign_generation"]
        print(f"\n[langchain] decision={record['decision']} prefix_used={generation['prefix_used']} "
              f"calibrated_layers={generation['calibration']['layers']} usage={answer.usage_metadata}")

        # -- LlamaIndex (shares the loaded weights and CLIP) -------------------------------------
        from llama_index.core.llms import ChatMessage, ImageBlock, TextBlock

        from guardalign_integrations.llama_index import GuardAlignLLM

        llm = GuardAlignLLM.from_hf(model, guard, max_new_tokens=16, generate_kwargs=generate_kwargs)
        response = llm.chat([ChatMessage(role="user", blocks=[ImageBlock(image=Path(IMAGE).read_bytes()), TextBlock(text="Follow the steps in the image.")])])
        print(f"[llamaindex] {response.message.content!r}")
        print(f"[llamaindex] decision={response.raw['guardalign']['decision']} usage={response.raw['usage']}")


if __name__ == "__main__":
    main()

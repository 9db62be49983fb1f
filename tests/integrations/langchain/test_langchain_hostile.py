"""Attacks on the LangChain adapters: block shapes a provider forwards but the guard used not to see.

Each test plays the attacker: an image hidden in a shape the old guard skipped must now be
screened (under a threshold above every score, so every patch is masked, the wrapped model
must receive exactly the guard's sanitised bytes, never the original), and a block the guard
cannot check must be refused by name instead of forwarded.
"""

from __future__ import annotations

import base64
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from lc_support import ALL_UNSAFE, b64
from guardalign_lc_fakes import RecordingChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from PIL import Image

from guardalign_core.errors import GuardAlignViolation
from guardalign_core.images import ImageLimits
from guardalign_integrations.langchain import GuardAlignGuard, GuardedChatModel


def _black(data: bytes) -> bool:
    import io

    return bool((np.asarray(Image.open(io.BytesIO(data)).convert("RGB")) == 0).all())


def _guard(make_config: Callable[..., Any], **kwargs: Any) -> GuardAlignGuard:
    return GuardAlignGuard(config=make_config(ALL_UNSAFE), **kwargs)


def _forwarded(guard: GuardAlignGuard, message: Any) -> tuple[Any, Any]:
    """(what the wrapped model received, the verdict)."""
    inner = RecordingChatModel()
    GuardedChatModel(model=inner, guard=guard).invoke([message])
    return inner.received[0][-1], guard.check([message])


def test_image_nested_in_an_anthropic_tool_result_is_masked(make_config: Callable[..., Any], image_paths: list[Path]) -> None:
    original = b64(image_paths[0])
    nested = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": original}, "cache_control": {"type": "ephemeral"}}
    message = HumanMessage(content=[{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "here"}, nested]}])
    received, _ = _forwarded(_guard(make_config), message)
    out = received.content[0]["content"][1]
    assert out["source"]["data"] != original and _black(base64.b64decode(out["source"]["data"]))
    assert out["cache_control"] == {"type": "ephemeral"}  # provider options survive masking


def test_image_inside_an_anthropic_document_content_source_is_masked(make_config: Callable[..., Any], image_paths: list[Path]) -> None:
    inner_image = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": b64(image_paths[1])}}
    document = {"type": "document", "source": {"type": "content", "content": [{"type": "text", "text": "p1"}, inner_image]}}
    received, _ = _forwarded(_guard(make_config), HumanMessage(content=[document]))
    out = received.content[0]["source"]["content"][1]
    assert _black(base64.b64decode(out["source"]["data"]))


def test_google_media_block_is_masked(make_config: Callable[..., Any], image_paths: list[Path]) -> None:
    media = {"type": "media", "mime_type": "image/png", "data": image_paths[0].read_bytes()}
    received, _ = _forwarded(_guard(make_config), HumanMessage(content=[media]))
    assert _black(received.content[0]["data"])


@pytest.mark.parametrize("declared", [None, "application/octet-stream"], ids=["no-mime", "octet-stream"])
def test_file_block_holding_image_bytes_is_masked(make_config: Callable[..., Any], image_paths: list[Path], declared: str | None) -> None:
    block: dict[str, Any] = {"type": "file", "base64": b64(image_paths[0])}
    if declared:
        block["mime_type"] = declared
    received, verdict = _forwarded(_guard(make_config), HumanMessage(content=[block]))
    out = received.content[0]
    assert out["mime_type"] == "image/png" and base64.b64decode(out["base64"]) == verdict.images[0].data
    assert _black(base64.b64decode(out["base64"]))


def test_image_the_provider_translator_drops_from_content_blocks_is_still_masked(
    make_config: Callable[..., Any], image_paths: list[Path]
) -> None:
    block = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(image_paths[0])}", "detail": "low"}}
    history = AIMessage(content=["Here is the picture:", block], response_metadata={"model_provider": "groq"})
    assert not any(b.get("type") == "image" for b in history.content_blocks)  # invisible to content_blocks
    received, _ = _forwarded(_guard(make_config), history)
    url = received.content[1]["image_url"]["url"]
    assert received.content[1]["image_url"]["detail"] == "low" and _black(base64.b64decode(url.split(",", 1)[1]))


def test_unknown_block_with_a_url_is_refused_by_name_unless_allow_listed(make_config: Callable[..., Any]) -> None:
    message = HumanMessage(content=[{"type": "text", "text": "see"}, {"type": "hologram", "payload": {"url": "https://evil.example/x.png"}}])
    inner = RecordingChatModel()
    llm = GuardedChatModel(model=inner, guard=_guard(make_config), on_block="raise")
    with pytest.raises(GuardAlignViolation, match=r"messages\[0\]\.content\[1\].*'hologram'"):
        llm.invoke([message])
    assert inner.received == []
    allowed = GuardedChatModel(model=inner, guard=_guard(make_config, allow_block_types=("hologram",)))
    allowed.invoke([message])
    assert inner.received[0][-1].content[1]["type"] == "hologram"


def test_a_pdf_file_block_is_refused_by_default(make_config: Callable[..., Any]) -> None:
    pdf = {"type": "file", "base64": base64.b64encode(b"%PDF-1.4\n...").decode(), "mime_type": "application/pdf"}
    verdict = _guard(make_config).check([HumanMessage(content=[pdf])])
    assert verdict.blocked and "'file'" in verdict.refused


def test_openai_detail_survives_masking(make_config: Callable[..., Any], image_paths: list[Path]) -> None:
    block = {"type": "image_url", "image_url": {"url": f"data:image/png;base64,{b64(image_paths[0])}", "detail": "high"}}
    received, _ = _forwarded(_guard(make_config), HumanMessage(content=[block]))
    assert received.content[0]["image_url"]["detail"] == "high" and received.content[0]["type"] == "image_url"


def test_the_cache_key_covers_every_setting_that_changes_what_is_forwarded(make_config: Callable[..., Any]) -> None:
    base = make_config(ALL_UNSAFE)
    variants = [
        base,
        base.model_copy(update={"images": ImageLimits(max_bytes=1024)}),
        base.model_copy(update={"detector": base.detector.model_copy(update={"mask_mode": "blur"})}),
        base.model_copy(update={"detector": base.detector.model_copy(update={"grid_size": 2})}),
        base.model_copy(update={"detector": base.detector.model_copy(update={"categories": ["violence"]})}),
    ]
    keys = {repr(sorted(GuardedChatModel(model=RecordingChatModel(), guard=c)._identifying_params["guard"].items())) for c in variants}
    assert len(keys) == len(variants)


def test_a_system_message_image_reaches_the_agent_model_masked(make_config: Callable[..., Any], image_paths: list[Path]) -> None:
    pytest.importorskip("langchain.agents")
    from guardalign_lc_fakes import ScriptedToolModel
    from langchain.agents import create_agent

    from guardalign_integrations.langchain import GuardAlignMiddleware

    system = SystemMessage(content=[{"type": "text", "text": "Reference:"}, {"type": "image", "base64": b64(image_paths[0]), "mime_type": "image/png"}])
    model = ScriptedToolModel(script=[AIMessage(content="ok")])
    agent = create_agent(model, tools=[], system_prompt=system, middleware=[GuardAlignMiddleware(make_config(ALL_UNSAFE))])
    agent.invoke({"messages": [HumanMessage(content="hi")]})
    sent = model.received[0][0]
    image = next(item for item in sent.content if isinstance(item, dict) and item.get("type") == "image")
    assert _black(base64.b64decode(image["base64"]))


def test_the_agent_middleware_puts_the_prefill_back_into_the_answer(make_config: Callable[..., Any], image_paths: list[Path]) -> None:
    pytest.importorskip("langchain.agents")
    from guardalign_lc_fakes import ScriptedToolModel
    from langchain.agents import create_agent

    from guardalign_integrations.langchain import GuardAlignMiddleware

    model = ScriptedToolModel(script=[AIMessage(content="I cannot help with that.")])
    middleware = GuardAlignMiddleware(make_config(ALL_UNSAFE, prefix={"prefill": True}))
    agent = create_agent(model, tools=[], middleware=[middleware])
    question = HumanMessage(content=[{"type": "image", "base64": b64(image_paths[0]), "mime_type": "image/png"}])
    result = agent.invoke({"messages": [question]})
    assert model.received[0][-1].content == "As an AI assistant,"  # no trailing whitespace
    assert result["messages"][-1].text == "As an AI assistant, I cannot help with that."


def test_local_files_in_message_content_are_not_read(make_config: Callable[..., Any], image_paths: list[Path]) -> None:
    for url in (f"file://{image_paths[0]}", str(image_paths[0]), "file:///no/such/file.png"):
        verdict = _guard(make_config).check([HumanMessage(content=[{"type": "image", "url": url}])])
        assert verdict.blocked and "local file" in (verdict.images[0].result.error or "")
        assert "no such file" not in verdict.images[0].result.error and "bytes" not in verdict.images[0].result.error


@pytest.mark.parametrize(
    "extra",
    [
        {"base64": "ORIGINAL", "mime_type": "image/png"},  # a v1 source beside the Anthropic one
        {"image_url": {"url": "data:image/png;base64,ORIGINAL"}},
        {"inline_data": {"mime_type": "image/png", "data": "ORIGINAL"}},
        {"image": "ORIGINAL"},
        {"note": "data:image/png;base64,ORIGINAL"},
        {"img": "ORIGINAL"},  # raw base64 under a key nobody lists
    ],
)
def test_a_second_copy_of_the_image_beside_the_screened_source_is_dropped(
    make_config: Callable[..., Any], image_paths: list[Path], extra: dict[str, Any]
) -> None:
    """Attack (red team): the guard masks the source it reads, a provider reads another key of the same block."""
    original = b64(image_paths[0])
    extra = {k: (v.replace("ORIGINAL", original) if isinstance(v, str) else
                 {kk: vv.replace("ORIGINAL", original) for kk, vv in v.items()}) for k, v in extra.items()}
    block = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": original}, **extra,
             "cache_control": {"type": "ephemeral"}}
    received, _ = _forwarded(_guard(make_config), HumanMessage(content=[{"type": "text", "text": "q"}, block]))
    out = received.content[1]
    assert original not in repr(out)  # no copy of the unchecked image survives anywhere in the block
    assert _black(base64.b64decode(out["source"]["data"])) and out["cache_control"] == {"type": "ephemeral"}


@pytest.mark.parametrize(
    "block",
    [
        {"type": "audio", "base64": "ORIGINAL"},
        {"type": "file", "mime_type": "text/plain", "base64": "ORIGINAL"},
        {"type": "text-plain", "mime_type": "text/plain", "base64": "ORIGINAL"},
    ],
)
def test_image_bytes_under_an_audio_or_text_label_are_screened(
    make_config: Callable[..., Any], image_paths: list[Path], block: dict[str, Any]
) -> None:
    """Attack (red team): PNG bytes declared as audio or text/plain were forwarded unscanned."""
    original = b64(image_paths[0])
    block = {k: (v.replace("ORIGINAL", original) if isinstance(v, str) else v) for k, v in block.items()}
    received, _ = _forwarded(_guard(make_config), HumanMessage(content=[{"type": "text", "text": "q"}, block]))
    out = received.content[1]
    assert original not in repr(out)
    assert _black(base64.b64decode(out["base64"]))


# -- raw media under keys and block types the guard does not know (default deny) -----------------


def _payloads(png: bytes) -> dict[str, Any]:
    text = base64.b64encode(png).decode()
    return {
        "base64": text,
        "urlsafe-base64": base64.urlsafe_b64encode(png).decode().rstrip("="),
        "line-wrapped-base64": "\n".join(text[i : i + 76] for i in range(0, len(text), 76)),
        "bytes": png,
        "data-url": f"data:image/png;base64,{text}",
        "byte-list": list(png[:256]),
        "nested": {"meta": [{"blob": text}]},
    }


@pytest.mark.parametrize("form", ["base64", "urlsafe-base64", "line-wrapped-base64", "bytes", "data-url", "byte-list", "nested"])
def test_image_bytes_under_an_unknown_key_of_an_unknown_block_are_refused(
    make_config: Callable[..., Any], image_paths: list[Path], form: str
) -> None:
    payload = _payloads(image_paths[0].read_bytes())[form]
    message = HumanMessage(content=[{"type": "text", "text": "see"}, {"type": "x-custom", "payload": payload}])
    inner = RecordingChatModel()
    with pytest.raises(GuardAlignViolation, match=r"messages\[0\]\.content\[1\].*'x-custom'"):
        GuardedChatModel(model=inner, guard=_guard(make_config), on_block="raise").invoke([message])
    assert inner.received == []
    allowed = GuardedChatModel(model=inner, guard=_guard(make_config, allow_block_types=("x-custom",)))
    allowed.invoke([message])  # the caller's explicit choice
    assert inner.received[0][-1].content[1]["type"] == "x-custom"


def _fill(value: Any, values: dict[str, str]) -> Any:
    if isinstance(value, dict):
        return {k: _fill(v, values) for k, v in value.items()}
    if isinstance(value, list):
        return [_fill(v, values) for v in value]
    return values.get(value, value) if isinstance(value, str) else value


@pytest.mark.parametrize(
    "block",
    [
        {"type": "text", "text": "hi", "payload": "__B64__"},
        {"type": "text", "text": "hi", "extras": {"attachment": "__DATA_URL__"}},
        {"type": "text", "text": "hi", "content": [{"type": "image_url", "image_url": {"url": "https://evil.example/x.png"}}]},
        {"type": "text", "text": {"type": "image", "base64": "__B64__", "mime_type": "image/png"}},
        {"type": "reasoning", "reasoning": "thinking", "extras": {"image": "__B64__"}},
        {"type": "citation", "url": "https://example.com", "cited_text": "x", "preview": "__B64__"},
    ],
    ids=["text+base64-key", "text+nested-data-url", "text+nested-image-block", "text-holding-a-block", "reasoning+image", "citation+base64"],
)
def test_inline_media_hidden_in_a_text_like_block_is_refused(make_config: Callable[..., Any], image_paths: list[Path], block: dict) -> None:
    text = b64(image_paths[0])
    filled = _fill(block, {"__B64__": text, "__DATA_URL__": f"data:image/png;base64,{text}"})
    verdict = _guard(make_config).check([HumanMessage(content=[filled])])
    assert verdict.blocked and f"'{block['type']}'" in verdict.refused and "messages[0].content[0]" in verdict.refused
    assert text not in verdict.refused  # the refusal names the block, never its content


def test_text_like_blocks_with_citations_options_and_provider_tokens_still_pass(make_config: Callable[..., Any], image_paths: list[Path]) -> None:
    """Default deny must not refuse what providers themselves send back in a conversation."""
    token = base64.b64encode(bytes(range(256)) * 2).decode()  # an opaque provider token looks like base64
    history = [
        HumanMessage(content=[{"type": "text", "text": "hi", "cache_control": {"type": "ephemeral"}}]),
        AIMessage(content=[
            {"type": "thinking", "thinking": "hmm", "signature": token},
            {"type": "redacted_thinking", "data": token},
            {"type": "reasoning", "id": "rs_1", "summary": [{"type": "summary_text", "text": "s"}], "encrypted_content": token},
            {"type": "text", "text": "see", "annotations": [{"type": "url_citation", "url": "https://example.com/a", "title": "a"}]},
            {"type": "tool_use", "id": "t1", "name": "upload", "input": {"image": b64(image_paths[0])}},
            {"type": "text", "text": "sha", "id": "a" * 64},
        ]),
        HumanMessage(content="thanks"),
    ]
    verdict = _guard(make_config).check(history)
    assert not verdict.blocked and verdict.refused is None and verdict.images == []


def test_the_cache_key_covers_the_concept_bank_and_its_contents(make_config: Callable[..., Any], tmp_path: Path) -> None:
    """A different bank file, or the same file edited, changes what is masked: it must change the key."""
    import yaml

    from importlib import resources

    shipped = yaml.safe_load(resources.files("guardalign_core").joinpath("data/unsafe_concepts.yaml").read_text(encoding="utf-8"))
    bank = tmp_path / "bank.yaml"
    bank.write_text(yaml.safe_dump({"version": 1, "categories": dict(list(shipped["categories"].items())[:2])}))
    base = make_config(ALL_UNSAFE)

    def key(config: Any) -> str:
        return GuardedChatModel(model=RecordingChatModel(), guard=config)._identifying_params["guard"]["fingerprint"]

    with_bank = base.model_copy(update={"detector": base.detector.model_copy(update={"concepts": str(bank)})})
    first = key(with_bank)
    bank.write_text(yaml.safe_dump({"version": 1, "categories": dict(list(shipped["categories"].items())[:1])}))
    assert len({key(base), first, key(with_bank)}) == 3


@pytest.mark.parametrize("shape", ["base64", "data_url"])
def test_a_url_safe_polyglot_reaches_the_model_as_the_image_that_was_checked(make_config: Callable[..., Any], shape: str) -> None:
    # The guard reads '_' as URL-safe base64 (image A); a provider that decodes leniently skips
    # it and reads image B. Only a canonical payload may go as it came.
    from base64_polyglot import pixel, polyglot
    from lc_support import ALL_SAFE

    payload, guard_reads, lenient_reads = polyglot()
    assert pixel(guard_reads) != pixel(lenient_reads)
    block = ({"type": "image", "base64": payload, "mime_type": "image/jpeg"} if shape == "base64"
             else {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64," + payload}})
    guard = GuardAlignGuard(config=make_config(ALL_SAFE))
    received, verdict = _forwarded(guard, HumanMessage(content=[{"type": "text", "text": "colour?"}, block]))
    assert verdict.images[0].decision.value == "allow"
    out = received.content[1]
    sent = out["base64"] if shape == "base64" else out["image_url"]["url"].split(",", 1)[1]
    assert sent != payload
    assert base64.b64decode(sent) == base64.b64decode(sent, validate=True) == guard_reads  # every decoder reads what was checked


@pytest.mark.parametrize("kind", ["image", "file"])
def test_an_image_block_with_base64_and_data_reaches_the_model_with_the_checked_bytes_only(
    make_config: Callable[..., Any], image_paths: list[Path], kind: str
) -> None:
    # langchain-core's OpenAI converter sends block["data"] when present; the guard reads
    # block["base64"] first, and used to forward the block as it came: checked one, sent the other
    from lc_support import ALL_SAFE

    safe, other = b64(image_paths[0]), b64(image_paths[1])
    block = {"type": kind, "base64": safe, "data": other, "mime_type": "image/png"}
    inner = RecordingChatModel()
    GuardedChatModel(model=inner, guard=GuardAlignGuard(config=make_config(ALL_SAFE))).invoke([HumanMessage(content=[{"type": "text", "text": "see"}, block])])
    out = inner.received[0][-1].content[1]
    payloads = [out.get(key) for key in ("base64", "data") if out.get(key)]
    assert payloads == [safe] or (len(payloads) == 1 and base64.b64decode(payloads[0]) == base64.b64decode(safe)), out


@pytest.mark.parametrize("kind, mime", [("audio", "audio/wav"), ("file", "text/plain"), ("file", "application/pdf")])
def test_a_non_image_block_holding_data_twice_is_refused(make_config: Callable[..., Any], image_paths: list[Path], kind: str, mime: str) -> None:
    # the guard finds no image in base64 (audio), the provider sends data (an image)
    from lc_support import ALL_SAFE

    block = {"type": kind, "base64": base64.b64encode(b"RIFF....WAVEfmt ").decode(), "data": b64(image_paths[1]), "mime_type": mime}
    inner = RecordingChatModel()
    llm = GuardedChatModel(model=inner, guard=GuardAlignGuard(config=make_config(ALL_SAFE)), on_block="raise")
    with pytest.raises(GuardAlignViolation, match="twice"):
        llm.invoke([HumanMessage(content=[{"type": "text", "text": "see"}, block])])
    assert inner.received == []

"""Forwarded images carry exactly what the guard checked: never a second source, never a second read.

Regression tests for a block or node with more than one source (a path or bytes *and* a
URL), forwarded after its check: the provider must not get a chance to fetch the unchecked
URL, nor re-read a file changed since its check, on a fresh turn or on one that reuses the
guard's remembered verdict.
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from llama_index.core.base.llms.types import ChatMessage, ImageBlock, TextBlock
from llama_index.core.schema import ImageNode, MediaResource, Node, NodeWithScore

from guardalign_integrations.llama_index import GuardAlignImagePostprocessor, GuardAlignLLM

from llamaindex_support import block_pixels

EVIL = "https://evil.example/harmful.png"


def _request(block: ImageBlock) -> list[ChatMessage]:
    return [ChatMessage(role="user", blocks=[block, TextBlock(text="Describe it.")])]


def _forwarded_bytes(block: ImageBlock) -> bytes:
    return block.resolve_image().read()


def _swap_after_each_check(guard: Any, path: Path, replacement: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A concurrent writer: ``path`` becomes ``replacement`` right after every check of the guard."""
    original = guard.screen

    def racing(*args: Any, **kwargs: Any) -> Any:
        out = original(*args, **kwargs)
        shutil.copy(replacement, path)
        return out

    monkeypatch.setattr(guard, "screen", racing)


@pytest.mark.parametrize("sources", ["path+url", "bytes+url", "bytes+path"])
def test_multi_source_block_forwards_only_the_checked_bytes(sources, make_config, recording_llm, benign_path, figstep_path):
    checked = benign_path.read_bytes()
    block = {
        "path+url": lambda: ImageBlock(path=benign_path, url=EVIL),
        "bytes+url": lambda: ImageBlock(image=checked, url=EVIL),
        "bytes+path": lambda: ImageBlock(image=checked, path=figstep_path),  # the guard reads the bytes
    }[sources]()
    llm = GuardAlignLLM(recording_llm, make_config(-1.0))  # allow everything
    for turn in ("fresh", "reused"):
        response = llm.chat(_request(block))
        record = response.additional_kwargs["guardalign"]
        assert record["decision"] == "allow" and record["images"][0]["reason"].endswith("(reused)") == (turn == "reused")
        (sent,) = recording_llm.image_blocks()
        assert sent.path is None and sent.url is None, turn
        assert _forwarded_bytes(sent) == checked and sent.image_mimetype == "image/png", turn


def test_upload_then_stored_copy_with_attacker_url(make_config, recording_llm, benign_path):
    """Turn 1 uploads the picture inline; turn 2 points at the stored copy plus an attacker URL (a memory hit)."""
    llm = GuardAlignLLM(recording_llm, make_config(-1.0))
    llm.chat(_request(ImageBlock(image=benign_path.read_bytes(), detail="high")))
    (first,) = recording_llm.image_blocks()
    assert first.path is None and first.url is None and _forwarded_bytes(first) == benign_path.read_bytes()
    response = llm.chat(_request(ImageBlock(path=benign_path, url=EVIL, detail="low")))
    assert response.additional_kwargs["guardalign"]["images"][0]["reason"].endswith("(reused)")
    (sent,) = recording_llm.image_blocks()
    assert sent.url is None and sent.path is None and sent.detail == "low"
    assert _forwarded_bytes(sent) == benign_path.read_bytes()


def test_inline_only_block_is_forwarded_as_it_came(make_config, recording_llm, benign_path):
    llm = GuardAlignLLM(recording_llm, make_config(-1.0))
    block = ImageBlock(image=benign_path.read_bytes())
    for _ in ("fresh", "reused"):
        llm.chat(_request(block))
        assert recording_llm.image_blocks()[0] is block


def test_masked_multi_source_block_is_the_png_on_both_turns(make_config, recording_llm, benign_path):
    llm = GuardAlignLLM(recording_llm, make_config(100.0))  # every patch unsafe: all masked
    for turn in ("fresh", "reused"):
        llm.chat(_request(ImageBlock(path=benign_path, url=EVIL)))
        (sent,) = recording_llm.image_blocks()
        assert sent.url is None and sent.path is None and sent.image_mimetype == "image/png", turn
        assert np.count_nonzero(block_pixels(sent)) == 0, turn


def test_file_swapped_after_its_check_is_not_forwarded(make_config, recording_llm, benign_path, figstep_path, tmp_path, monkeypatch):
    upload = tmp_path / "upload.png"
    llm = GuardAlignLLM(recording_llm, make_config(-1.0))
    _swap_after_each_check(llm.guard, upload, figstep_path, monkeypatch)
    for turn in ("fresh", "reused"):
        shutil.copy(benign_path, upload)
        llm.chat(_request(ImageBlock(path=upload)))
        (sent,) = recording_llm.image_blocks()
        assert sent.path is None and _forwarded_bytes(sent) == benign_path.read_bytes(), turn


def test_fail_open_error_is_forwarded_as_sent(make_config, recording_llm):
    llm = GuardAlignLLM(recording_llm, make_config(-1.0, fail_open=True))
    block = ImageBlock(image=b"not an image at all")
    response = llm.chat(_request(block))
    assert response.additional_kwargs["guardalign"]["status"] == "error"
    assert recording_llm.image_blocks()[0] is block


# -- retrieved nodes ----------------------------------------------------------------------------
def _screen(screen: GuardAlignImagePostprocessor, node: Any) -> Any:
    (out,) = screen.postprocess_nodes([NodeWithScore(node=node, score=1.0)])
    return out.node


@pytest.mark.parametrize("kind", ["path+url", "bytes+url"])
def test_image_node_with_url_beside_keeps_no_url(kind, make_config, benign_path):
    checked = benign_path.read_bytes()
    if kind == "path+url":
        node = ImageNode(image_path=str(benign_path), image_url=EVIL, id_="n")
    else:
        node = ImageNode(image=base64.b64encode(checked).decode(), image_url=EVIL, id_="n")
    screen = GuardAlignImagePostprocessor(make_config(-1.0))
    for turn in ("fresh", "reused"):
        out = _screen(screen, node)
        assert out.metadata["guardalign"]["reason"].endswith("(reused)") == (turn == "reused")
        assert out.image_url is None and out.image_path is None, turn
        assert base64.b64decode(out.image) == checked and out.image_mimetype == "image/png", turn
    assert node.image_url == EVIL  # the stored node is untouched


def test_resource_node_with_url_beside_keeps_no_url(make_config, benign_path):
    node = Node(image_resource=MediaResource(path=benign_path, url=EVIL, text="caption"), id_="r")
    screen = GuardAlignImagePostprocessor(make_config(-1.0))
    for turn in ("fresh", "reused"):
        out = _screen(screen, node).image_resource
        assert out.url is None and out.path is None and out.text == "caption", turn
        assert base64.b64decode(out.data) == benign_path.read_bytes(), turn


def test_inline_only_node_is_kept(make_config, benign_path):
    node = ImageNode(image=base64.b64encode(benign_path.read_bytes()).decode(), id_="n")
    out = _screen(GuardAlignImagePostprocessor(make_config(-1.0)), node)
    assert out.image == node.image and out.image_url is None and out.image_path is None


def test_node_file_swapped_after_its_check_is_not_forwarded(make_config, benign_path, figstep_path, tmp_path, monkeypatch):
    stored = tmp_path / "stored.png"
    screen = GuardAlignImagePostprocessor(make_config(-1.0))
    _swap_after_each_check(screen.guard, stored, figstep_path, monkeypatch)
    for turn in ("fresh", "reused"):
        shutil.copy(benign_path, stored)
        out = _screen(screen, ImageNode(image_path=str(stored), id_="n"))
        assert out.image_path is None and base64.b64decode(out.image) == benign_path.read_bytes(), turn


def test_masked_node_with_url_beside_is_the_png(make_config, benign_path):
    screen = GuardAlignImagePostprocessor(make_config(100.0))
    node = ImageNode(image_path=str(benign_path), image_url=EVIL, id_="n")
    for turn in ("fresh", "reused"):
        out = _screen(screen, node)
        assert out.metadata["guardalign"]["decision"] == "mask" and out.image_url is None and out.image_path is None, turn
        assert out.image_mimetype == "image/png"

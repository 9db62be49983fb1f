"""``guardalign eval`` through the LangChain adapter: the self-registering judge and the black-box target.

The target is driven by the real runner on real FigStep-Tiny images with a tiny random CLIP;
the fake chat model records exactly what the adapter forwarded, so the test compares the
bytes the model saw with what the detector scanned and masked.
"""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from guardalign_lc_fakes import RecordingChatModel
from langchain_core.messages import AIMessage, HumanMessage, SystemMessage
from PIL import Image

from guardalign_core.config import DEFAULT_SAFETY_INSTRUCTION, GuardConfig, PolicyConfig, PrefixConfig
from guardalign_core.detector import create_detector
from guardalign_core.eval import MethodSpec, get_method, load_benchmark, run_eval
from guardalign_core.eval.judges import ChatModelJudge, get_judge
from guardalign_core.eval.targets import DEFAULT_REFUSAL
from guardalign_core.images import load_image
from guardalign_core.testing.tiny_clip import tiny_detector_config
from guardalign_integrations.langchain import judges as lc_judges
from guardalign_integrations.langchain.eval_target import GuardedChatTarget

ALL = ["vanilla", "eta", "ot", "calibration", "guardalign"]
PREFIX = "As an AI assistant, "
REPLY = "I cannot help with that."


# -- the judge registers itself from the adapter package -------------------------------------------


class _Reply:
    def __init__(self, text):
        self.content = text


class StubChatModel:
    model_name = "stub-model"

    def invoke(self, messages):
        return _Reply("safe")

    def batch(self, inputs, config=None):
        return [self.invoke(m) for m in inputs]


def test_langchain_judge_is_registered_by_the_adapter_and_builds_through_init_chat_model(monkeypatch) -> None:
    chat_models = pytest.importorskip("langchain.chat_models")
    seen = {}

    def fake_init(model, **kwargs):
        seen.update(model=model, **kwargs)
        return StubChatModel()

    monkeypatch.setattr(lc_judges, "is_langchain_agents_available", lambda: True)
    monkeypatch.setattr(chat_models, "init_chat_model", fake_init)
    judge = get_judge("langchain:openai:gpt-4o-mini", temperature=0, batch_size=3, template="md-judge@v2")
    assert isinstance(judge, ChatModelJudge)
    assert seen == {"model": "openai:gpt-4o-mini", "temperature": 0}
    assert judge.batch_size == 3 and judge.template.spec == "md-judge@v2"
    with pytest.raises(ValueError, match="PROVIDER:MODEL"):
        get_judge("langchain")


def test_langchain_judge_without_langchain_is_a_clear_error(monkeypatch) -> None:
    monkeypatch.setattr(lc_judges, "is_langchain_agents_available", lambda: False)
    with pytest.raises(ImportError, match=r"pip install guardalign\[agents\]"):
        get_judge("langchain:openai:gpt-4o-mini")


# -- the black-box target goes through GuardedChatModel --------------------------------------------


@pytest.fixture(scope="module")
def figstep(data_dir):
    return data_dir / "figstep-tiny"


@pytest.fixture(scope="module")
def guard(tiny_clip_checkpoint, embed_cache_dir) -> GuardConfig:
    return GuardConfig(detector=tiny_detector_config(tiny_clip_checkpoint, threshold=1e9, cosine_threshold=-1.0, cache_dir=str(embed_cache_dir)))


def _sent_image(messages) -> np.ndarray:
    """The pixels of the one image the model received (from the standard content blocks)."""
    (block,) = [b for m in messages for b in m.content_blocks if b.get("type") == "image"]
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(block["base64"]))).convert("RGB"))


def _system_text(messages) -> str | None:
    return messages[0].text if isinstance(messages[0], SystemMessage) else None


def test_black_box_target_masks_through_the_adapter_and_marks_calibration_prompt_only(guard, figstep, tmp_path):
    image = str(figstep / "query_ForbidQI_1_1_6.png")
    # τ at the median patch score: some patches masked, some kept, so the comparison means something.
    scores = np.asarray(create_detector(guard, policy=PolicyConfig(action="flag")).scan([image])[0].statistic)
    config = guard.model_copy(update={"detector": guard.detector.model_copy(update={"threshold": float(np.median(scores))})})
    chat = RecordingChatModel(reply=REPLY)
    target = GuardedChatTarget(chat)
    run = run_eval(target, [f"figstep:{figstep}"], ALL, ["refusal"], out_dir=tmp_path, guard=config, limit=1, progress=False)
    assert len(chat.received) == 5 and target.model_id == "fake-vision-1"
    sent = dict(zip(ALL, chat.received))

    expected = np.asarray(create_detector(config).scan([image])[0].masked_image)
    original = np.asarray(load_image(image))
    assert not np.array_equal(expected, original) and expected.any()  # partly masked
    for name in ("ot", "guardalign"):
        assert np.array_equal(_sent_image(sent[name]), expected)
    for name in ("vanilla", "calibration", "eta"):  # eta flags but does not mask
        assert np.array_equal(_sent_image(sent[name]), original)
    for name in ("eta", "calibration", "guardalign"):
        system = _system_text(sent[name])
        assert system and DEFAULT_SAFETY_INSTRUCTION in system and 'Begin your answer with "As an AI assistant,"' in system
    for name in ("vanilla", "ot"):
        assert [type(m) for m in sent[name]] == [HumanMessage]

    records = {r.method: r for r in run.records}
    for name in ("calibration", "guardalign"):
        g = records[name].guard
        assert g["prompt_only"] and g["calibration"] is None and g["calibration_requested"]
        assert "black-box" in g["calibration_unavailable"] and g["prefix_delivery"] == "instruction"
    assert records["vanilla"].guard["calibration_unavailable"] is None and records["vanilla"].decision is None
    assert records["ot"].decision == "mask" and records["eta"].decision == "flag" and records["eta"].flagged
    assert all(r.response == REPLY and r.verdicts["refusal"].refused and r.output_tokens for r in run.records)
    assert any("calibration is unavailable on a black-box model: calibration, guardalign" in n for n in run.notes)
    info = json.loads((tmp_path / "run.json").read_text())
    assert info["target"] == "black-box" and info["model"] == "fake-vision-1"


def test_black_box_prefill_keeps_the_prefix_and_block_never_calls_the_model(guard, figstep, tmp_path):
    config = guard.model_copy(update={"prefix": PrefixConfig(prefill=True)})
    chat = RecordingChatModel(reply=REPLY)
    block = MethodSpec(name="ot-block", detector="ot", action="block")
    run = run_eval(GuardedChatTarget(chat), [f"figstep:{figstep}"], [get_method("guardalign"), block], [], out_dir=tmp_path,
                   guard=config, limit=1, progress=False)
    assert len(chat.received) == 1  # the blocked request never reached the model
    last = chat.received[0][-1]
    assert isinstance(last, AIMessage) and last.content == PREFIX.rstrip()  # providers reject a trailing space
    full, blocked = run.records
    assert full.response == PREFIX + REPLY and full.guard["prefix_delivery"] == "prefill"
    assert blocked.response == DEFAULT_REFUSAL and blocked.decision == "block" and blocked.output_tokens == 0


def test_an_undecodable_image_is_an_error_for_every_method_and_never_sent(guard, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    (folder / "bad.png").write_text("not an image at all", encoding="utf-8")
    (folder / "items.csv").write_text("id,image,prompt,safe\nbad,bad.png,Describe this image.,false\n", encoding="utf-8")
    bench = load_benchmark(f"folder:{folder}", name="broken")
    for fail_open in (False, True):  # fail_open must not let an unchecked image reach the model from an evaluation
        config = guard.model_copy(update={"policy": guard.policy.model_copy(update={"fail_open": fail_open})})
        chat = RecordingChatModel(reply=REPLY)
        run = run_eval(GuardedChatTarget(chat), [bench], ["vanilla", "eta", "ot"], ["refusal"], out_dir=tmp_path / f"out{fail_open}",
                       guard=config, progress=False)
        assert len({r.error for r in run.records}) == 1 and run.records[0].error and chat.received == []


def test_the_target_needs_a_langchain_chat_model():
    with pytest.raises(TypeError, match="BaseChatModel"):
        GuardedChatTarget(object())

"""One setting, one holder: the call's calibration decides, on a model shared by several users.

Runners (the shared registry) and installs hold no strength; each pipeline (and each adapter,
which builds one per call) passes its own. The record of a generation lists exactly the layers
that were calibrated.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from calibration_reference import eq13_weights
from shared_images import shared_data

import guardalign_core.lvlm as lvlm_module
from guardalign_core.calibration import DEFAULT_GAMMA, AttentionCall, CalibrationConfig
from guardalign_core.config import GuardConfig
from guardalign_core.lvlm import LocalLVLM
from guardalign_core.pipeline import GuardAlignPipeline
from guardalign_core.runners import get_local_lvlm, release_local_lvlms
from guardalign_core.testing.tiny_clip import tiny_detector_config
from guardalign_core.testing.tiny_lvlm import build_tiny_lvlm, save_tiny_lvlm

IMAGE = str(shared_data("benign") / "chelsea.png")


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture
def guard_config(tiny_clip_checkpoint, embed_cache_dir) -> GuardConfig:
    return GuardConfig(detector=tiny_detector_config(tiny_clip_checkpoint, threshold=-1e9, cache_dir=str(embed_cache_dir)))


@pytest.fixture
def observed(monkeypatch: pytest.MonkeyPatch) -> list[list[AttentionCall]]:
    """Every attention call of every generation, one list per ``calibrated`` block the runner entered."""
    blocks: list[list[AttentionCall]] = []
    original = lvlm_module.calibrated

    def spy(model, prefix, config=None, **kwargs):
        blocks.append([])
        return original(model, prefix, config, observer=blocks[-1].append)

    monkeypatch.setattr(lvlm_module, "calibrated", spy)
    return blocks


def _messages(text: str = "Describe the image.") -> list[dict]:
    return [{"role": "user", "content": [{"type": "image", "image": IMAGE}, {"type": "text", "text": text}]}]


def test_two_users_of_one_shared_model_each_get_their_own_gamma(guard_config, observed, tmp_path) -> None:
    folder = save_tiny_lvlm("llava", tmp_path / "llava")
    release_local_lvlms(str(folder))
    runner = get_local_lvlm(str(folder), backend="eager")
    weak = GuardAlignPipeline(runner, guard_config, calibration=CalibrationConfig(gamma=0.5, backend="eager"))
    strong = GuardAlignPipeline(get_local_lvlm(str(folder), backend="eager"), guard_config,
                                calibration=CalibrationConfig(gamma=2.0, backend="eager"))
    assert weak.lvlm is strong.lvlm  # one runner, one model object
    special = {"suppress_tokens": runner.tokenizer.all_special_ids}
    records = {}
    for name, pipe in (("weak", weak), ("strong", strong), ("weak again", weak)):
        records[name] = pipe.generate(_messages(), max_new_tokens=3, **special).record
    assert [r.calibration["gamma"] for r in records.values()] == [0.5, 2.0, 0.5]
    (span,) = records["weak"].prefix_spans
    by_run = dict(zip(records, observed, strict=True))
    for name, gamma in (("weak", 0.5), ("strong", 2.0), ("weak again", 0.5)):
        calls = [c for c in by_run[name] if c.layer_idx in (1, 2)]
        assert calls and all(c.gamma == gamma for c in calls)
        for call in calls:  # prefill and both decoding steps: Eq. 13 with this user's own gamma
            assert np.allclose(call.weights.double().numpy(), eq13_weights(call, span, gamma), atol=1e-5)
    # same prompt, same model: the two strengths give different attention at the calibrated layers
    weak_prefill = next(c for c in by_run["weak"] if c.layer_idx == 1)
    strong_prefill = next(c for c in by_run["strong"] if c.layer_idx == 1)
    assert not torch.allclose(weak_prefill.weights[..., -1, :], strong_prefill.weights[..., -1, :], atol=1e-3)
    # a later user of the shared runner who sets nothing gets the library default, not a first caller's
    late = GuardAlignPipeline(get_local_lvlm(str(folder), backend="eager"), guard_config)
    assert late.generate(_messages(), max_new_tokens=2, **special).record.calibration["gamma"] == DEFAULT_GAMMA
    release_local_lvlms(str(folder))


def test_the_record_lists_exactly_the_calibrated_layers_of_mllama(guard_config, observed) -> None:
    model, processor = build_tiny_lvlm("mllama")
    pipe = GuardAlignPipeline(LocalLVLM(model=model, processor=processor), guard_config,
                              calibration=CalibrationConfig(gamma=1.0, layers=(0.0, 1.0)))
    result = pipe.generate(_messages(), max_new_tokens=3, suppress_tokens=processor.tokenizer.all_special_ids)
    calibration = result.record.calibration
    (calls,) = observed
    biased = sorted({c.layer_idx for c in calls if c.gamma > 0})
    assert biased == [0, 1, 3]  # layer 2 of the tiny Mllama is a cross-attention layer
    assert calibration["layers"] == biased and calibration["layer_gamma"] == {"0": 1.0, "1": 1.0, "3": 1.0}
    default = pipe.generate(_messages(), max_new_tokens=2, calibration=CalibrationConfig(),
                            suppress_tokens=processor.tokenizer.all_special_ids).record.calibration
    assert default["layers"] == [1]  # the middle half [1, 3) less the cross-attention layer 2


def test_no_prefix_or_no_layer_means_no_calibration_in_the_record(guard_config) -> None:
    model, processor = build_tiny_lvlm("llava")
    pipe = GuardAlignPipeline(LocalLVLM(model=model, processor=processor), guard_config)
    special = {"suppress_tokens": processor.tokenizer.all_special_ids}
    off = pipe.generate(_messages(), max_new_tokens=2, calibration=CalibrationConfig(enabled=False), **special)
    assert off.record.prefix_used and off.record.calibration is None
    with pytest.raises(ValueError, match="out of range"):
        pipe.generate(_messages(), max_new_tokens=2, calibration=CalibrationConfig(layers=[7]), **special)

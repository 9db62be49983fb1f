"""Eq. 13 at decoding steps, and the coverage of the first answer token (placement="response").

The reference is computed in NumPy (float64) from the query and key each attention call saw and
the prefix span alone, not from the library's masks: for every calibrated query ``i`` (the last
prefix token and every later position) and prefix key ``j``,
``Ẑ_ij = Z_ij + γ·max(0, ⟨Q_i, K_j⟩)·Z_ij``; everything else is plain causal attention.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from calibration_reference import eq13_weights

from guardalign_core.calibration import (
    AttentionCall,
    CalibrationConfig,
    apply_calibration,
    calibrated,
    find_prefix_spans,
)
from guardalign_core.testing.tiny_lvlm import build_tiny_lvlm, tiny_image

PREFIX = "As an AI assistant,"
GAMMA = 1.0  # tiny random models have small scores


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


def _response_prompt(processor):
    """A prompt whose last tokens are the safety prefix, as placement="response" builds it."""
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True) + PREFIX
    inputs = processor(images=[tiny_image(seed=0)], text=[text], return_tensors="pt")
    prefix_ids = processor.tokenizer(PREFIX, add_special_tokens=False).input_ids
    (span,) = find_prefix_spans(inputs["input_ids"], prefix_ids, inputs["attention_mask"])
    assert span[1] == inputs["input_ids"].shape[1]  # the prefix ends the prompt
    return inputs, span


def test_first_decode_steps_match_eq13_in_numpy() -> None:
    model, processor = build_tiny_lvlm("llava", seed=0, attn_implementation="eager")
    inputs, span = _response_prompt(processor)
    apply_calibration(model, "eager")
    calls: list[AttentionCall] = []
    config = CalibrationConfig(gamma=GAMMA, backend="eager")  # layers [1, 2] of 4
    with calibrated(model, [span], config, observer=calls.append), torch.no_grad():
        model.generate(**inputs, max_new_tokens=4, do_sample=False, suppress_tokens=processor.tokenizer.all_special_ids)
    steps = [c for c in calls if c.layer_idx in (1, 2)]
    prefill, decode = steps[:2], steps[2:]
    assert all(c.query.shape[2] > 1 for c in prefill) and [c.query.shape[2] for c in decode] == [1] * 6  # 3 steps x 2 layers
    for call in prefill + decode:
        assert call.gamma == GAMMA
        expected = eq13_weights(call, span, GAMMA)
        assert np.allclose(call.weights.double().numpy(), expected, atol=1e-5), (call.layer_idx, call.key.shape)
    # the bias really acts at each of the three steps (not a no-op that would also match)
    for call in decode:
        plain = eq13_weights(call, span, 0.0)
        assert not np.allclose(plain, call.weights.double().numpy(), atol=1e-3)
    # layers outside [1, 2] stay plain attention at every step
    for call in (c for c in calls if c.layer_idx in (0, 3)):
        assert call.gamma == 0.0
        assert np.allclose(call.weights.double().numpy(), eq13_weights(call, span, 0.0), atol=1e-5)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_first_answer_token_is_calibrated_when_the_prefix_ends_the_prompt(backend: str) -> None:
    """The query that produces the first answer token sits inside the prefix (its last token).

    Before this was fixed, no query came "after" the prefix at prefill, so the first answer
    token's distribution was exactly the uncalibrated one.
    """
    model, processor = build_tiny_lvlm("llava", seed=0, attn_implementation=backend)
    inputs, span = _response_prompt(processor)
    apply_calibration(model, backend)
    with torch.no_grad():
        plain = model(**inputs).logits[0, -1]
        with calibrated(model, [span], CalibrationConfig(gamma=GAMMA, backend=backend)):
            first = model(**inputs).logits  # (1, n, vocab)
    assert not torch.allclose(first[0, -1], plain, atol=1e-3)  # the first answer token's logits moved
    with torch.no_grad():
        earlier = model(**inputs).logits[0, : span[1] - 1]
    assert torch.allclose(first[0, : span[1] - 1], earlier, atol=1e-5)  # earlier queries: untouched

"""The per-forward mask buffer (issue 14) computes exactly what the per-layer rebuild computed.

``legacy_biased_mask`` (guardalign_core.testing.calibration_reference) is the implementation
this replaced, kept verbatim as the reference: per layer it gathered the prefix keys, copied
the whole ``(b, heads, q, kv)`` base mask and scattered the bias into it. The new path slices the keys when every row shares one
prefix span, and writes only the prefix columns of one buffer per forward pass.
"""

from __future__ import annotations

import pytest
import torch

from guardalign_core.calibration import CalibrationConfig, apply_calibration, calibrated, find_prefix_spans
from guardalign_core.calibration import _interface
from guardalign_core.calibration._state import CallState, prefix_tensors
from guardalign_core.testing.calibration_reference import legacy_biased_mask
from guardalign_core.testing.tiny_lvlm import build_tiny_lvlm, tiny_image

PREFIX = "As an AI assistant,"
GAMMA = 1.0


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


def _state(spans, gammas=None) -> CallState:
    return CallState(object(), gammas or {0: 1.0}, prefix_tensors(spans))


CASES = {
    "one row": [(3, 7)],
    "rows share a span": [(3, 7), (3, 7)],
    "rows differ": [(3, 7), (1, 4)],
    "row without prefix": [(2, 6), None],
    "prefix at position 0": [(0, 3), (4, 6)],  # padding entries also point at key 0
}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("mask_kind", ["none", "bool", "float"])
@pytest.mark.parametrize("q_len", [12, 1])
@pytest.mark.parametrize("case", sorted(CASES))
def test_buffer_equals_the_per_layer_rebuild(case: str, q_len: int, mask_kind: str, dtype: torch.dtype) -> None:
    spans = CASES[case]
    batch, heads, kv_heads, kv_len, head_dim = len(spans), 4, 2, 12, 8
    gen = torch.Generator().manual_seed(0)
    if mask_kind == "none":
        mask = None
    else:
        allowed = torch.ones(kv_len, kv_len, dtype=torch.bool).tril()[-q_len:]  # (q, kv) causal
        allowed = allowed.expand(batch, 1, q_len, kv_len).clone()
        allowed[-1, ..., :1] = False  # the last row is left padded by one position
        mask = allowed if mask_kind == "bool" else torch.where(allowed, 0.0, torch.finfo(dtype).min).to(dtype)
    state = _state(spans)
    for layer, gamma in enumerate((0.7, 1.3, 0.0, 2.0)):  # successive layers of one forward pass share the buffer
        query = torch.randn(batch, heads, q_len, head_dim, generator=gen).to(dtype)
        key = torch.randn(batch, kv_heads, kv_len, head_dim, generator=gen).to(dtype)
        geo = state.geometry(mask, batch, q_len, kv_len, True, dtype, torch.device("cpu"))
        expected = legacy_biased_mask(query, key, mask, geo, gamma, head_dim**-0.5)
        got = _interface.biased_mask(query, key, mask, geo, gamma, head_dim**-0.5)
        if expected is mask:
            assert got is mask, layer
        else:
            assert got.dtype == expected.dtype and torch.equal(got, expected), (layer, (got - expected).abs().max())
    assert state.geometry(mask, batch, q_len, kv_len, True, dtype, torch.device("cpu")) is geo  # one per pass


def test_a_new_forward_pass_gets_its_own_buffer() -> None:
    state = _state([(1, 3)])
    first = state.geometry(None, 1, 1, 8, True, torch.float32, torch.device("cpu"))
    second = state.geometry(None, 1, 1, 9, True, torch.float32, torch.device("cpu"))  # the next decoding step
    assert first is not second


def _inputs(processor, tails):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}
                for q in ("Describe the image.", "What is shown in this picture? Describe it.")[: len(tails)]]
    texts = [processor.apply_chat_template([m], add_generation_prompt=True) + t for m, t in zip(messages, tails)]
    return processor(images=[tiny_image(seed=i) for i in range(len(texts))], text=texts, return_tensors="pt", padding=True)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
@pytest.mark.parametrize("rows", [1, 2])
def test_model_outputs_equal_the_per_layer_rebuild(backend: str, rows: int, monkeypatch: pytest.MonkeyPatch) -> None:
    model, processor = build_tiny_lvlm("llava", seed=0, attn_implementation=backend)
    tails = [PREFIX + " I will describe it.", PREFIX][:rows]
    inputs = _inputs(processor, tails)
    prefix_ids = processor.tokenizer(PREFIX, add_special_tokens=False).input_ids
    spans = find_prefix_spans(inputs["input_ids"], prefix_ids, inputs["attention_mask"])
    apply_calibration(model, backend)
    config = CalibrationConfig(gamma=GAMMA, backend=backend)
    generate = {"max_new_tokens": 4, "do_sample": False, "suppress_tokens": processor.tokenizer.all_special_ids,
                "output_scores": True, "return_dict_in_generate": True}

    def run():
        with calibrated(model, spans, config), torch.no_grad():
            logits = model(**inputs).logits
            out = model.generate(**inputs, **generate)
        return logits, out.sequences, torch.stack(out.scores)

    new = run()
    monkeypatch.setattr(_interface, "biased_mask", legacy_biased_mask)
    old = run()
    for a, b in zip(new, old, strict=True):
        assert torch.equal(a, b)

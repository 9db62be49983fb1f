"""Tests of the safety-prefix attention calibration (paper Eqs. 12-14) on tiny random LVLMs."""

from __future__ import annotations

import contextvars
import json
import threading

import pytest
import torch

from guardalign_core.calibration import (
    EAGER_KEY,
    SDPA_KEY,
    AttentionCall,
    CalibrationConfig,
    apply_calibration,
    calibrated,
    calibrated_layers,
    find_prefix_spans,
    get_calibration,
    prefix_attention_profile,
    prefix_score_bias,
    remove_calibration,
    spans_to_prefix_mask,
)
from guardalign_core.errors import UnsupportedModelError
from guardalign_core.testing.tiny_lvlm import build_tiny_lvlm, tiny_image

PREFIX = "As an AI assistant,"
ANSWER = " I will describe the image."
GAMMA = 1.0  # tiny random models have small scores; real-model defaults are far smaller
STRONG = CalibrationConfig(gamma=GAMMA)
STRONG_EAGER = CalibrationConfig(gamma=GAMMA, backend="eager")
DEVICES = [
    "cpu",
    pytest.param(
        "cuda",
        marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")],
    ),
]


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


@pytest.fixture
def llava():
    """A fresh tiny LLaVA-1.5 (Llama decoder with grouped-query attention: 4 heads, 2 kv heads)."""
    return build_tiny_lvlm("llava", seed=0)


def _prompt(processor, question: str = "Describe the image.", tail: str = PREFIX + ANSWER) -> str:
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(messages, add_generation_prompt=True) + tail


def _inputs(processor, texts: list[str], seeds: list[int] | None = None):
    images = [tiny_image(seed=s) for s in (seeds or range(len(texts)))]
    return processor(images=images, text=texts, return_tensors="pt", padding=True)


def _prefix_ids(processor) -> list[int]:
    return processor.tokenizer(PREFIX, add_special_tokens=False).input_ids


def _spans(processor, inputs):
    return find_prefix_spans(inputs["input_ids"], _prefix_ids(processor), inputs["attention_mask"])


def _logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model(**inputs).logits


def _generate(model, processor, inputs, **kwargs) -> torch.Tensor:
    kwargs = {"max_new_tokens": 8, "do_sample": False, **kwargs}
    with torch.no_grad():
        return model.generate(**inputs, suppress_tokens=processor.tokenizer.all_special_ids, **kwargs)


# --------------------------------------------------------------------------- config


def test_config_defaults_and_layer_resolution() -> None:
    config = CalibrationConfig()
    assert config.gamma > 0 and config.enabled and config.backend == "sdpa"
    assert config.resolve_layers(4) == [1, 2]  # the middle half [L/4, 3L/4)
    assert config.resolve_layers(32) == list(range(8, 24))
    assert CalibrationConfig(layers=(0.5, 1.0)).resolve_layers(4) == [2, 3]
    assert CalibrationConfig(layers=[3, 0]).resolve_layers(4) == [0, 3]
    assert CalibrationConfig(layer_gamma={0: 0.5, 1: 0.0}).layer_gammas(4) == {0: 0.5, 2: config.gamma}
    assert CalibrationConfig(enabled=False).layer_gammas(4) == {}
    assert CalibrationConfig(gamma=0.0).layer_gammas(4) == {}


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"gamma": -0.1}, "gamma"),
        ({"gamma": float("nan")}, "gamma"),
        ({"layers": (0.8, 0.2)}, "layers"),
        ({"layers": [1, 1]}, "layers"),
        ({"layers": [-1]}, "layers"),
        ({"layers": []}, "layers"),
        ({"layer_gamma": {1: -2.0}}, "layer_gamma"),
        ({"backend": "flash_attention_2"}, "backend"),
        ({"gama": 0.1}, "gama"),  # extra="forbid": a misspelt field is an error
    ],
)
def test_config_rejects_bad_values_naming_the_field(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        CalibrationConfig(**kwargs)


def test_config_round_trips_through_json() -> None:
    for config in (CalibrationConfig(layers=(0.0, 1.0), gamma=0.2), CalibrationConfig(layers=[0, 2], backend="eager")):
        again = CalibrationConfig.model_validate(json.loads(config.model_dump_json()))
        assert again == config
    with pytest.raises(ValueError, match="out of range"):
        CalibrationConfig(layers=[7]).resolve_layers(4)


# --------------------------------------------------------------------------- prefix positions


def test_find_prefix_spans_handles_left_padding_and_missing_rows() -> None:
    ids = torch.tensor([[0, 0, 5, 7, 8, 7, 8], [7, 8, 1, 2, 3, 4, 5], [0, 0, 0, 1, 2, 3, 4]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1] * 7, [0, 0, 0, 1, 1, 1, 1]])
    assert find_prefix_spans(ids, [7, 8], mask, missing="ignore") == [(5, 7), (0, 2), None]
    with pytest.raises(ValueError, match="row 2"):
        find_prefix_spans(ids, [7, 8], mask)
    # a match over padding positions does not count
    assert find_prefix_spans(torch.tensor([[7, 8, 1]]), [7, 8], torch.tensor([[0, 1, 1]]), missing="ignore") == [None]
    expected = torch.tensor([[0, 0, 0, 0, 0, 1, 1], [1, 1, 0, 0, 0, 0, 0], [0] * 7], dtype=torch.bool)
    assert torch.equal(spans_to_prefix_mask([(5, 7), (0, 2), None], 7), expected)


def test_prefix_score_bias_matches_eq13_with_grouped_query_heads() -> None:
    gen = torch.Generator().manual_seed(0)
    query = torch.randn(2, 4, 3, 8, generator=gen)  # (b, heads, q, d)
    keys = torch.randn(2, 2, 5, 8, generator=gen)  # (b, kv_heads, P, d)
    bias = prefix_score_bias(query, keys, gamma=0.3, scaling=8**-0.5)
    raw = query @ keys.repeat_interleave(2, dim=1).transpose(-1, -2)  # repeat_kv order
    expected = 0.3 * raw.clamp(min=0) * raw * 8**-0.5  # gamma * M * Z
    assert torch.allclose(bias, expected, atol=1e-6)
    assert bool((bias >= 0).all())


# --------------------------------------------------------------------------- exactness


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_installed_but_inactive_calibration_is_bit_identical(backend: str) -> None:
    reference, processor = build_tiny_lvlm("llava", seed=0, attn_implementation=backend)
    model, _ = build_tiny_lvlm("llava", seed=0, attn_implementation=backend)
    inputs = _inputs(processor, [_prompt(processor)])
    spans = _spans(processor, inputs)
    expected = _logits(reference, inputs)
    apply_calibration(model, backend)
    assert model.config.text_config._attn_implementation == {"sdpa": SDPA_KEY, "eager": EAGER_KEY}[backend]
    assert model.config.vision_config._attn_implementation == backend  # vision tower untouched
    assert torch.equal(_logits(model, inputs), expected)  # no context
    with calibrated(model, spans, CalibrationConfig(gamma=0.0, backend=backend)):
        assert torch.equal(_logits(model, inputs), expected)
    with calibrated(model, torch.zeros_like(inputs["input_ids"], dtype=torch.bool)):
        assert torch.equal(_logits(model, inputs), expected)
    with calibrated(model, spans, CalibrationConfig(gamma=GAMMA, backend=backend, enabled=False)):
        assert torch.equal(_logits(model, inputs), expected)
    with calibrated(model, spans, CalibrationConfig(gamma=GAMMA, backend=backend)):
        changed = _logits(model, inputs)
    assert not torch.allclose(changed, expected, atol=1e-3)


@pytest.mark.parametrize("backend", ["sdpa", "eager"])
def test_remove_calibration_restores_untouched_outputs(backend: str) -> None:
    reference, processor = build_tiny_lvlm("llava", seed=0, attn_implementation=backend)
    model, _ = build_tiny_lvlm("llava", seed=0, attn_implementation=backend)
    inputs = _inputs(processor, [_prompt(processor, tail=PREFIX)])
    apply_calibration(model, backend)
    with calibrated(model, _spans(processor, inputs), CalibrationConfig(gamma=GAMMA, backend=backend)):
        _generate(model, processor, inputs)
    assert remove_calibration(model) is True
    assert remove_calibration(model) is False
    assert get_calibration(model) is None
    assert model.config.text_config._attn_implementation == backend
    assert not any(hasattr(m, "_guardalign_owner") for m in model.modules())
    assert torch.equal(_logits(model, inputs), _logits(reference, inputs))
    assert torch.equal(_generate(model, processor, inputs), _generate(reference, processor, inputs))


@pytest.mark.parametrize("device", DEVICES)
def test_sdpa_and_eager_calibrations_agree(llava, device: str) -> None:
    model, processor = llava
    model.to(device)
    inputs = _inputs(processor, [_prompt(processor)]).to(device)
    spans = _spans(processor, inputs)
    results = {}
    for backend in ("sdpa", "eager"):
        config = CalibrationConfig(gamma=GAMMA, backend=backend)
        apply_calibration(model, backend)
        with calibrated(model, spans, config):
            results[backend] = _logits(model, inputs)
        remove_calibration(model)
    assert (results["sdpa"] - results["eager"]).abs().max().item() <= 1e-4


# --------------------------------------------------------------------------- the equation


def test_eager_scores_match_eq13_computed_by_hand(llava) -> None:
    model, processor = llava
    inputs = _inputs(processor, [_prompt(processor)])
    (start, end), = _spans(processor, inputs)
    calls: list[AttentionCall] = []
    apply_calibration(model, "eager")
    with calibrated(model, [(start, end)], STRONG_EAGER, observer=calls.append), torch.no_grad():
        model(**inputs)
    call = next(c for c in calls if c.layer_idx == 1)
    assert call.gamma == GAMMA
    query, key = call.query, call.key.repeat_interleave(2, dim=1)  # (1, 4, n, 16) each
    n = query.shape[2]
    raw = query @ key.transpose(-1, -2)  # <Q_i, K_j>
    z = raw * query.shape[-1] ** -0.5  # Z = QK^T / sqrt(d_k)
    m = torch.zeros_like(raw)
    # calibrated queries: the last prefix token (it produces the first token after the prefix) and later
    m[..., end - 1 :, start:end] = raw[..., end - 1 :, start:end].clamp(min=0)
    z_hat = z + GAMMA * m * z  # Eq. 13
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    expected = torch.softmax(z_hat.masked_fill(~causal, float("-inf")), dim=-1)
    assert torch.allclose(call.weights, expected, atol=1e-6)
    # layers outside the range are observed but not biased
    assert all(c.gamma == 0.0 for c in calls if c.layer_idx in (0, 3))


def test_prefix_attention_rises_in_calibrated_layers_only(llava) -> None:
    model, processor = llava
    inputs = _inputs(processor, [_prompt(processor)])
    (start, end), = _spans(processor, inputs)
    config = CalibrationConfig(gamma=GAMMA, layers=[2], backend="eager")
    apply_calibration(model, "eager")

    def prefix_mass(prefix) -> list[float]:
        with calibrated(model, prefix, config), torch.no_grad():
            attentions = model(**inputs, output_attentions=True).attentions  # per layer (1, heads, n, n)
        return [a[..., end - 1 :, start:end].sum(-1).mean().item() for a in attentions]

    before, after = prefix_mass(None), prefix_mass([(start, end)])
    assert len(before) == 4
    assert after[0] == before[0] and after[1] == before[1]  # below the calibrated layer: untouched
    assert after[2] > before[2] + 0.05  # calibrated layer: more mass on the prefix
    profile = prefix_attention_profile(model, inputs, [(start, end)], config)
    rows = {r.layer: r for r in profile.layers}
    assert rows[2].gamma == GAMMA and rows[0].gamma == 0.0
    assert rows[0].delta == 0.0 and rows[1].delta == 0.0 and rows[2].delta > 0.05
    assert abs(rows[2].calibrated - after[2]) < 1e-5 and abs(rows[2].baseline - before[2]) < 1e-5
    assert "calibrated" in profile.to_table() and len(profile.to_dict()["layers"]) == 4


def test_profile_installs_temporarily_and_restores_backend(llava) -> None:
    model, processor = llava
    inputs = _inputs(processor, [_prompt(processor)])
    spans = _spans(processor, inputs)
    profile = prefix_attention_profile(model, inputs, spans, CalibrationConfig(gamma=GAMMA))
    assert [r.layer for r in profile.layers] == [0, 1, 2, 3]
    assert all(r.delta > 0 for r in profile.layers if r.gamma)
    assert get_calibration(model) is None and model.config.text_config._attn_implementation == "sdpa"
    handle = apply_calibration(model)
    prefix_attention_profile(model, inputs, spans)
    assert get_calibration(model) is handle and model.config.text_config._attn_implementation == SDPA_KEY
    # a prompt that ends with the prefix still has one calibrated query per row: the one that
    # produces the first answer token (the last prefix token)
    no_answer = _inputs(processor, [_prompt(processor, tail=PREFIX)])
    first_step = prefix_attention_profile(model, no_answer, _spans(processor, no_answer), CalibrationConfig(gamma=GAMMA))
    assert first_step.num_queries == 1 and any(r.delta > 0 for r in first_step.layers if r.gamma)
    with pytest.raises(ValueError, match="no query"):
        prefix_attention_profile(model, no_answer, [None])


# --------------------------------------------------------------------------- decoding


@pytest.mark.parametrize("device", DEVICES)
def test_calibrated_generation_is_the_same_with_and_without_cache(llava, device: str) -> None:
    model, processor = llava
    model.to(device)
    inputs = _inputs(processor, [_prompt(processor, tail=PREFIX)]).to(device)  # prefix ends the prompt (ETA)
    spans = _spans(processor, inputs)
    apply_calibration(model)
    calls: list[AttentionCall] = []
    with calibrated(model, spans, STRONG, observer=calls.append):
        cached = _generate(model, processor, inputs, use_cache=True)
    with calibrated(model, spans, STRONG):
        uncached = _generate(model, processor, inputs, use_cache=False)
    with calibrated(model, spans, STRONG):
        static = _generate(model, processor, inputs, cache_implementation="static")
    assert torch.equal(cached, uncached) and torch.equal(cached, static)
    assert not torch.equal(cached, _generate(model, processor, inputs))
    # decoding steps: one query, after the prefix, biased on the cached prefix keys only
    step = next(c for c in calls if c.query.shape[2] == 1 and c.gamma > 0)
    assert bool(step.calibrated_queries.all())
    start, end = spans[0]
    bias_cols = (step.attention_mask[0, :, 0] != 0).any(dim=0).nonzero().flatten().tolist()  # over heads
    assert set(bias_cols) <= set(range(start, end)) and bias_cols


def test_beam_search_repeats_the_prefix_rows(llava) -> None:
    model, processor = llava
    inputs = _inputs(processor, [_prompt(processor, tail=PREFIX)])
    apply_calibration(model)
    with calibrated(model, _spans(processor, inputs), STRONG):
        out = _generate(model, processor, inputs, num_beams=2, num_return_sequences=2, max_new_tokens=4)
    assert out.shape[0] == 2


def test_left_padded_batch_matches_single_rows(llava) -> None:
    model, processor = llava
    # different questions and different text after the prefix: each row has its own prefix position
    tails = [PREFIX + ANSWER, PREFIX + " I cannot help."]
    prompts = [_prompt(processor, "Describe the image.", tail=tails[0]),
               _prompt(processor, "What is shown in this picture? Describe it.", tail=tails[1])]
    apply_calibration(model)
    batch = _inputs(processor, prompts, seeds=[0, 1])
    assert batch["attention_mask"][0, 0] == 0  # the shorter row is left padded
    spans = _spans(processor, batch)
    assert spans[0] != spans[1]
    with calibrated(model, spans, STRONG):
        batch_logits = _logits(model, batch)
        batch_tokens = _generate(model, processor, batch)
    assert not torch.allclose(batch_logits, _logits(model, batch), atol=1e-3)
    for row, prompt in enumerate(prompts):
        single = _inputs(processor, [prompt], seeds=[row])
        with calibrated(model, _spans(processor, single), STRONG):
            logits = _logits(model, single)
            tokens = _generate(model, processor, single)
        n = logits.shape[1]
        assert torch.allclose(batch_logits[row, -n:], logits[0], atol=1e-5)
        assert torch.equal(batch_tokens[row, -8:], tokens[0, -8:])


def test_rows_without_prefix_are_not_calibrated(llava) -> None:
    model, processor = llava
    long_answer = " A cat is sitting on a mat next to a window. The picture shows a red square."
    prompts = [_prompt(processor, "Describe the image."), _prompt(processor, "What is shown?", tail=long_answer)]
    batch = _inputs(processor, prompts, seeds=[0, 1])
    assert bool(batch["attention_mask"][1].all())  # the row without a prefix is the unpadded one
    spans = find_prefix_spans(batch["input_ids"], _prefix_ids(processor), batch["attention_mask"], missing="ignore")
    assert spans[0] is not None and spans[1] is None
    config = CalibrationConfig(gamma=GAMMA, backend="eager")
    apply_calibration(model, "eager")
    plain = _logits(model, batch)
    with calibrated(model, spans, config):
        mixed = _logits(model, batch)
    assert torch.allclose(mixed[1], plain[1], atol=1e-6)  # the row without a prefix is untouched
    assert not torch.allclose(mixed[0], plain[0], atol=1e-3)
    profile = prefix_attention_profile(model, batch, spans, config)
    single = _inputs(processor, prompts[:1])
    alone = prefix_attention_profile(model, single, _spans(processor, single), config)
    for row, ref in zip(profile.layers, alone.layers, strict=True):  # row 1 adds no queries to the means
        assert abs(row.calibrated - ref.calibrated) < 1e-5 and abs(row.baseline - ref.baseline) < 1e-5
    assert profile.num_prefix_tokens == (len(_prefix_ids(processor)), 0)


# --------------------------------------------------------------------------- isolation


def test_concurrent_threads_see_only_their_own_settings(llava) -> None:
    model, processor = llava
    inputs = _inputs(processor, [_prompt(processor, tail=PREFIX)])
    spans = _spans(processor, inputs)
    apply_calibration(model)

    def run(calibrate: bool) -> torch.Tensor:
        if not calibrate:
            return _generate(model, processor, inputs)
        with calibrated(model, spans, STRONG):
            return _generate(model, processor, inputs)

    expected = {True: run(True), False: run(False)}
    assert not torch.equal(expected[True], expected[False])
    barrier, results, errors = threading.Barrier(2), {True: [], False: []}, []

    def worker(calibrate: bool) -> None:
        try:
            barrier.wait()
            for _ in range(3):
                results[calibrate].append(run(calibrate))
        except BaseException as err:  # surfaced by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(flag,)) for flag in (True, False)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    for flag in (True, False):
        assert len(results[flag]) == 3
        assert all(torch.equal(out, expected[flag]) for out in results[flag])


def test_context_is_local_to_the_thread_unless_copied(llava) -> None:
    model, processor = llava
    inputs = _inputs(processor, [_prompt(processor)])
    spans = _spans(processor, inputs)
    apply_calibration(model)
    plain = _logits(model, inputs)
    with calibrated(model, spans, STRONG):
        here = _logits(model, inputs)
        box: dict[str, torch.Tensor] = {}
        worker = threading.Thread(target=lambda: box.update(plain=_logits(model, inputs)))
        worker.start()
        worker.join()
        copied = contextvars.copy_context()
        worker = threading.Thread(target=lambda: box.update(copied=copied.run(_logits, model, inputs)))
        worker.start()
        worker.join()
    assert torch.equal(box["plain"], plain)
    assert torch.equal(box["copied"], here)


# --------------------------------------------------------------------------- errors


def test_unsupported_models_raise_before_anything_changes(llava) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    text_only = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64,
                                             num_hidden_layers=2, num_attention_heads=2))
    with pytest.raises(UnsupportedModelError, match="LlamaForCausalLM.*text_config"):
        apply_calibration(text_only)
    with pytest.raises(UnsupportedModelError, match="dict"):
        apply_calibration({"not": "a model"})  # type: ignore[arg-type]

    model, _ = llava
    model.set_attn_implementation({"text_config": "flex_attention"})
    with pytest.raises(UnsupportedModelError, match="LlavaForConditionalGeneration.*flex_attention"):
        apply_calibration(model)
    # as loaded with FlashAttention-2 on a GPU (not installable here)
    model.config.text_config._attn_implementation_internal = "flash_attention_2"
    with pytest.raises(UnsupportedModelError, match="flash_attention_2"):
        apply_calibration(model)
    assert model.config.text_config._attn_implementation == "flash_attention_2"
    assert get_calibration(model) is None
    assert not any(hasattr(m, "_guardalign_owner") for m in model.modules())


def test_bad_layers_and_misuse_raise_before_anything_changes(llava) -> None:
    model, processor = llava
    with pytest.raises(ValueError, match="apply_calibration"):
        calibrated(model, [(0, 1)])
    with pytest.raises(TypeError, match="per call"):
        apply_calibration(model, CalibrationConfig(gamma=0.5))  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="backend"):
        apply_calibration(model, "flash")
    assert get_calibration(model) is None and model.config.text_config._attn_implementation == "sdpa"
    handle = apply_calibration(model)
    assert apply_calibration(model, "sdpa") is handle and not hasattr(handle, "config")
    with pytest.raises(ValueError, match="out of range"):
        calibrated(model, [(0, 1)], CalibrationConfig(layers=[9]))
    with pytest.raises(ValueError, match="backend"):
        with calibrated(model, [(0, 1)], CalibrationConfig(backend="eager")):
            pass
    inputs = _inputs(processor, [_prompt(processor)])
    with pytest.raises(ValueError, match="rows?"):
        with calibrated(model, [(1, 3), (1, 3), (1, 3)]):
            _logits(model, inputs)
    with pytest.raises(ValueError, match="prefix reaches"):
        with calibrated(model, [(500, 505)]):
            _logits(model, inputs)


def test_mllama_calibrates_self_attention_layers_only() -> None:
    model, processor = build_tiny_lvlm("mllama")
    handle = apply_calibration(model)
    assert handle.attention_layers == [0, 1, 3]  # layer 2 is a cross-attention layer
    assert calibrated_layers(model, STRONG) == {1: GAMMA}
    with pytest.raises(ValueError, match="cross-attention"):
        calibrated(model, [(0, 1)], CalibrationConfig(layers=[2]))
    with calibrated(model, [(0, 1)], STRONG) as layers:
        assert layers == {1: GAMMA}


def test_adapter_shortcuts_build_the_config_and_refuse_disagreement() -> None:
    from guardalign_core.calibration import calibration_with

    assert calibration_with(gamma=0.02, layers=[2, 1]) == CalibrationConfig(gamma=0.02, layers=[1, 2])
    assert calibration_with(CalibrationConfig(backend="eager"), gamma=0.3) == CalibrationConfig(gamma=0.3, backend="eager")
    assert calibration_with(CalibrationConfig(gamma=0.5), gamma=0.5).gamma == 0.5  # agreeing is fine
    assert calibration_with({"layers": (0.0, 0.5)}, gamma=0.2).layers == (0.0, 0.5)
    with pytest.raises(ValueError, match="gamma=0.2 disagrees with calibration.gamma=0.5"):
        calibration_with(CalibrationConfig(gamma=0.5), gamma=0.2)
    with pytest.raises(ValueError, match="layers"):
        calibration_with({"layers": [1]}, layers=[2])
    with pytest.raises(ValueError, match="gamma"):
        calibration_with(gamma=-1.0)

"""Tests of the tiny random-weight LVLM builders: build, save, reload with Auto classes, generate."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from guardalign_core.calibration import CalibrationConfig, apply_calibration, calibrated, calibrated_layers, find_prefix_spans
from guardalign_core.calibration import remove_calibration
from guardalign_core.bench_models import build_bench_lvlm, llava_1_5_7b_config
from guardalign_core.testing.tiny_lvlm import (
    TINY_FAMILIES,
    build_tiny_lvlm,
    build_tiny_tokenizer,
    save_tiny_lvlm,
    tiny_image,
)

PREFIX = "As an AI assistant,"


@pytest.fixture(autouse=True)
def _two_threads() -> None:
    torch.set_num_threads(2)


def _inputs(processor, tail: str = PREFIX):
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe the image."}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True) + tail
    return processor(images=[tiny_image()], text=[text], return_tensors="pt")


def _generate(model, processor, inputs, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(
            **inputs, max_new_tokens=6, do_sample=False, suppress_tokens=processor.tokenizer.all_special_ids, **kwargs
        )


def test_tokenizer_has_named_special_tokens_and_chat_template() -> None:
    template = "{{ messages[0]['content'] }}"
    tok = build_tiny_tokenizer(extra_special_tokens={"image_token": "<image>"}, chat_template=template)
    assert tok.image_token == "<image>" and tok.image_token_id in tok.all_special_ids
    ids = tok("As an AI assistant, <image>", add_special_tokens=False).input_ids
    assert tok.image_token_id in ids and len(ids) < 10  # the prefix is a handful of BPE tokens
    assert tok.decode(ids) == "As an AI assistant, <image>"
    assert tok.apply_chat_template([{"role": "user", "content": "hi"}], tokenize=False) == "hi"


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_family_saves_reloads_and_generates_with_an_image(family: str, tmp_path: Path) -> None:
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model, processor = build_tiny_lvlm(family)
    text_config = model.config.get_text_config()
    assert text_config.num_hidden_layers == 4 and text_config.hidden_size == 64
    folder = save_tiny_lvlm(family, tmp_path / family)
    loaded = AutoModelForImageTextToText.from_pretrained(folder).eval()
    loaded_processor = AutoProcessor.from_pretrained(folder)
    assert type(loaded) is type(model) and type(loaded_processor) is type(processor)

    inputs = _inputs(loaded_processor)
    assert (inputs["input_ids"] == loaded.config.image_token_id).sum() > 0  # image placeholders expanded
    assert torch.equal(inputs["input_ids"], _inputs(processor)["input_ids"])
    out = _generate(loaded, loaded_processor, inputs)
    assert out.shape == (1, inputs["input_ids"].shape[1] + 6)
    assert torch.equal(out, _generate(model, processor, inputs))  # same weights after the round trip

    # the calibration installs on the reloaded model and keeps cached == uncached decoding
    prefix_ids = loaded_processor.tokenizer(PREFIX, add_special_tokens=False).input_ids
    spans = find_prefix_spans(inputs["input_ids"], prefix_ids)
    apply_calibration(loaded)
    config = CalibrationConfig(gamma=1.0)
    assert calibrated_layers(loaded, config) == ({1: 1.0} if family == "mllama" else {1: 1.0, 2: 1.0})
    with calibrated(loaded, spans, config):
        cached = _generate(loaded, loaded_processor, inputs)
        uncached = _generate(loaded, loaded_processor, inputs, use_cache=False)
    assert torch.equal(cached, uncached)
    remove_calibration(loaded)
    assert torch.equal(_generate(loaded, loaded_processor, inputs), out)


def test_same_seed_gives_same_weights_and_unknown_family_is_rejected() -> None:
    a, _ = build_tiny_lvlm("llava", seed=3)
    b, _ = build_tiny_lvlm("llava", seed=3)
    c, _ = build_tiny_lvlm("llava", seed=4)
    pa, pb, pc = (next(m.model.language_model.parameters()) for m in (a, b, c))
    assert torch.equal(pa, pb) and not torch.equal(pa, pc)
    with pytest.raises(ValueError, match="family"):
        build_tiny_lvlm("gpt-5")


def test_bench_builder_and_llava_7b_dimensions() -> None:
    model, processor = build_bench_lvlm(num_layers=2, hidden=64, num_heads=4, vision_hidden=64, vision_layers=1)
    assert model.config.text_config.num_hidden_layers == 2 and model.config.text_config.hidden_size == 64
    out = _generate(model, processor, _inputs(processor))
    assert out.shape[0] == 1

    config = llava_1_5_7b_config()  # config only: the 7B model is never instantiated here
    text, vision = config.text_config, config.vision_config
    assert (text.hidden_size, text.num_hidden_layers, text.num_attention_heads) == (4096, 32, 32)
    assert (text.intermediate_size, text.vocab_size) == (11008, 32064)
    assert (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads) == (1024, 24, 16)
    assert (vision.intermediate_size, vision.image_size, vision.patch_size) == (4096, 336, 14)
    assert config.projector_hidden_act == "gelu" and config.vision_feature_layer == -2
    assert CalibrationConfig().resolve_layers(text.num_hidden_layers) == list(range(8, 24))


def test_builders_work_in_a_fresh_process_without_the_test_setup():
    # `import guardalign_core` no longer repairs torchvision; the builders must do it themselves
    # (benchmarks and user scripts call them without conftest.py).
    import subprocess
    import sys

    code = (
        "from guardalign_core.bench_models import build_bench_lvlm; build_bench_lvlm(num_layers=2, hidden=64);"
        "from guardalign_core.testing.tiny_lvlm import build_tiny_lvlm; build_tiny_lvlm('llava')"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]

"""The local pipeline end to end: detector → policy → prefix → calibrated generate/stream."""

import json

import pytest

from shared_images import shared_data
from guardalign_core.calibration import CalibrationConfig
from guardalign_core.config import GuardConfig, PolicyConfig, PrefixConfig
from guardalign_core.lvlm import LocalLVLM
from guardalign_core.pipeline import GuardAlignPipeline
from guardalign_core.testing.tiny_clip import tiny_detector_config
from guardalign_core.testing.tiny_lvlm import TINY_FAMILIES, build_tiny_lvlm, save_tiny_lvlm


@pytest.fixture
def guard_config(tiny_clip_checkpoint, embed_cache_dir):
    return GuardConfig(detector=tiny_detector_config(tiny_clip_checkpoint, threshold=1e9, cache_dir=str(embed_cache_dir)))


def _pipe(family, guard_config, **kwargs):
    model, processor = build_tiny_lvlm(family)
    return GuardAlignPipeline(LocalLVLM(model=model, processor=processor), guard_config, **kwargs), processor


@pytest.mark.parametrize("family", TINY_FAMILIES)
def test_every_family_generates_and_streams_with_a_real_image(family, guard_config):
    image = str(shared_data("benign") / "chelsea.png")
    pipe, processor = _pipe(family, guard_config)
    special = {"suppress_tokens": processor.tokenizer.all_special_ids}
    messages = [{"role": "user", "content": [{"type": "image", "image": image}, {"type": "text", "text": "Describe the image."}]}]
    result = pipe.generate(messages, max_new_tokens=6, **special)
    record = result.record
    assert result.text.startswith("As an AI assistant, ")
    assert record.decision == "mask" and record.images[0]["unsafe_patches"] == 9  # τ above every score: all masked
    assert record.prefix_used and record.prefix_spans and record.prefix_spans[0][1] <= record.input_tokens
    # the middle half [1, 3); Mllama's layer 2 is cross-attention, never calibrated, so not listed
    assert record.calibration["layers"] == ([1] if family == "mllama" else [1, 2]) and record.output_tokens == 6
    stream = pipe.stream(messages, max_new_tokens=6, **special)
    deltas = list(stream)
    assert len(deltas) >= 2 and deltas[0] == "As an AI assistant, "
    assert "".join(deltas) == result.text  # greedy: streaming decodes the same tokens
    assert stream.record.output_tokens == 6 and stream.record.prefix_spans == record.prefix_spans


def test_block_policy_refuses_without_generating(tiny_clip_checkpoint, embed_cache_dir, monkeypatch):
    config = GuardConfig(detector=tiny_detector_config(tiny_clip_checkpoint, threshold=1e9, cache_dir=str(embed_cache_dir)),
                         policy=PolicyConfig(action="block"))
    pipe, _ = _pipe("llava", config)
    monkeypatch.setattr(pipe.lvlm.model, "generate", lambda **kw: pytest.fail("blocked requests must not reach the model"))
    result = pipe.generate("What is this?", images=[str(shared_data("figstep-tiny") / "query_ForbidQI_1_1_6.png")])
    assert result.record.blocked and result.text == pipe.refusal and result.record.output_tokens == 0
    assert "".join(pipe.stream("What is this?", images=[str(shared_data("figstep-tiny") / "query_ForbidQI_1_1_6.png")])) == pipe.refusal


def test_undecodable_image_fails_closed(guard_config):
    pipe, _ = _pipe("llava", guard_config)
    result = pipe.generate("What is this?", images=[b"not an image"])
    assert result.record.blocked and result.record.status == "error"


def test_fail_open_drops_an_undecodable_image_and_says_so(tiny_clip_checkpoint, embed_cache_dir):
    config = GuardConfig(detector=tiny_detector_config(tiny_clip_checkpoint, threshold=-1.0, cache_dir=str(embed_cache_dir)),
                         policy=PolicyConfig(fail_open=True))
    pipe, processor = _pipe("llava", config)
    good = str(shared_data("benign") / "chelsea.png")
    messages = [{"role": "user", "content": [{"type": "image", "image": b"not an image"}, {"type": "image", "image": good},
                                             {"type": "text", "text": "Compare them."}]}]
    checked = pipe.check(messages)
    assert len(checked.images) == 1 and [p["type"] for p in checked.messages[0]["content"]] == ["image", "text"]
    result = pipe.generate(checked, max_new_tokens=3, suppress_tokens=processor.tokenizer.all_special_ids)
    assert not result.record.blocked and result.record.status == "error" and result.record.output_tokens == 3
    assert [i["status"] for i in result.record.images] == ["error", "ok"]


def test_no_prefix_means_no_calibration(guard_config):
    pipe, processor = _pipe("llava", guard_config, prefix=PrefixConfig(when="never"))
    result = pipe.generate("Hello", max_new_tokens=3, suppress_tokens=processor.tokenizer.all_special_ids)
    assert not result.record.prefix_used and result.record.calibration is None
    assert not result.text.startswith("As an AI")


def test_prompt_placement_puts_the_prefix_before_the_instruction(guard_config):
    pipe, processor = _pipe("llava", guard_config, prefix=PrefixConfig(when="always", placement="prompt"))
    result = pipe.generate("Describe the image.", max_new_tokens=3, suppress_tokens=processor.tokenizer.all_special_ids)
    start, end = result.record.prefix_spans[0]
    assert end < result.record.input_tokens - 2  # the instruction and the assistant header follow it
    assert not result.text.startswith("As an AI")


def test_calibration_changes_the_output_distribution_only_when_on(guard_config):
    import torch

    pipe, processor = _pipe("llava", guard_config)
    prepared = pipe.lvlm.prepare("Describe the image.", prefix="As an AI assistant, ", placement="prompt")
    model = pipe.lvlm.model
    from guardalign_core.calibration import calibrated

    with torch.no_grad():
        plain = model(**prepared.inputs).logits
        with calibrated(model, prepared.prefix_spans, CalibrationConfig(gamma=0.0)):
            zero = model(**prepared.inputs).logits
        with calibrated(model, prepared.prefix_spans, CalibrationConfig(gamma=0.5)):
            strong = model(**prepared.inputs).logits
    assert torch.equal(plain, zero)
    last = prepared.prefix_spans[0][1] - 1  # the last prefix token is the first calibrated query
    assert torch.equal(plain[:, :last], strong[:, :last])  # queries before it are untouched
    assert not torch.allclose(plain[:, last:], strong[:, last:])


def test_checkpoint_on_disk_loads_lazily_through_auto_classes(tmp_path, guard_config):
    folder = save_tiny_lvlm("qwen2_vl", tmp_path / "tiny-qwen")
    pipe = GuardAlignPipeline.from_pretrained(str(folder), guard=guard_config)
    assert not pipe.lvlm.is_loaded
    result = pipe.generate("Hi", max_new_tokens=2, suppress_tokens=[0, 1, 2])
    assert pipe.lvlm.is_loaded and result.record.output_tokens == 2
    assert type(pipe.lvlm.model).__name__ == "Qwen2VLForConditionalGeneration"


def test_cli_chat_and_profile_on_a_saved_checkpoint(tmp_path, tiny_clip_checkpoint, capsys):
    from guardalign_cli import main

    folder = save_tiny_lvlm("llava", tmp_path / "tiny-llava")
    image = str(shared_data("benign") / "horse.png")
    clip = ["--clip-model", "guardalign-tiny-clip", "--clip-pretrained", str(tiny_clip_checkpoint)]
    assert main(["chat", "--model", str(folder), "--image", image, "Describe it.", "--max-new-tokens", "4", "--suppress-special", *clip]) == 0
    out = capsys.readouterr().out
    answer, record = out.split("--- guard record ---")
    assert answer.startswith("As an AI assistant, ")
    assert json.loads(record)["prefix_used"] is True
    plot = tmp_path / "profile.png"
    assert main(["profile", "--model", str(folder), "--image", image, "--prompt", "Describe it.", "--suppress-special",
                 "--answer-tokens", "4", "--plot", str(plot), "--json", *clip]) == 0
    profile = json.loads(capsys.readouterr().out.split("wrote")[0])
    calibrated_layers = [r for r in profile["layers"] if r["gamma"]]
    assert [r["layer"] for r in calibrated_layers] == [1, 2]
    assert all(r["calibrated"] > r["baseline"] for r in calibrated_layers)
    assert plot.is_file()


def test_stop_strings_and_seeded_sampling(guard_config):
    from guardalign_core.lvlm import GenerationOptions

    pipe, processor = _pipe("llava", guard_config, prefix=PrefixConfig(when="never"))
    special = {"suppress_tokens": processor.tokenizer.all_special_ids}
    prepared = pipe.lvlm.prepare("Describe the image.")
    ids = pipe.lvlm.generate_ids(prepared, GenerationOptions(max_new_tokens=12), **special).tolist()
    pieces = [processor.tokenizer.decode([t]) for t in ids]
    k = next(i for i, p in enumerate(pieces) if i >= 2 and p.strip().isascii() and p.strip().isalnum())
    stopped = pipe.generate("Describe the image.", max_new_tokens=12, stop=[pieces[k].strip()], **special)
    assert stopped.record.output_tokens <= k + 1 < 12
    a = pipe.generate("Describe the image.", max_new_tokens=8, temperature=1.0, seed=7, **special).text
    b = pipe.generate("Describe the image.", max_new_tokens=8, temperature=1.0, seed=7, **special).text
    assert a == b


def test_until_stop_cuts_at_the_first_stop_even_across_deltas():
    from guardalign_core.pipeline import until_stop

    closed = []

    def deltas():
        try:
            yield from ["Hel", "lo wo", "rld. St", "OP here", " and more"]
        finally:
            closed.append(True)

    assert "".join(until_stop(deltas(), ["STOP", "St"])) == "Hello world. "
    assert closed == [True]  # stopping early closes the source (which cancels generation)
    assert "".join(until_stop(iter(["a", "b", "c"]), ["zz"])) == "abc"
    assert list(until_stop(iter(["x", "y"]), [])) == ["x", "y"]


def test_seeded_sampling_is_reproducible_under_concurrency(guard_config):
    from concurrent.futures import ThreadPoolExecutor

    pipe, processor = _pipe("llava", guard_config)
    kwargs = dict(max_new_tokens=8, temperature=1.0, seed=7, suppress_tokens=processor.tokenizer.all_special_ids)
    alone = pipe.generate("Tell me something.", **kwargs).text
    torch_state = __import__("torch").random.get_rng_state()
    with ThreadPoolExecutor(4) as pool:
        texts = list(pool.map(lambda _: pipe.generate("Tell me something.", **kwargs).text, range(4)))
    assert texts == [alone] * 4
    assert __import__("torch").equal(torch_state, __import__("torch").random.get_rng_state())  # the process RNG is untouched


def test_unknown_generate_keywords_fail_before_the_scan(guard_config):
    pipe, _ = _pipe("llava", guard_config)
    with pytest.raises(TypeError, match="not a model.generate option"):
        pipe.generate("Hi", images=[str(shared_data("benign") / "chelsea.png")], max_new_tokenz=3)
    with pytest.raises(TypeError, match="set by the runner"):
        pipe.stream("Hi", pixel_values=None)
    assert not pipe.guard.detector_loaded


def test_max_concurrent_bounds_simultaneous_generations(guard_config):
    import threading
    import time
    from concurrent.futures import ThreadPoolExecutor

    from transformers import LogitsProcessor

    pipe, processor = _pipe("llava", guard_config)
    pipe.lvlm.limit_concurrency(2)
    running, peak, lock = [0], [0], threading.Lock()

    class Track(LogitsProcessor):  # one per call: counts calls inside generate
        def __init__(self):
            self.entered = False

        def __call__(self, input_ids, scores):
            if not self.entered:
                self.entered = True
                with lock:
                    running[0] += 1
                    peak[0] = max(peak[0], running[0])
            time.sleep(0.005)
            return scores

    def call(_):
        track = Track()
        try:
            return pipe.generate("Hi", max_new_tokens=6, logits_processor=[track], suppress_tokens=processor.tokenizer.all_special_ids)
        finally:
            with lock:
                running[0] -= track.entered

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(call, range(6)))
    assert peak[0] == 2
    with pytest.raises(ValueError, match="at least 1"):
        pipe.lvlm.limit_concurrency(0)

"""The CPU fast path (issue 14): 'auto' resolution, agreement of every path with fp32 eager, cache keys, QuickGELU."""

from __future__ import annotations

import warnings

import pytest
import torch
from PIL import Image

from guardalign_core import encoders
from guardalign_core.config import DetectorConfig, get_preset, list_presets
from guardalign_core.detector import CosineDetector, OTDetector
from guardalign_core.encoders import (
    ClipEncoder,
    build_open_clip_model,
    encoder_for_config,
    resolve_backend,
    resolve_dtype,
    resolve_execution,
)
from guardalign_core.encoders import _execution
from guardalign_core.errors import ModelLoadError
from guardalign_core.testing.tiny_clip import TINY_CLIP, tiny_detector_config
from shared_images import shared_data

HAS_OPENVINO = _execution.is_openvino_available()
needs_openvino = pytest.mark.skipif(not HAS_OPENVINO, reason="the openvino extra is not installed")

# (dtype, backend) of every fast path; fp32 torch eager is the reference.
FAST_PATHS = [
    ("bfloat16", "torch"),
    pytest.param("float32", "openvino", marks=needs_openvino),
    pytest.param("bfloat16", "openvino", marks=needs_openvino),
]


@pytest.fixture(scope="module")
def shared_images() -> list[Image.Image]:
    benign = sorted(p for p in shared_data("benign").iterdir() if p.suffix in (".png", ".jpg"))[:6]
    unsafe = sorted(shared_data("figstep-tiny").glob("*.png"))[:6]
    return [Image.open(p).convert("RGB") for p in benign + unsafe]


@pytest.fixture(scope="module")
def reference(tiny_clip_checkpoint) -> ClipEncoder:
    return ClipEncoder(TINY_CLIP, str(tiny_clip_checkpoint), "cpu", "float32", "torch")


def _fast(checkpoint, dtype: str, backend: str, cache_dir=None) -> ClipEncoder:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # explicit bf16 on an emulating CPU warns; measured below
        return ClipEncoder(TINY_CLIP, str(checkpoint), "cpu", dtype, backend, cache_dir)


# -- 'auto' resolution ------------------------------------------------------------------------


def test_auto_dtype_is_fp32_without_native_bf16(monkeypatch):
    monkeypatch.setattr(_execution, "cpu_has_native_bf16", lambda: False)
    assert resolve_dtype("auto", "cpu") == "float32"
    monkeypatch.setattr(_execution, "cpu_has_native_bf16", lambda: True)
    assert resolve_dtype("auto", "cpu") == "bfloat16"
    assert resolve_dtype("auto", "cuda") == "float16"
    assert resolve_dtype("float32", "cpu") == "float32"  # an explicit choice is kept


def test_auto_backend_and_its_refusals(monkeypatch):
    monkeypatch.setattr(_execution, "is_openvino_available", lambda: True)
    assert resolve_backend("auto", "cpu") == "openvino"
    assert resolve_backend("auto", "cuda") == "torch"
    with pytest.raises(ValueError, match="backend: 'openvino' runs the image tower on the CPU only"):
        resolve_backend("openvino", "cuda:0")
    monkeypatch.setattr(_execution, "is_openvino_available", lambda: False)
    assert resolve_backend("auto", "cpu") == "torch"
    with pytest.raises(ImportError, match=r"guardalign\[openvino\]"):
        resolve_backend("openvino", "cpu")
    with pytest.raises(ValueError, match="backend: 'onnx'"):
        resolve_backend("onnx", "cpu")


def test_config_defaults_are_auto_and_validated():
    config = DetectorConfig()
    assert (config.device, config.dtype, config.backend) == ("auto", "auto", "auto")
    with pytest.raises(ValueError, match="backend"):
        DetectorConfig(backend="tensorrt")
    with pytest.raises(ValueError, match="device"):
        DetectorConfig(device="gpu0")
    for name in ("default", "fast-cpu"):  # the presets take the fast path through the defaults
        preset = get_preset(name).detector
        assert (preset.device, preset.dtype, preset.backend) == ("auto", "auto", "auto"), name


def test_encoder_records_the_resolved_path(tiny_clip_checkpoint, monkeypatch):
    monkeypatch.setattr(_execution, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(_execution, "is_openvino_available", lambda: False)
    encoder = ClipEncoder(TINY_CLIP, str(tiny_clip_checkpoint), "auto", "auto", "auto")
    assert str(encoder.execution) == "cpu/float32/torch" and encoder.identity.endswith("|cpu/float32/torch")
    assert next(encoder.model.parameters()).dtype == torch.float32


def test_auto_dtype_falls_back_to_fp32_when_it_does_not_agree(tiny_clip_checkpoint, monkeypatch):
    monkeypatch.setattr(_execution, "cpu_has_native_bf16", lambda: True)
    monkeypatch.setattr(_execution, "is_openvino_available", lambda: False)
    monkeypatch.setitem(encoders._clip.MIN_AGREEMENT, "bfloat16", 1.5)  # no bf16 result can pass
    with pytest.warns(RuntimeWarning, match="dtype='auto'.*using float32"):
        encoder = ClipEncoder(TINY_CLIP, str(tiny_clip_checkpoint), "cpu", "auto", "torch")
    assert encoder.execution.dtype == "float32" and next(encoder.model.parameters()).dtype == torch.float32


def test_text_embedding_cache_keys_differ_per_path(tiny_clip_checkpoint, tmp_path):
    paths = [("float32", "torch"), ("bfloat16", "torch")] + ([("float32", "openvino")] if HAS_OPENVINO else [])
    identities = set()
    for dtype, backend in paths:
        encoder = _fast(tiny_clip_checkpoint, dtype, backend, tmp_path)
        encoder.cached_text_embeddings("bank:x", ["a knife", "a gun"], tmp_path)
        identities.add(encoder.identity)
    assert len(identities) == len(paths)
    assert len(list((tmp_path / "text_embeddings").glob("*.pt"))) == len(paths)


# -- agreement with fp32 eager (item 3) ---------------------------------------------------------


@pytest.mark.parametrize("dtype, backend", FAST_PATHS)
def test_fast_path_embeddings_agree_with_fp32_eager(dtype, backend, reference, tiny_clip_checkpoint, shared_images, tmp_path):
    fast = _fast(tiny_clip_checkpoint, dtype, backend, tmp_path)
    assert fast.backend == backend
    crops = torch.cat([reference.grid_crops(image, 3) for image in shared_images])  # (12·9, 3, S, S)
    ref, got = reference.encode_images(crops, 36), fast.encode_images(crops, 36)
    cosine = torch.nn.functional.cosine_similarity(ref, got, dim=-1)
    assert cosine.min() >= 0.9999, f"{dtype}/{backend}: min cosine {float(cosine.min()):.6f}"
    whole = torch.cat([reference.center_crop(image) for image in shared_images])
    assert torch.nn.functional.cosine_similarity(reference.encode_images(whole), fast.encode_images(whole)).min() >= 0.9999


def _threshold_in_widest_gap(scores: torch.Tensor) -> float:
    """A τ between two adjacent scores near the median, in the widest such gap: about half flagged, none on the edge."""
    values = scores.flatten().sort().values
    n = values.numel()
    lo, hi = n // 4, 3 * n // 4
    gaps = values[lo + 1 : hi + 1] - values[lo:hi]
    k = int(gaps.argmax())
    return float((values[lo + k] + values[lo + k + 1]) / 2)


@pytest.mark.parametrize("dtype, backend", FAST_PATHS)
def test_detector_decisions_are_identical_between_paths(dtype, backend, reference, tiny_clip_checkpoint, shared_images, tmp_path):
    fast = _fast(tiny_clip_checkpoint, dtype, backend, tmp_path)
    base = tiny_detector_config(tiny_clip_checkpoint, disk_cache=False)
    probe = OTDetector(base, encoder=reference)
    tau = _threshold_in_widest_gap(torch.tensor([r.statistic for r in probe.scan(shared_images)]))
    config = base.model_copy(update={"threshold": tau})
    ref_results = OTDetector(config, encoder=reference).scan(shared_images)
    fast_results = OTDetector(config, encoder=fast).scan(shared_images)
    assert 0 < sum(r.decision.value == "mask" for r in ref_results) < len(shared_images) or any(
        0 < len(r.unsafe_boxes) < 9 for r in ref_results
    )  # the comparison is not vacuous: some patches on each side of τ
    for ref, got in zip(ref_results, fast_results):
        assert got.decision == ref.decision
        assert [(b.row, b.col) for b in got.unsafe_boxes] == [(b.row, b.col) for b in ref.unsafe_boxes]
    cos_tau = _threshold_in_widest_gap(torch.tensor([r.score for r in CosineDetector(base, encoder=reference).scan(shared_images)]))
    cos_config = base.model_copy(update={"kind": "cosine", "cosine_threshold": cos_tau})
    ref_cos = CosineDetector(cos_config, encoder=reference).scan(shared_images)
    fast_cos = CosineDetector(cos_config, encoder=fast).scan(shared_images)
    assert [r.decision for r in fast_cos] == [r.decision for r in ref_cos]


# -- the OpenVINO export cache -------------------------------------------------------------------


@needs_openvino
def test_openvino_export_is_cached_and_reused(tiny_clip_checkpoint, tmp_path):
    first = _fast(tiny_clip_checkpoint, "float32", "openvino", tmp_path)
    assert not first._image_tower.from_cache and list((tmp_path / "openvino").glob("*/image_tower.xml"))
    second = _fast(tiny_clip_checkpoint, "float32", "openvino", tmp_path)
    assert second._image_tower.from_cache and second.agreement >= 0.9999


@needs_openvino
def test_openvino_random_weights_are_never_cached_on_disk(tmp_path):
    encoder = ClipEncoder(TINY_CLIP, None, "cpu", "float32", "openvino", tmp_path)
    assert encoder.backend == "openvino" and not (tmp_path / "openvino").exists()


@needs_openvino
def test_swapped_openvino_export_is_refused(tiny_clip_checkpoint, tmp_path):
    """Attack: the cached export is replaced by another model's. It must never be used to score images."""
    import shutil

    from guardalign_core.testing.tiny_clip import save_tiny_clip_checkpoint

    _fast(tiny_clip_checkpoint, "float32", "openvino", tmp_path / "cache")
    (folder,) = (tmp_path / "cache" / "openvino").iterdir()
    other = save_tiny_clip_checkpoint(tmp_path / "other.pt", seed=1)
    _fast(other, "float32", "openvino", tmp_path / "other-cache")
    (other_folder,) = (tmp_path / "other-cache" / "openvino").iterdir()
    for name in ("image_tower.xml", "image_tower.bin"):
        shutil.copyfile(other_folder / name, folder / name)
    with pytest.raises(ModelLoadError, match="disagrees with the torch reference"):
        ClipEncoder(TINY_CLIP, str(tiny_clip_checkpoint), "cpu", "float32", "openvino", tmp_path / "cache")
    with pytest.warns(RuntimeWarning, match="backend='auto'.*using torch"):
        fallback = ClipEncoder(TINY_CLIP, str(tiny_clip_checkpoint), "cpu", "float32", "auto", tmp_path / "cache")
    assert fallback.backend == "torch"


@needs_openvino
def test_corrupt_openvino_export_is_exported_again(tiny_clip_checkpoint, tmp_path):
    _fast(tiny_clip_checkpoint, "float32", "openvino", tmp_path)
    (weights,) = (tmp_path / "openvino").glob("*/image_tower.bin")
    weights.write_bytes(b"\0" * 16)
    encoder = _fast(tiny_clip_checkpoint, "float32", "openvino", tmp_path)
    assert encoder.backend == "openvino" and not encoder._image_tower.from_cache and encoder.agreement >= 0.9999


@needs_openvino
def test_encoder_for_config_caches_next_to_the_text_embeddings(tiny_clip_checkpoint, tmp_path):
    encoders.clear_clip_cache()
    try:
        encoder = encoder_for_config(tiny_detector_config(tiny_clip_checkpoint, cache_dir=str(tmp_path), device="cpu", backend="openvino"))
        assert encoder.backend == "openvino" and list((tmp_path / "openvino").iterdir())
    finally:
        encoders.clear_clip_cache()


# -- one transfer per batch (item 5, the encoder's part) -------------------------------------------


def test_host_pixels_go_to_the_device_once_per_call_not_per_batch(reference, monkeypatch):
    calls: list[tuple[int, ...]] = []
    to_device = reference._to_device

    def counting(pixels):
        calls.append(tuple(pixels.shape))
        return to_device(pixels)

    monkeypatch.setattr(reference, "_to_device", counting)
    reference.encode_images(torch.zeros(10, 3, 64, 64), batch_size=4)
    assert calls == []  # already where the model is (the CPU): nothing to move
    monkeypatch.setattr(reference, "_on_device", lambda pixels: False)  # as host pixels for a CUDA model
    reference.encode_images(torch.zeros(10, 3, 64, 64), batch_size=4)
    reference.encode_tokens(torch.zeros(10, 3, 64, 64), batch_size=4)
    assert calls == [(10, 3, 64, 64), (10, 3, 64, 64)]  # one transfer each, not one per batch of 4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_path_is_fp16_and_agrees(tiny_clip_checkpoint, reference, shared_images):
    fast = ClipEncoder(TINY_CLIP, str(tiny_clip_checkpoint), "auto", "auto", "auto")
    assert str(fast.execution) == "cuda:0/float16/torch"
    crops = torch.cat([reference.grid_crops(image, 3) for image in shared_images])
    cosine = torch.nn.functional.cosine_similarity(reference.encode_images(crops), fast.encode_images(crops))
    assert cosine.min() >= 0.999


# -- QuickGELU (issue 15, item 9) --------------------------------------------------------------------


@pytest.mark.parametrize("preset", list_presets())
def test_backbones_are_built_with_the_activation_their_weights_were_trained_with(preset):
    import open_clip

    detector = get_preset(preset).detector
    with torch.device("meta"):  # the real construction path, no memory, no download
        model = build_open_clip_model(detector.model, detector.pretrained, device="meta", load_weights=False)
    trained_quick = bool((open_clip.get_pretrained_cfg(detector.model, detector.pretrained or "") or {}).get("quick_gelu"))
    if detector.pretrained == "openai":
        assert trained_quick  # open_clip's registry: OpenAI's CLIP was trained with QuickGELU
    for tower in (model.visual.transformer, model.transformer):
        activations = {type(block.mlp.gelu).__name__ for block in tower.resblocks}
        assert activations == ({"QuickGELU"} if trained_quick else {"GELU"}), (preset, activations)


# -- guardalign bench reports which path ran and its agreement (item 4) -----------------------------


def test_bench_reports_each_path_and_its_agreement(shared_images):
    from guardalign_core.bench import bench_encode_paths

    paths = [("float32", "torch"), ("bfloat16", "torch")] + ([("float32", "openvino")] if HAS_OPENVINO else [])
    report = bench_encode_paths(shared_images[:2] + shared_images[-2:], model=TINY_CLIP, repeats=1, paths=paths)
    assert list(report["paths"]) == [f"cpu/{d}/{b}" for d, b in paths]
    assert report["auto"] == str(resolve_execution("cpu", "auto", "auto"))
    for name, row in report["paths"].items():
        assert row["min_cosine"] >= 0.9999 and row["identical_decisions"], name
        assert row["ms_per_crop"] > 0 and row["speedup_vs_fp32"] > 0


# -- the detector honours device / dtype / backend (item 1) ---------------------------------------------


def test_the_detector_builds_its_encoder_from_the_whole_config(tiny_clip_checkpoint, tmp_path, monkeypatch):
    """Before: the detector called get_clip_encoder(model, pretrained, device, dtype): backend ignored."""
    class Captured(Exception):
        pass

    asked = []

    def capture(*args):  # stands in for the load (no ViT weights offline)
        asked.append(args)
        raise Captured

    monkeypatch.setattr("guardalign_core.detector.get_clip_encoder", capture)
    for name in ("default", "fast-cpu"):
        preset = get_preset(name).detector
        with pytest.raises(Captured):
            _ = OTDetector(preset.model_copy(update={"cache_dir": str(tmp_path)})).encoder
        assert asked[-1] == (preset.model, "openai", "auto", "auto", "auto", tmp_path), name


@pytest.mark.parametrize("native_bf16, openvino, expected", [
    (False, True, "cpu/float32/openvino"),  # this project's CPU (AVX2, no native bf16) with the extra installed
    (False, False, "cpu/float32/torch"),  # ... without it
    (True, True, "cpu/bfloat16/openvino"),  # AVX512-BF16 / AMX
    (True, False, "cpu/bfloat16/torch"),
])
def test_presets_pick_the_fast_path_for_the_machine(native_bf16, openvino, expected, monkeypatch):
    monkeypatch.setattr(_execution, "cpu_has_native_bf16", lambda: native_bf16)
    monkeypatch.setattr(_execution, "is_openvino_available", lambda: openvino)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    for name in ("default", "fast-cpu"):
        c = get_preset(name).detector
        assert str(resolve_execution(c.device, c.dtype, c.backend)) == expected, name


def test_the_tiny_preset_stays_on_the_torch_reference():
    assert get_preset("tiny-random").detector.backend == "torch"


def test_each_path_has_its_own_text_embeddings_and_each_verdict_names_its_path(tiny_clip_checkpoint, tmp_path, shared_images):
    encoders.clear_clip_cache()
    seen: dict[str, set] = {}
    try:
        paths = [("float32", "torch"), ("bfloat16", "torch")] + ([("float32", "openvino")] if HAS_OPENVINO else [])
        for dtype, backend in paths:
            before = set((tmp_path / "text_embeddings").glob("*.pt")) if (tmp_path / "text_embeddings").exists() else set()
            config = tiny_detector_config(tiny_clip_checkpoint, cache_dir=str(tmp_path), device="cpu", dtype=dtype, backend=backend)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)  # explicit bf16 on a CPU that emulates it
                results = OTDetector(config).scan(shared_images[:2])
            path = f"cpu/{dtype}/{backend}"
            assert all(r.execution == path and r.backbone.endswith(f"({path})") for r in results), [r.backbone for r in results]
            seen[path] = set((tmp_path / "text_embeddings").glob("*.pt")) - before
        assert all(len(files) == 2 for files in seen.values()), seen  # the unsafe bank and the reference bank, per path
    finally:
        encoders.clear_clip_cache()


def test_auto_resolves_in_the_detector_too(tiny_clip_checkpoint, monkeypatch, embed_cache_dir):
    monkeypatch.setattr(_execution, "cpu_has_native_bf16", lambda: False)
    monkeypatch.setattr(_execution, "is_openvino_available", lambda: False)
    encoders.clear_clip_cache()
    try:
        config = tiny_detector_config(tiny_clip_checkpoint, cache_dir=str(embed_cache_dir), device="auto", dtype="auto", backend="auto")
        result = OTDetector(config).scan_one(Image.new("RGB", (32, 32)))
        expected = "cuda:0/float16/torch" if torch.cuda.is_available() else "cpu/float32/torch"
        assert result.execution == expected
    finally:
        encoders.clear_clip_cache()


def test_detector_bench_names_the_path_its_agreement_and_the_prefetch_ratio(tiny_clip_checkpoint, shared_images, monkeypatch):
    import guardalign_core.detector as detector_module
    from guardalign_core.bench import bench_detector

    monkeypatch.setattr(detector_module, "_IMAGES_PER_CHUNK", 2)  # the prefetch comparison spans two chunks

    paths = [("float32", "torch"), ("bfloat16", "torch")] + ([("float32", "openvino")] if HAS_OPENVINO else [])
    for dtype, backend in paths:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            report = bench_detector(shared_images[:3], model=TINY_CLIP, batch=3, single=1, dtype=dtype, backend=backend,
                                    prefetch_images=4, agreement_images=3)
        assert report["execution"] == f"cpu/{dtype}/{backend}"
        agreement = report["image_agreement"]
        assert agreement["reference"] == ((dtype, backend) == ("float32", "torch"))
        assert agreement["min_cosine"] >= 0.9999 and agreement["identical_decisions"], (dtype, backend, agreement)
        prefetch = report["prefetch"]
        assert (prefetch["images"], prefetch["chunks"]) == (4, 2) and prefetch["identical_results"] and prefetch["speedup"] > 0

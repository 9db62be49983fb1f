"""Side-by-side timings for ``guardalign bench`` (never asserted in unit tests).

Speed does not depend on weights, so a named open_clip config with random weights gives
real timings where its checkpoint cannot be downloaded.
"""

from __future__ import annotations

import io
import logging
import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch
from PIL import Image

from .config import DetectorConfig
from .detector import CosineDetector, OTDetector
from .encoders import ClipEncoder, cpu_has_native_bf16, get_clip_encoder, is_openvino_available, resolve_execution
from .images import encode_png, read_image_bytes


def _as_png_bytes(image: Image.Image) -> bytes:
    return encode_png(image.convert("RGB"))

logger = logging.getLogger(__name__)


def machine_label() -> str:
    """A short description of where the numbers were taken."""
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    return f"CPU {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, torch {torch.__version__}"


def _stage_means(results) -> dict[str, float]:
    keys = {k for r in results for k in r.timings_ms}
    return {k: statistics.fmean(r.timings_ms.get(k, 0.0) for r in results) for k in sorted(keys)}


def _shared_weights(model: str, pretrained: str | None, folder: str, execution: str) -> str | None:
    """Random weights saved once when a fast path is compared with fp32 eager, so both load the same ones."""
    if pretrained is not None or execution.endswith("/float32/torch"):
        return pretrained
    from .testing.tiny_clip import save_tiny_clip_checkpoint

    return str(save_tiny_clip_checkpoint(Path(folder) / "random.pt", model=model))


def _image_agreement(encoder: ClipEncoder, weights: str | None, pil: Sequence[Image.Image], config: DetectorConfig) -> dict[str, Any]:
    """The path that ran against fp32 torch eager on the bench images: lowest crop cosine, identical decisions."""
    if str(encoder.execution).endswith("/float32/torch"):
        return {"reference": True, "min_cosine": 1.0, "identical_decisions": True}
    reference = ClipEncoder(encoder.model_name, weights, "cpu", "float32", "torch")
    crops = _crops(reference, pil, config.grid_size)  # (B·g², 3, S, S)
    cosine = torch.nn.functional.cosine_similarity(reference.encode_images(crops), encoder.encode_images(crops), dim=-1)
    ref_scores = torch.tensor([r.statistic for r in OTDetector(config, encoder=reference).scan(list(pil))])
    got_scores = torch.tensor([r.statistic for r in OTDetector(config, encoder=encoder).scan(list(pil))])
    tau = _threshold_in_widest_gap(ref_scores)
    return {"reference": False, "min_cosine": round(float(cosine.min()), 7),
            "identical_decisions": bool(torch.equal(ref_scores <= tau, got_scores <= tau))}


def _prefetch_ratio(config: DetectorConfig, encoder: ClipEncoder, images: list[bytes], repeats: int) -> dict[str, Any]:
    """Whole scans with prefetch off and on, interleaved (off, on, off, on, ...); the best of each."""
    from .detector import _IMAGES_PER_CHUNK

    walls: dict[str, list[float]] = {"off": [], "on": []}
    detectors = {name: OTDetector(config.model_copy(update={"prefetch": name == "on"}), encoder=encoder) for name in walls}
    same = True
    for _ in range(repeats):
        outputs = {}
        for name, detector in detectors.items():
            t0 = time.perf_counter()
            outputs[name] = detector.scan(images)
            walls[name].append(time.perf_counter() - t0)
        same &= [(r.decision, r.scores) for r in outputs["off"]] == [(r.decision, r.scores) for r in outputs["on"]]
    best = {name: min(values) for name, values in walls.items()}
    return {
        "images": len(images), "chunks": -(-len(images) // _IMAGES_PER_CHUNK), "repeats": repeats,
        "off_ms_per_image": round(best["off"] * 1000 / len(images), 3),
        "on_ms_per_image": round(best["on"] * 1000 / len(images), 3),
        "speedup": round(best["off"] / best["on"], 3), "identical_results": same,
    }


def bench_detector(
    images: Sequence[Image.Image | str],
    *,
    model: str = "ViT-B-32",
    pretrained: str | None = None,
    device: str = "cpu",
    grid_size: int = 3,
    batch: int = 32,
    single: int = 8,
    patch_mode: str = "grid",
    dtype: str = "float32",
    backend: str = "torch",
    prefetch_images: int | None = None,
    prefetch_repeats: int = 1,
    agreement_images: int = 4,
) -> dict[str, Any]:
    """Time decoding, encoding, the OT stage and masking for the OT detector and the cosine baseline.

    Both detectors share one encoder and run on the same ``batch`` images. The threshold of
    the OT detector is set at the median patch score of a first pass, so masking really runs.
    One-at-a-time scanning is timed on the first ``single`` images. The report names the
    execution path that ran (``execution``: device/dtype/backend after ``'auto'``), its
    agreement with fp32 torch eager on the first ``agreement_images`` bench images (lowest
    crop cosine, identical OT decisions; ``probe_agreement`` is the load-time check), and whole
    scans of ``prefetch_images`` images (default two chunks) with prefetch off and on.

    Returns:
        A dict of per-detector stage timings (ms/image), images/s, the OT/encoding ratio, the
        batched vs one-at-a-time speed-up, ``agreement`` and ``prefetch`` (off/on ms per image).
    """
    from .detector import _IMAGES_PER_CHUNK

    # Timed scans get encoded bytes, so decoding is part of what is measured.
    encoded = [_as_png_bytes(img) if isinstance(img, Image.Image) else read_image_bytes(img) for img in images]
    decoded = (encoded * (batch // max(1, len(encoded)) + 1))[:batch]
    with tempfile.TemporaryDirectory() as tmp:
        weights = _shared_weights(model, pretrained, tmp, str(resolve_execution(device, dtype, backend)))
        encoder = get_clip_encoder(model, weights, device, dtype, backend)
        config = DetectorConfig(model=model, pretrained=weights, device=device, dtype=dtype, backend=backend,
                                grid_size=grid_size, patch_mode=patch_mode, disk_cache=False)
        ot = OTDetector(config, encoder=encoder)
        ot.scan(decoded[:2])  # warm-up, text embeddings
        first = ot.scan(decoded)
        median = statistics.median(s for r in first for row in r.statistic for s in row)
        ot = OTDetector(config.model_copy(update={"threshold": median}), encoder=encoder)
        cosine = CosineDetector(config.model_copy(update={"kind": "cosine"}), encoder=encoder)
        cosine.scan(decoded[:2])
        report: dict[str, Any] = {"machine": machine_label(), "model": model, "weights": pretrained or "random", "grid": grid_size,
                                  "patch_mode": patch_mode, "batch": batch, "dtype": dtype,
                                  "execution": str(encoder.execution), "agreement": encoder.agreement}
        pil = [Image.open(io.BytesIO(data)).convert("RGB") for data in encoded[:agreement_images]]
        report["image_agreement"] = _image_agreement(encoder, weights, pil, config)
    for name, detector in (("ot", ot), ("cosine", cosine)):
        t0 = time.perf_counter()
        results = detector.scan(decoded)
        wall = time.perf_counter() - t0
        stages = _stage_means(results)
        report[name] = {
            "ms_per_image": {k: round(v, 3) for k, v in stages.items()},
            "wall_ms_per_image": round(wall * 1000 / len(decoded), 3),
            "images_per_s": round(len(decoded) / wall, 2),
            "ot_over_encode": round(stages.get("ot", 0.0) / stages["encode"], 5) if stages.get("encode") else None,
            "masked_images": sum(r.decision.value == "mask" for r in results),
        }
    t0 = time.perf_counter()
    for image in decoded[:single]:
        ot.scan([image])
    one_ms = (time.perf_counter() - t0) * 1000 / single
    report["ot"]["one_at_a_time_ms_per_image"] = round(one_ms, 3)
    report["ot"]["batched_speedup"] = round(one_ms / report["ot"]["wall_ms_per_image"], 3)
    n = prefetch_images if prefetch_images is not None else 2 * _IMAGES_PER_CHUNK
    if n > 0:
        many = (encoded * (n // max(1, len(encoded)) + 1))[:n]
        report["prefetch"] = _prefetch_ratio(ot.config, encoder, many, prefetch_repeats)
    return report


def _crops(encoder: ClipEncoder, images: Sequence[Image.Image], grid_size: int) -> torch.Tensor:
    return torch.cat([encoder.grid_crops(image, grid_size) for image in images])  # (B·g², 3, S, S)


def _threshold_in_widest_gap(scores: torch.Tensor) -> float:
    """A τ between two adjacent scores in the middle half, in the widest gap there (no score sits on it)."""
    values = scores.flatten().sort().values
    lo, hi = values.numel() // 4, max(values.numel() // 4 + 1, 3 * values.numel() // 4)
    gaps = values[lo + 1 : hi + 1] - values[lo:hi]
    k = int(gaps.argmax())
    return float((values[lo + k] + values[lo + k + 1]) / 2)


def encode_paths(device: str = "cpu") -> list[tuple[str, str]]:
    """The (dtype, backend) paths worth comparing here: fp32 torch (the reference) first, then the fast ones."""
    paths = [("float32", "torch")]
    if torch.device(device).type == "cuda":
        return paths + [("float16", "torch")]
    paths.append(("bfloat16", "torch"))
    if is_openvino_available():
        paths.append(("float32", "openvino"))
        if cpu_has_native_bf16():
            paths.append(("bfloat16", "openvino"))
    return paths


def bench_encode_paths(
    images: Sequence[Image.Image | str],
    *,
    model: str = "ViT-B-32",
    pretrained: str | None = None,
    device: str = "cpu",
    grid_size: int = 3,
    n_images: int = 4,
    batch_size: int = 36,
    repeats: int = 3,
    paths: Sequence[tuple[str, str]] | None = None,
) -> dict[str, Any]:
    """The detector's encode stage on every execution path, interleaved in one run, against fp32 eager.

    Each repeat times every path once on the same crops (``n_images`` images × g² crops),
    so load drifts hit all paths alike; the best repeat per path is reported. Agreement is
    the lowest embedding cosine to fp32 eager over all crops, and whether the OT detector's
    decisions (unsafe patch sets) are identical at a τ in the widest gap near the median fp32
    patch score (about half the patches flagged; no score sits on τ).

    Returns:
        ``{"auto": the path 'auto' picks here, "paths": {name: {ms_per_crop, speedup, min_cosine,
        identical_decisions, ...}}}``.
    """
    from PIL import Image as _Image

    pil = [img if isinstance(img, _Image.Image) else _Image.open(img).convert("RGB") for img in images][:n_images]
    paths = list(paths or encode_paths(device))
    encoders: dict[str, ClipEncoder] = {}
    with tempfile.TemporaryDirectory() as tmp:
        weights = pretrained
        if weights is None:  # random weights: every path must load the same ones
            from .testing.tiny_clip import save_tiny_clip_checkpoint

            weights = str(save_tiny_clip_checkpoint(Path(tmp) / "random.pt", model=model))
        for dtype, backend in paths:
            t0 = time.perf_counter()
            enc = ClipEncoder(model, weights, device, dtype, backend)
            encoders[f"{enc.execution}"] = enc
            logger.info("loaded %s in %.1fs", enc.execution, time.perf_counter() - t0)
    names = list(encoders)
    reference = encoders[names[0]]
    crops = _crops(reference, pil, grid_size)
    timings: dict[str, list[float]] = {name: [] for name in names}
    outputs: dict[str, torch.Tensor] = {}
    for name in names:  # warm-up (first-call allocations, OpenVINO's first inference)
        outputs[name] = encoders[name].encode_images(crops[:batch_size], batch_size)
    for _ in range(repeats):
        for name in names:
            t0 = time.perf_counter()
            outputs[name] = encoders[name].encode_images(crops, batch_size)
            timings[name].append(time.perf_counter() - t0)
    ref_feats = outputs[names[0]]
    config = DetectorConfig(model=model, pretrained=pretrained, grid_size=grid_size, disk_cache=False)
    ref_scores = None
    report: dict[str, Any] = {"machine": machine_label(), "model": model, "weights": pretrained or "random", "grid": grid_size,
                              "crops": int(crops.shape[0]), "batch": batch_size, "native_bf16": cpu_has_native_bf16(),
                              "auto": str(resolve_execution(device, "auto", "auto")), "paths": {}}
    for name in names:
        best = min(timings[name])
        cosine = torch.nn.functional.cosine_similarity(ref_feats, outputs[name], dim=-1)
        detector = OTDetector(config, encoder=encoders[name])
        scores = torch.tensor([r.statistic for r in detector.scan(pil)])
        if ref_scores is None:
            ref_scores, tau = scores, _threshold_in_widest_gap(scores)
        flagged = scores <= tau
        report["paths"][name] = {
            "ms_per_crop": round(best * 1000 / crops.shape[0], 3),
            "speedup_vs_fp32": round(min(timings[names[0]]) / best, 3),
            "min_cosine": round(float(cosine.min()), 7),
            "load_agreement": encoders[name].agreement,
            "identical_decisions": bool(torch.equal(flagged, ref_scores <= tau)),
        }
    return report


def bench_calibration(
    model: Any,
    processor: Any,
    *,
    prompt_repeat: int = 8,
    new_tokens: int = 32,
    repeats: int = 3,
    image: Image.Image | None = None,
) -> dict[str, Any]:
    """Prefill time and decode tokens/s with calibration off, on (SDPA) and on (eager), side by side.

    "off" is the untouched model (calibration removed); the calibrated runs install it with
    the default layers and γ. Every variant generates exactly ``new_tokens`` tokens from the
    same prompt (safety prefix included); the best of ``repeats`` is reported.
    """
    from .calibration import apply_calibration, calibrated, remove_calibration
    from .lvlm import GenerationOptions, LocalLVLM

    remove_calibration(model)
    text = " ".join(["Describe the image in one sentence."] * prompt_repeat)
    content = ([{"type": "image"}] if image is not None else []) + [{"type": "text", "text": text}]
    messages = [{"role": "user", "content": content}]
    special = getattr(getattr(processor, "tokenizer", processor), "all_special_ids", [])
    sync = torch.cuda.synchronize if torch.cuda.is_available() and next(model.parameters()).is_cuda else (lambda: None)

    runner = LocalLVLM(model=model, processor=processor)  # installs the calibration backend (needed to prepare)
    prepared = runner.prepare(messages, [image] if image is not None else [], prefix="As an AI assistant, ")
    extra = {"suppress_tokens": special}

    def measure(calibrate: bool) -> dict[str, float]:
        prefill, total = [], []
        for _ in range(repeats + 1):
            sync(); t0 = time.perf_counter()
            _generate(1)
            sync(); t1 = time.perf_counter()
            _generate(new_tokens)
            sync(); t2 = time.perf_counter()
            prefill.append(t1 - t0)
            total.append(t2 - t1)
        best_prefill, best_total = min(prefill[1:]), min(total[1:])
        decode_s = max(best_total - best_prefill, 1e-9)
        return {"prefill_ms": round(best_prefill * 1000, 3), "decode_tokens_per_s": round((new_tokens - 1) / decode_s, 3),
                "input_tokens": prepared.input_tokens}

    def _generate(n: int) -> None:
        kwargs = runner._generate_kwargs(prepared, GenerationOptions(max_new_tokens=n), {**extra, "min_new_tokens": n})
        with torch.no_grad():
            if state["calibrate"]:
                with calibrated(model, prepared.prefix_spans):
                    model.generate(**kwargs)
            else:
                model.generate(**kwargs)

    state = {"calibrate": False}
    report: dict[str, Any] = {"machine": machine_label(), "new_tokens": new_tokens}
    text_config = model.config.get_text_config()
    report["model"] = {"layers": text_config.num_hidden_layers, "hidden": text_config.hidden_size, "heads": text_config.num_attention_heads}
    remove_calibration(model)  # "off" is the untouched model
    report["off"] = measure(False)
    state["calibrate"] = True
    apply_calibration(model, "sdpa")
    report["sdpa"] = measure(True)
    apply_calibration(model, "eager")
    report["eager"] = measure(True)
    remove_calibration(model)
    base = report["off"]["decode_tokens_per_s"]
    report["ratios"] = {
        "sdpa_decode_vs_off": round(report["sdpa"]["decode_tokens_per_s"] / base, 4),
        "eager_decode_vs_off": round(report["eager"]["decode_tokens_per_s"] / base, 4),
        "sdpa_prefill_vs_off": round(report["sdpa"]["prefill_ms"] / report["off"]["prefill_ms"], 4),
    }
    return report

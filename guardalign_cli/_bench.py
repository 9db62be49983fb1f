"""``guardalign bench``: side-by-side timings, printed as a table and optionally as JSON."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from ._options import DeprecatedAlias, check_checkpoint_file, check_device


def _default_images() -> list[str]:
    shared = Path(__file__).resolve().parents[2].parent / "shared" / "data"
    files = sorted(str(p) for sub in ("benign", "figstep-tiny") for p in (shared / sub).glob("*") if p.suffix.lower() in (".png", ".jpg"))
    return files


def run_bench(args: argparse.Namespace) -> int:
    if args.detection:
        return run_detection_bench(args)
    check_device("--device", args.device)
    check_checkpoint_file("--pretrained", args.pretrained)
    from guardalign_core.bench import bench_detector
    from guardalign_core.thresholds import list_images

    images = [str(p) for p in list_images(args.images)] if args.images else _default_images()
    if not images:
        from PIL import Image

        import numpy as np

        rng = np.random.default_rng(0)
        images = [Image.fromarray(rng.integers(0, 255, (480, 640, 3), dtype=np.uint8)) for _ in range(8)]
    pretrained = None if args.pretrained in (None, "none", "random") else args.pretrained
    if args.encode_paths:
        return _run_encode_paths(args, images, pretrained)
    report = {"detector": bench_detector(images, model=args.model, pretrained=pretrained, device=args.device, grid_size=args.grid,
                                         batch=args.batch, single=args.single, patch_mode=args.patch_mode,
                                         dtype=args.dtype, backend=args.backend)}
    for section in args.extra or []:
        report[section] = _EXTRA[section](args)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return 0
    det = report["detector"]
    agreement = f", probe cosine to fp32 eager {det['agreement']:.6f}" if det.get("agreement") is not None else ""
    sys.stdout.write(f"machine: {det['machine']}\nbackbone: {det['model']} ({det['weights']} weights), {det['patch_mode']} g={det['grid']}, batch {det['batch']}\n")
    sys.stdout.write(f"encode path: {det['execution']}{agreement}\n")
    image_agreement = det.get("image_agreement") or {}
    if image_agreement and not image_agreement.get("reference"):
        sys.stdout.write(f"vs fp32 eager on the bench images: min cosine {image_agreement['min_cosine']:.6f}, "
                         f"identical decisions {image_agreement['identical_decisions']}\n")
    if det.get("prefetch"):
        p = det["prefetch"]
        sys.stdout.write(f"prefetch ({p['images']} images, {p['chunks']} chunks): off {p['off_ms_per_image']:.2f} ms/image, "
                         f"on {p['on_ms_per_image']:.2f} ms/image, {p['speedup']:.2f}x, identical results {p['identical_results']}\n")
    sys.stdout.write("\n")
    sys.stdout.write(f"{'detector':<8} {'decode':>8} {'encode':>9} {'OT/score':>9} {'mask':>7} {'wall':>9} {'img/s':>7} {'OT/enc':>8}\n")
    for name in ("ot", "cosine"):
        row = det[name]
        ms = row["ms_per_image"]
        sys.stdout.write(
            f"{name:<8} {ms.get('decode', 0):>8.2f} {ms.get('encode', 0):>9.2f} {ms.get('ot', 0):>9.3f} {ms.get('mask', 0):>7.3f} "
            f"{row['wall_ms_per_image']:>9.2f} {row['images_per_s']:>7.2f} {row['ot_over_encode']:>8.4f}\n"
        )
    sys.stdout.write(
        f"\n(ms/image) one-at-a-time OT scan: {det['ot']['one_at_a_time_ms_per_image']:.2f} ms/image; "
        f"batched speed-up {det['ot']['batched_speedup']:.2f}x\n"
    )
    for section in args.extra or []:
        sys.stdout.write(f"\n[{section}]\n{json.dumps(report[section], indent=2)}\n")
    return 0


_WORLD_FLAGS = ("seed", "patches", "categories", "variants", "unrelated_cos", "matching_cos", "sigma_cat", "dim", "references", "reference_match_cos")


def run_detection_bench(args: argparse.Namespace) -> int:
    """``guardalign bench --detection``: the synthetic detection benchmark (simulation, no weights)."""
    from guardalign_core.config import resolve_config
    from guardalign_core.simulation import run_detection_benchmark, world_for

    config = resolve_config(args.guard).detector
    if config.kind != "ot":
        raise ValueError(f"--guard {args.guard}: the detection benchmark runs the OT decision rule; this preset is kind {config.kind!r}")
    overrides = {"rule": args.rule} if args.rule else {}
    if args.threshold is not None:
        overrides["threshold"] = args.threshold
    if overrides:
        config = config.model_validate({**config.model_dump(), **overrides})
    values = {k: getattr(args, k) for k in _WORLD_FLAGS if getattr(args, k) is not None}
    if args.images:  # with --detection, --images is the number of images per group
        if len(args.images) != 1 or not args.images[0].isdigit():
            raise ValueError("--images: with --detection, give the number of synthetic images per group (e.g. --images 200)")
        values["images"] = int(args.images[0])
    world = world_for(config, **values)  # the preset's M, C and dimension unless a flag says otherwise
    report = run_detection_benchmark(world, config)
    if args.json:
        sys.stdout.write(json.dumps(report.model_dump(include={"fpr", "tpr", "auc", "rule", "patches"})) + "\n")
        return 0
    sys.stdout.write(
        f"simulation (synthetic embeddings, not real images): rule {report.rule}, τ={report.threshold:g}, "
        f"M={report.patches}, C={report.categories}, σ_cat={report.sigma_cat:g}, {world.images} images per group\n"
        f"benign FPR {report.fpr:.3f}\n"
        + "".join(f"planted {k:>3}: TPR {report.tpr[k]:.3f}  AUC {report.auc[k]:.3f}\n" for k in ("1", "3", "all"))
    )
    return 0


def _run_encode_paths(args: argparse.Namespace, images: list, pretrained: str | None) -> int:
    from guardalign_core.bench import bench_encode_paths, encode_paths

    paths = [tuple(p.split("/")) for p in args.paths] if args.paths else encode_paths(args.device)
    report = bench_encode_paths(images, model=args.model, pretrained=pretrained, device=args.device, grid_size=args.grid,
                                n_images=args.encode_images, batch_size=args.encode_batch, repeats=args.repeats, paths=paths)
    if args.json:
        sys.stdout.write(json.dumps(report, indent=2) + "\n")
        return 0
    sys.stdout.write(
        f"machine: {report['machine']} (native bf16: {report['native_bf16']})\nbackbone: {report['model']} "
        f"({report['weights']} weights), grid {report['grid']}, {report['crops']} crops, batch {report['batch']}\n"
        f"'auto' picks: {report['auto']}\n\n"
    )
    sys.stdout.write(f"{'path':<24} {'ms/crop':>9} {'vs fp32':>8} {'min cos':>10} {'same decisions':>15}\n")
    for name, row in report["paths"].items():
        sys.stdout.write(
            f"{name:<24} {row['ms_per_crop']:>9.2f} {row['speedup_vs_fp32']:>7.2f}x {row['min_cosine']:>10.6f} "
            f"{str(row['identical_decisions']):>15}\n"
        )
    return 0


def _bench_calibration(args: argparse.Namespace) -> dict:
    from guardalign_core.bench import bench_calibration
    from guardalign_core.bench_models import build_bench_lvlm

    return bench_calibration(*build_bench_lvlm(num_layers=8, hidden=512))


def _bench_langchain(args: argparse.Namespace) -> dict:
    from guardalign_integrations.langchain._bench import bench_langchain

    # The one-image overhead is measured against the bench's backbone (a realistic CLIP pass);
    # fewer repetitions keep a grid scan of a real-size model affordable on a CPU.
    return bench_langchain(n=10, backbone=args.model)


def _bench_llamaindex(args: argparse.Namespace) -> dict:
    from guardalign_integrations.llama_index._bench import bench_postprocessor

    return bench_postprocessor()


# Extra sections, run only when asked for (they need the `local`, `langchain` or `llamaindex` extras).
_EXTRA: dict = {"calibration": _bench_calibration, "langchain": _bench_langchain, "llamaindex": _bench_llamaindex}


def register(commands: argparse._SubParsersAction) -> None:
    bench = commands.add_parser("bench", help="time the detector stages side by side", description="Time decoding, encoding, the OT stage and masking (OT detector vs cosine baseline) in one run.")
    bench.add_argument("--images", nargs="+", metavar="PATH", help="images or folders (default: ../shared/data if present, else random images); with --detection: images per group (default 200)")
    bench.add_argument("--model", default="ViT-B-32", help="open_clip model config (default ViT-B-32)")
    bench.add_argument("--pretrained", default=None, help="weights tag/path; default random (speed does not depend on weights)")
    bench.add_argument("--device", "--clip-device", dest="device", default="cpu", help="CLIP's torch device (default cpu)")
    bench.add_argument("--dtype", default="float32", help="CLIP dtype for the detector bench (float32, bfloat16, float16, auto)")
    bench.add_argument("--backend", default="torch", help="image-tower backend for the detector bench (torch, openvino, auto)")
    bench.add_argument("--encode-paths", action="store_true", help="compare the encode stage on every execution path against fp32 eager, interleaved")
    bench.add_argument("--paths", nargs="+", metavar="DTYPE/BACKEND", help="with --encode-paths: the paths, e.g. float32/torch float32/openvino (first is the reference)")
    bench.add_argument("--encode-images", type=int, default=4, help="with --encode-paths: images (each g² crops)")
    bench.add_argument("--encode-batch", type=int, default=36, help="with --encode-paths: crops per forward")
    bench.add_argument("--repeats", type=int, default=3, help="with --encode-paths: interleaved repeats (best is reported)")
    bench.add_argument("--grid", type=int, default=3)
    bench.add_argument("--patch-mode", choices=["grid", "tokens"], default="grid")
    bench.add_argument("--batch", type=int, default=32, help="images per batched scan (default 32)")
    bench.add_argument("--single", type=int, default=8, help="images timed one at a time (default 8)")
    bench.add_argument("--json", action="store_true", help="print the report as JSON")
    bench.add_argument("--extra", nargs="*", choices=sorted(_EXTRA), help="extra sections: calibration (LVLM decode speed, calibration off/SDPA/eager), langchain, llamaindex")
    detection = bench.add_argument_group("synthetic detection benchmark (--detection; a simulation: no images, no weights)")
    detection.add_argument("--detection", action="store_true", help="measure the decision rule's FPR/TPR/AUC in a synthetic embedding world")
    detection.add_argument("--guard", default="default", metavar="PRESET_OR_FILE", help="guard preset or config file whose rule and OT settings are used (default: default)")
    detection.add_argument("--preset", dest="guard", action=DeprecatedAlias, new="--guard", help=argparse.SUPPRESS)
    detection.add_argument("--rule", choices=["contrast", "scaled", "paper"], help="override the preset's decision rule")
    detection.add_argument("--threshold", type=float, help="override the rule's threshold")
    detection.add_argument("--seed", type=int, help="random seed (default 0)")
    detection.add_argument("--patches", type=int, help="M, patches per image (default: the preset's)")
    detection.add_argument("--categories", type=int, help="C, unsafe categories (default: the preset's bank)")
    detection.add_argument("--variants", type=int, help="N, variants per category (default 5)")
    detection.add_argument("--references", type=int, help="K, benign reference concepts (default 36)")
    detection.add_argument("--dim", type=int, help="embedding dimension (default: the preset's backbone)")
    detection.add_argument("--unrelated-cos", type=float, help="cosine to a concept a patch does not show (default 0.15)")
    detection.add_argument("--matching-cos", type=float, help="cosine to the concept a patch shows (default 0.30)")
    detection.add_argument("--reference-cos", dest="reference_match_cos", type=float, help="cosine of a benign patch to the reference concept it shows (default: --matching-cos)")
    detection.add_argument("--sigma-cat", type=float, help="spread of the cosine across categories (default 0.01)")
    bench.set_defaults(func=run_bench)

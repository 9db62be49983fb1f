"""``guardalign scan`` and ``guardalign calibrate``."""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path
from typing import Any

from guardalign_core.config import GuardConfig, PolicyConfig, save_config
from guardalign_core.config import resolve_config
from guardalign_core.results import ScanResult, Status

from ._options import DeprecatedAlias, check_checkpoint_file, check_device, refuse_overwrite


def create_detector(*args: Any, **kwargs: Any):
    """:func:`guardalign_core.detector.create_detector`, imported on first use: ``guardalign --help`` loads no torch."""
    from guardalign_core.detector import create_detector as create

    return create(*args, **kwargs)


def add_detector_options(parser: argparse.ArgumentParser, *, lvlm: bool = False) -> None:
    """Options shared by every command that builds a detector, spelled the same everywhere.

    ``--guard`` takes the guard config (a preset name or a YAML/JSON file; ``--config`` is its
    deprecated, hidden alias). In the LVLM commands (``lvlm=True``) ``--model`` and ``--device``
    belong to the language model, so CLIP's are ``--clip-model``, ``--clip-pretrained`` and
    ``--clip-device``; in the CLIP-only commands ``--device`` is CLIP's and ``--clip-device`` a
    synonym.
    """
    group = parser.add_argument_group("detector (CLIP)")
    group.add_argument("--guard", metavar="PRESET_OR_FILE", help="guard config: a preset (default, fast-cpu, ...) or a YAML/JSON file "
                       "(e.g. written by 'guardalign calibrate'); the flags below override it")
    group.add_argument("--config", dest="guard", action=DeprecatedAlias, new="--guard", help=argparse.SUPPRESS)
    group.add_argument("--detector", choices=["ot", "cosine"], help="GuardAlign's OT detector (default) or ETA's cosine baseline")
    prefix = "--clip-" if lvlm else "--"
    group.add_argument(f"{prefix}model", dest="clip_model", help="open_clip model name or hf-hub: id (default ViT-L-14-336)")
    group.add_argument(f"{prefix}pretrained", dest="pretrained", help="pretrained tag (e.g. openai), a checkpoint file, or 'none' for random weights")
    group.add_argument("--grid", type=int, help="g: cut each image into g×g patches (default 3)")
    group.add_argument("--patch-mode", choices=["grid", "tokens"], help="grid crops (the paper's) or ViT tokens (one forward, faster on CPU)")
    group.add_argument("--threshold", type=float, help="τ: patches with score ≤ τ are unsafe (cosine: flag when ≥)")
    devices = ["--clip-device"] if lvlm else ["--device", "--clip-device"]
    group.add_argument(*devices, dest="clip_device", metavar="DEVICE", help="CLIP's torch device (cpu, cuda, cuda:1; default: the config's)")
    group.add_argument("--batch-size", type=int, help="crops per CLIP forward pass")
    group.add_argument("--policy", choices=["mask", "block", "flag"], help="the policy: what to do with unsafe images (default mask)")


def config_from_args(args: argparse.Namespace) -> GuardConfig:
    """Merge a guard config (preset or file) with the command-line overrides.

    Every value is checked before anything loads: a bad device or a missing checkpoint file is a
    :class:`~._options.CommandLineError` naming the flag.
    """
    lvlm = hasattr(args, "model_id")  # the LVLM commands keep the language model in model_id
    flags = ("--clip-device", "--clip-pretrained") if lvlm else ("--device/--clip-device", "--pretrained")
    check_device(flags[0], args.clip_device)
    check_checkpoint_file(flags[1], args.pretrained)
    config = resolve_config(args.guard)
    overrides: dict[str, Any] = {}
    if args.detector:
        overrides["kind"] = args.detector
    if args.clip_model:
        overrides["model"] = args.clip_model
    if args.pretrained:
        overrides["pretrained"] = None if args.pretrained.lower() in ("none", "random") else args.pretrained
    for field, value in (("grid_size", args.grid), ("patch_mode", args.patch_mode), ("device", args.clip_device), ("batch_size", args.batch_size)):
        if value is not None:
            overrides[field] = value
    if args.threshold is not None:
        overrides["cosine_threshold" if (args.detector or config.detector.kind) == "cosine" else "threshold"] = args.threshold
    detector = config.detector.model_validate({**config.detector.model_dump(), **overrides})
    policy = config.policy.model_copy(update={"action": args.policy}) if args.policy else config.policy
    return config.model_copy(update={"detector": detector, "policy": policy})


def _table(results: list[ScanResult]) -> str:
    header = f"{'image':<34} {'decision':<8} {'score':>9} {'τ':>7} {'unsafe':>7}  categories / reason"
    lines = [header, "-" * len(header)]
    for r in results:
        name = (r.source or f"image {r.index}")[-34:]
        score = f"{r.score:.4f}" if r.score is not None else "-"
        patches = f"{len(r.unsafe_boxes)}/{r.grid[0] * r.grid[1]}" if r.grid else "-"
        detail = ", ".join(r.fired_categories) if r.unsafe else (r.error if r.status == Status.ERROR else "")
        lines.append(f"{name:<34} {r.decision.value:<8} {score:>9} {r.threshold:>7.4g} {patches:>7}  {detail}")
    return "\n".join(lines)


_OUT_KINDS = ("masked", "heatmap")


def _out_files(out_dir: Path, files: list[Path]) -> list[Path]:
    """The files :func:`_write_images` writes for ``files`` (checked before anything is scanned)."""
    return [out_dir / f"{f.stem}.{kind}.png" for f in files for kind in _OUT_KINDS]


def _write_images(out_dir: Path, file: Path, result: ScanResult, detector: Any) -> None:
    """``<name>.masked.png`` and ``<name>.heatmap.png`` for one checked image."""
    from guardalign_core.images import load_image
    from guardalign_core.visualize import heatmap_overlay

    if result.masked_image is not None:
        result.masked_image.save(out_dir / f"{file.stem}.masked.png")
    heatmap_overlay(load_image(str(file), detector.image_limits), result).save(out_dir / f"{file.stem}.heatmap.png")


def run_scan(args: argparse.Namespace) -> int:
    from guardalign_core.thresholds import list_images

    if args.jsonl or args.ray is not None:
        return _run_corpus_scan(args)
    if args.resume:
        raise ValueError("--resume applies to --jsonl FILE")
    config = config_from_args(args)
    files = list_images(args.paths)
    detector = create_detector(config)
    results = detector.scan([str(f) for f in files], sources=[str(f) for f in files], progress=not args.json and sys.stderr.isatty())
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        refuse_overwrite("--out", _out_files(out_dir, files), force=args.force)
        out_dir.mkdir(parents=True, exist_ok=True)
    for file, result in zip(files, results):
        if out_dir and result.status == Status.OK:
            _write_images(out_dir, file, result, detector)
        if args.json:
            sys.stdout.write(json.dumps(result.model_dump(mode="json")) + "\n")
    if not args.json:
        sys.stdout.write(_table(results) + "\n")
        unsafe = sum(r.unsafe for r in results)
        errors = sum(r.status == Status.ERROR for r in results)
        sys.stdout.write(
            f"\n{len(results)} image(s), {unsafe} unsafe, {errors} error(s); detector {detector.name} on "
            f"{detector.config.backbone_id}, policy {detector.policy.action}"
            + (f"; wrote masked and heat-map images to {out_dir}" if out_dir else "")
            + "\n"
        )
        if detector.config.pretrained is None:
            sys.stdout.write("note: random CLIP weights: the scores mean nothing (mechanics only)\n")
    return 0


_RAY_ADDRESS = re.compile(r"^(auto|local|(ray://)?[\w.\-\[\]:]+:\d{1,5})$")


_BAR = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} [{elapsed} elapsed, ETA {remaining}, {rate_noinv_fmt}]"
"""Always images/s (tqdm's default flips to s/img below one image a second), and the ETA."""


class _StdoutRows:
    """JSON lines on stdout, chunk by chunk (``--ray`` without ``--jsonl``)."""

    def write_rows(self, rows: list[dict[str, Any]]) -> None:
        sys.stdout.write("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))
        sys.stdout.flush()

    def close(self) -> None:
        pass


def _run_corpus_scan(args: argparse.Namespace) -> int:
    """Stream verdict rows, chunk by chunk, to ``--jsonl`` (resumable) or stdout, in-process or through Ray."""
    from guardalign_core.corpus import VerdictJsonlWriter, read_resume_state, verdict_row
    from guardalign_core.memory import config_fingerprint
    from guardalign_core.thresholds import list_images
    from tqdm.auto import tqdm

    if args.resume and not args.jsonl:
        raise ValueError("--resume applies to --jsonl FILE")
    if args.resume and args.force:
        raise ValueError("--resume continues the file and --force overwrites it: pass one of them")
    if args.ray is not None and not _RAY_ADDRESS.match(args.ray):
        raise ValueError(f"--ray: {args.ray[:80]!r} is not a Ray address (host:port, ray://host:port or auto); put image paths before --ray")
    if args.ray is not None and args.out:
        raise ValueError("--out is not supported with --ray (write the verdicts with --jsonl and mask from them, or scan without --ray)")
    if args.chunk_size < 1:
        raise ValueError(f"--chunk-size: must be at least 1, got {args.chunk_size}")
    config = config_from_args(args)
    detector = create_detector(config)
    fingerprint = config_fingerprint(config, detector)
    files = list(dict.fromkeys(p.resolve() for p in list_images(args.paths)))  # each image once, keyed by its resolved path
    state = read_resume_state(args.jsonl, fingerprint) if args.jsonl and args.resume else None
    todo = [f for f in files if state is None or str(f) not in state.done]
    sink = VerdictJsonlWriter(args.jsonl, resume=bool(args.resume), force=args.force, state=state) if args.jsonl else _StdoutRows()
    out_dir = Path(args.out) if args.out else None
    if out_dir:
        refuse_overwrite("--out", _out_files(out_dir, todo), force=args.force)
        out_dir.mkdir(parents=True, exist_ok=True)
    show = args.progress or (args.progress is None and sys.stderr.isatty())
    bar = tqdm(total=len(todo), unit="img", desc="scan", file=sys.stderr, disable=not show, smoothing=0.1, bar_format=_BAR)
    counts = {"rows": 0, "unsafe": 0, "errors": 0}

    def record(rows: list[dict[str, Any]]) -> None:
        sink.write_rows(rows)  # durable before the next chunk is scanned: a kill loses at most one chunk
        counts["rows"] += len(rows)
        counts["unsafe"] += sum(bool(r["unsafe"]) for r in rows)
        counts["errors"] += sum(r["status"] == Status.ERROR.value for r in rows)
        bar.update(len(rows))

    try:
        if args.ray is not None:
            from guardalign_core.distributed import scan_files

            address = None if args.ray == "local" else args.ray
            for rows in scan_files([str(f) for f in todo], config, address=address, batch_size=args.chunk_size,
                                   concurrency=args.actors, num_gpus=args.gpus_per_actor):
                record(rows)
        else:
            for start in range(0, len(todo), args.chunk_size):
                chunk = todo[start : start + args.chunk_size]
                results = detector.scan([str(f) for f in chunk], sources=[str(f) for f in chunk])
                if out_dir:
                    for file, result in zip(chunk, results):
                        if result.status == Status.OK:
                            _write_images(out_dir, file, result, detector)
                record([verdict_row(r, fingerprint=fingerprint, source=str(f)) for f, r in zip(chunk, results)])
    finally:
        bar.close()
        sink.close()
    skipped = len(files) - len(todo)
    where = f"wrote {args.jsonl}" if args.jsonl else "rows on stdout"
    (sys.stdout if args.jsonl else sys.stderr).write(
        f"{counts['rows']} image(s) scanned, {counts['unsafe']} unsafe, {counts['errors']} error(s)"
        + (f", {skipped} already in {Path(args.jsonl).name} (skipped)" if state is not None else "")
        + f"; {where}; detector {detector.name} on {detector.config.backbone_id}"
        + (" through Ray" if args.ray is not None else "")
        + "\n"
    )
    return 0


def run_calibrate(args: argparse.Namespace) -> int:
    from guardalign_core.thresholds import calibrate_threshold, list_images

    config = config_from_args(args)
    refuse_overwrite("--out", [Path(args.out)], force=args.force)
    detector = create_detector(config, policy=PolicyConfig(action="flag"))
    safe, unsafe = list_images([args.safe]), list_images([args.unsafe])
    calibration = calibrate_threshold(detector, [str(p) for p in safe], [str(p) for p in unsafe], args.target_fpr, progress=sys.stderr.isatty())
    field = "cosine_threshold" if detector.name == "cosine" else "threshold"
    calibrated = config.model_copy(update={"detector": config.detector.model_copy(update={field: calibration.threshold})})
    out = save_config(calibrated, args.out)
    sys.stdout.write(
        f"{field} = {calibration.threshold:.6g} on {detector.config.backbone_id} (grid {detector.config.grid_size}, "
        f"{detector.config.patch_mode}): TPR {calibration.tpr:.1%} on {calibration.n_unsafe} unsafe, "
        f"FPR {calibration.fpr:.1%} on {calibration.n_safe} safe (target {calibration.target_fpr:.1%})\n"
        f"wrote {out}; use it with: guardalign scan --guard {out} PATH...\n"
    )
    return 0


def register(commands: argparse._SubParsersAction) -> None:
    scan = commands.add_parser("scan", help="scan images for unsafe patches and mask them", description="Scan images (files or folders) and print a verdict per image.")
    scan.add_argument("paths", nargs="+", metavar="PATH", help="image files or folders of images")
    scan.add_argument("--json", action="store_true", help="print one JSON object per image (JSON lines)")
    scan.add_argument("--out", metavar="DIR", help="write <name>.masked.png and <name>.heatmap.png per image")
    corpus = scan.add_argument_group("corpus scale (docs/scale.md)")
    corpus.add_argument("--jsonl", metavar="FILE", help="stream one verdict row per image to FILE as it is produced (durable per chunk)")
    corpus.add_argument("--resume", action="store_true", help="continue --jsonl FILE: skip images already in it (same config only)")
    corpus.add_argument("--force", action="store_true", help="overwrite an existing --jsonl FILE and files that already exist in --out")
    corpus.add_argument("--chunk-size", type=int, default=64, metavar="N", help="images per detector.scan call (and per durable write; default 64)")
    corpus.add_argument(
        "--ray", nargs="?", const="local", metavar="ADDRESS",
        help="scan through Ray Data (extra 'ray'): a new local cluster, or ADDRESS (host:port, ray://host:port, auto); put paths before it",
    )
    corpus.add_argument("--actors", type=int, default=1, metavar="N", help="with --ray: actors, each with its own CLIP (default 1)")
    corpus.add_argument("--gpus-per-actor", type=float, metavar="G", help="with --ray: GPUs per actor (default: 1 when the cluster has GPUs)")
    corpus.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None, help="progress bar with images/s and ETA on stderr (default: when stderr is a terminal)")
    add_detector_options(scan)
    scan.set_defaults(func=run_scan)

    calibrate = commands.add_parser(
        "calibrate", help="pick the threshold τ from labelled folders", description="Choose τ for a target false-positive rate and write a config file."
    )
    calibrate.add_argument("--safe", required=True, metavar="DIR", help="folder of safe images")
    calibrate.add_argument("--unsafe", required=True, metavar="DIR", help="folder of unsafe images")
    calibrate.add_argument("--target-fpr", type=float, default=0.05, help="largest false-positive rate allowed on the safe images (default 0.05)")
    calibrate.add_argument("--out", default="guardalign.yaml", help="config file to write (YAML or JSON; default guardalign.yaml)")
    calibrate.add_argument("--force", action="store_true", help="overwrite --out if it exists")
    add_detector_options(calibrate)
    calibrate.set_defaults(func=run_calibrate)

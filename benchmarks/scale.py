"""In-process scan vs the Ray Data path, side by side in one run (issue 12: Ray's overhead ≥ 0.85×).

Same backbone (ViT-B-32, random weights saved once to a checkpoint every actor loads), same
config, same shared images: the in-process ``detector.scan`` in chunks of ``--batch-size``,
then :func:`guardalign_core.distributed.scan_dataset` with 1 actor (all CPUs) and 2 actors
(half each), then the in-process scan again to bracket drift from other load on the machine.

For each Ray run it reports the end-to-end rate (actor start and model load included: the
honest figure for a corpus scan) and its ratio to the in-process rate, plus the time a
one-image Ray scan takes (start-up: actors, model load, one image). Subtracting that start-up
from the end-to-end time is not a reliable steady-state rate (it over-estimates it: the
start-up of the big run overlaps its first batches), so it is not reported. Speed does not depend on weights.

Run: ``python benchmarks/scale.py --out scale.json`` (≈ 5 min on 2 CPU cores).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path


def _cpu_label() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()}, {os.cpu_count()} cores"
    except OSError:
        pass
    return f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores"


def _in_process(detector, files: list[str], batch: int) -> float:
    t0 = time.perf_counter()
    for start in range(0, len(files), batch):
        results = detector.scan(files[start : start + batch])
        assert all(r.status.value == "ok" for r in results), [r.error for r in results if r.error]
    return len(files) / (time.perf_counter() - t0)


def _ray_run(ray, config, files: list[str], batch: int, actors: int, cpus: float) -> dict:
    """One Ray scan of ``files``, after a one-image scan that measures start-up (actors, model load)."""
    from guardalign_core.distributed import scan_dataset

    def run(paths: list[str]) -> tuple[float, list[dict]]:
        ds = ray.data.from_items([{"path": p} for p in paths], override_num_blocks=max(1, len(paths) // batch))
        t0 = time.perf_counter()
        rows = scan_dataset(ds, config, batch_size=batch, concurrency=actors, num_cpus=cpus, num_gpus=0).take_all()
        return time.perf_counter() - t0, rows

    startup, _ = run(files[:1])
    total, rows = run(files)
    assert len(rows) == len(files) and all(r["status"] == "ok" for r in rows), [r["error"] for r in rows if r["error"]]
    return {"actors": actors, "cpus_per_actor": cpus, "startup_s": round(startup, 2), "total_s": round(total, 2),
            "end_to_end_img_s": len(files) / total}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", default=str(Path(__file__).resolve().parents[1].parent / "shared" / "data"))
    parser.add_argument("--model", default="ViT-B-32")
    parser.add_argument("--patch-mode", default="grid", choices=["grid", "tokens"])
    parser.add_argument("--batch-size", type=int, default=16, help="images per detector.scan call / per map_batches batch")
    parser.add_argument("--repeat", type=int, default=1, help="scan the image list this many times per run")
    parser.add_argument("--out", default=None, help="write the report as JSON here")
    args = parser.parse_args()

    from guardalign_core import GuardConfig, create_detector
    from guardalign_core.config import DetectorConfig
    from guardalign_core.testing.tiny_clip import save_tiny_clip_checkpoint

    files = sorted(str(p) for p in Path(args.images).rglob("*") if p.suffix.lower() in (".png", ".jpg")) * args.repeat
    if not files:
        parser.error(f"no images under {args.images}")
    ncpu = os.cpu_count() or 1
    tmp = Path(tempfile.mkdtemp(prefix="guardalign-scale-"))
    checkpoint = save_tiny_clip_checkpoint(tmp / f"{args.model}.pt", model=args.model)
    config = GuardConfig(detector=DetectorConfig(model=args.model, pretrained=str(checkpoint), patch_mode=args.patch_mode,
                                                 device="cpu", backend="torch", cache_dir=str(tmp), batch_size=64))
    report: dict = {"machine": _cpu_label(), "load_average_start": os.getloadavg(), "model": f"{args.model} (random weights)",
                    "patch_mode": args.patch_mode, "images": len(files), "batch_size": args.batch_size}

    detector = create_detector(config).load()
    detector.scan(files[:2])  # warm-up: text embeddings, allocator
    report["in_process_threads"] = __import__("torch").get_num_threads()
    first = _in_process(detector, files, args.batch_size)
    print(f"in-process: {first:.3f} img/s", flush=True)

    import ray

    ray.init(address="local", num_cpus=ncpu, include_dashboard=False, log_to_driver=False)
    ray.data.DataContext.get_current().enable_progress_bars = False
    runs = []
    try:
        for actors in (1, 2):
            cpus = max(1, ncpu // actors)
            threads = ray.get(ray.remote(num_cpus=cpus)(lambda: __import__("torch").get_num_threads()).remote())
            result = _ray_run(ray, config, files, args.batch_size, actors, cpus) | {"torch_threads_per_actor": threads}
            runs.append(result)
            print(f"ray {actors} actor(s): end-to-end {result['end_to_end_img_s']:.3f} img/s (one-image start-up {result['startup_s']} s)", flush=True)
    finally:
        ray.shutdown()
    second = _in_process(detector, files, args.batch_size)
    print(f"in-process again: {second:.3f} img/s", flush=True)
    baseline = (first + second) / 2
    report |= {"in_process_img_s": [first, second], "in_process_mean_img_s": baseline, "ray": runs,
               "load_average_end": os.getloadavg()}
    for run in runs:
        run["end_to_end_ratio"] = run["end_to_end_img_s"] / baseline
    print(f"\n{report['machine']}; {report['model']}, {args.patch_mode}, {len(files)} images, batch {args.batch_size}; "
          f"load average {report['load_average_start'][0]:.1f} → {report['load_average_end'][0]:.1f}")
    print("| path | img/s (end to end) | ratio to in-process | one-image start-up s |")
    print("|---|---|---|---|")
    print(f"| in-process ({report['in_process_threads']} threads; two runs) | {first:.3f} / {second:.3f} | 1.00× | – |")
    for run in runs:
        print(f"| Ray, {run['actors']} actor(s) × {run['cpus_per_actor']} CPU ({run['torch_threads_per_actor']} threads) | "
              f"{run['end_to_end_img_s']:.3f} | {run['end_to_end_ratio']:.2f}× | {run['startup_s']} |")
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())

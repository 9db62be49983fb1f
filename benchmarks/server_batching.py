"""Micro-batching in ``guardalign serve``: bursts of concurrent one-image requests, batched vs not, in one run.

What it does (loopback only, stops by itself):

1. starts the upstream imitation and two gateways through the real ``guardalign-serve``
   command, with the same guard file and the same settings except ``batching.enabled``
   (``true`` for one, ``false`` for the other);
2. sends bursts of ``--burst`` concurrent one-image chat requests (default 32, the issue's
   number), alternating between the two gateways burst by burst (so drifting machine load
   hits both alike), every image a distinct variant of the shared test image (one pixel
   changed: same scan cost, never a verdict from memory); a first burst per gateway warms it
   up (kernels, allocator, cuDNN autotuning) and is not counted;
3. reports, per gateway, the seconds per burst and images/s (median over the bursts), the
   ratio batched / unbatched, the mean detector batch size read from each gateway's
   ``/metrics`` (``guardalign_scan_batch_images``), and every HTTP status seen (anything but
   200 is an error: the exit status is then 1).

On a GPU pass a guard file whose detector has ``device: cuda`` (the issue's target: 32
concurrent one-image requests, batched, give at least 2x the throughput of unbatched scans);
on a CPU the same run tells what batching does there.

    python benchmarks/server_batching.py --guard gpu-guard.yaml --bursts 5 --out batching.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))
from server_load import IMAGE, ROOT, free_port, image_body, image_variants, png_data_url, stop, tiny_guard_file, wait_http  # noqa: E402


def mean_batch(metrics: str) -> float | None:
    """The mean of ``guardalign_scan_batch_images`` from a Prometheus text exposition."""
    found = {name: float(value) for name, value in re.findall(r"^guardalign_scan_batch_images_(sum|count) (\S+)$", metrics, re.M)}
    return round(found["sum"] / found["count"], 2) if found.get("count") else None


async def burst(client: httpx.AsyncClient, url: str, bodies: list[bytes]) -> tuple[float, dict[str, int]]:
    """All ``bodies`` at once; the seconds until the last answer and the statuses seen."""
    statuses: dict[str, int] = {}

    async def one(body: bytes) -> None:
        try:
            response = await client.post(url, content=body, headers={"content-type": "application/json"})
            status = str(response.status_code)
        except httpx.HTTPError as err:  # counted as an error, never hidden
            status = f"transport:{type(err).__name__}"
        statuses[status] = statuses.get(status, 0) + 1

    t0 = time.perf_counter()
    await asyncio.gather(*(one(body) for body in bodies))
    return time.perf_counter() - t0, statuses


async def measure(urls: dict[str, str], bodies: list[list[bytes]]) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Alternating bursts (the first per gateway is a warm-up, untimed); burst ``k`` of each gateway uses ``bodies[k]``."""
    seconds: dict[str, list[float]] = {name: [] for name in urls}
    statuses: dict[str, int] = {}
    names = list(urls)
    size = max(len(b) for b in bodies)
    limits = httpx.Limits(max_connections=2 * size, max_keepalive_connections=2 * size)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        for k, round_bodies in enumerate(bodies):
            for name in names if k % 2 == 0 else names[::-1]:
                elapsed, seen = await burst(client, urls[name], round_bodies)
                for status, count in seen.items():
                    statuses[status] = statuses.get(status, 0) + count
                if k > 0:
                    seconds[name].append(elapsed)
    return seconds, statuses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--guard", default=None, help="guard preset/file (default: the tiny random CLIP on the CPU)")
    parser.add_argument("--burst", type=int, default=32, help="concurrent one-image requests per burst")
    parser.add_argument("--bursts", type=int, default=5, help="timed bursts per gateway (after one warm-up burst)")
    parser.add_argument("--window-ms", type=float, default=3.0, help="the batched gateway's batching.window_ms")
    parser.add_argument("--max-images", type=int, default=64, help="the batched gateway's batching.max_images")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    tmp = Path(tempfile.mkdtemp(prefix="guardalign-batching-"))
    guard_file = args.guard or tiny_guard_file(tmp)
    # every request of every burst its own image: (bursts + warm-up) x burst, shared by both gateways
    # (each gateway has its own memory, so the same body sent to both is scanned by both)
    variants = image_variants(IMAGE.read_bytes(), (args.bursts + 1) * args.burst)
    bodies = [[json.dumps(image_body(png_data_url(v))).encode()
               for v in variants[k * args.burst:(k + 1) * args.burst]] for k in range(args.bursts + 1)]

    up_port = free_port()
    upstream_base = f"http://127.0.0.1:{up_port}/v1"
    procs = [subprocess.Popen([sys.executable, str(Path(__file__).with_name("server_load.py")), "--serve-imitation", str(up_port)], env=env)]
    ports: dict[str, int] = {}
    for name, enabled in (("batched", True), ("unbatched", False)):
        config = tmp / f"server-{name}.json"
        config.write_text(json.dumps({"upstream": {"base_url": upstream_base}, "guard": guard_file, "max_concurrency": 2 * args.burst,
                                      "batching": {"enabled": enabled, "window_ms": args.window_ms, "max_images": args.max_images}}))
        ports[name] = free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "guardalign_integrations.server.cli", "--config", str(config),
                                       "--port", str(ports[name]), "--log-level", "warning"], env=env))
    report: dict = {"image": IMAGE.name, "burst": args.burst, "bursts": args.bursts, "guard": args.guard or "tiny-random CLIP (cpu)",
                    "window_ms": args.window_ms, "max_images": args.max_images, "cpu_count": os.cpu_count(),
                    "load_average_before": os.getloadavg()}
    try:
        wait_http(f"http://127.0.0.1:{up_port}/v1/models", procs[0])
        for name, proc in zip(ports, procs[1:]):
            wait_http(f"http://127.0.0.1:{ports[name]}/readyz", proc, timeout=600)
        urls = {name: f"http://127.0.0.1:{port}/v1/chat/completions" for name, port in ports.items()}
        seconds, statuses = asyncio.run(measure(urls, bodies))
        for name, port in ports.items():
            median = statistics.median(seconds[name])
            report[name] = {"seconds_per_burst": [round(s, 3) for s in seconds[name]], "median_s": round(median, 3),
                            "images_per_s": round(args.burst / median, 2),
                            "mean_detector_batch": mean_batch(httpx.get(f"http://127.0.0.1:{port}/metrics").text)}
        report["throughput_ratio_batched_over_unbatched"] = round(report["unbatched"]["median_s"] / report["batched"]["median_s"], 3)
        report["statuses"] = statuses
    finally:
        stop(procs)
    report["load_average_after"] = os.getloadavg()
    ok = set(report.get("statuses", {})) == {"200"}
    report["ok"] = ok
    text = json.dumps(report, indent=2)
    print(text)  # noqa: T201 (a benchmark's report)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())

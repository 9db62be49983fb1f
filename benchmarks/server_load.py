"""Bounded load test and overhead measurements of ``guardalign serve`` (loopback only, stops by itself).

What it does, in one run:

1. starts the upstream imitation and the gateway (tiny CLIP, or ``--model``) as separate
   processes on 127.0.0.1 (the gateway through the real ``guardalign-serve`` command);
2. overhead, sequentially: text-only latency direct vs through the gateway, time to the first
   streamed chunk direct vs through the gateway, and a one-image request through the
   gateway vs the detector alone (same image, same CLIP, in this process);
3. load: ``--requests`` mixed requests (text, streamed text, one image) at ``--concurrency``,
   counting every status (anything but 200 and a deliberate 429 is an error), p50/p99
   latency and requests/s, and the gateway's resident memory before and after.

Prints a JSON report (and writes it with ``--out``). Exit status 1 if an error occurred or
memory grew by more than ``--max-growth-mb``.

    python benchmarks/server_load.py --requests 1000 --concurrency 32 --out load.json
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
IMAGE = ROOT.parent / "shared" / "data" / "benign" / "astronaut.png"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_imitation(port: int) -> None:
    import uvicorn

    from guardalign_integrations.server.testing import UpstreamRecord, create_upstream_imitation

    app, _ = create_upstream_imitation(UpstreamRecord(record_bodies=False))
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"{url} never became ready")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def text_body(stream: bool = False) -> dict:
    return {"model": "m", "stream": stream, "messages": [{"role": "user", "content": "Say hello."}]}


def image_body(url: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "What is this?"},
                                                                   {"type": "image_url", "image_url": {"url": url}}]}]}


def timed_sequential(client: httpx.Client, url: str, body: dict, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        response = client.post(url, json=body)
        response.raise_for_status()
        times.append((time.perf_counter() - t0) * 1000)
    return times


def first_chunk_ms(client: httpx.Client, url: str, n: int) -> list[float]:
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        with client.stream("POST", url, json=text_body(stream=True)) as response:
            chunks = response.iter_raw()
            next(chunks)
            times.append((time.perf_counter() - t0) * 1000)
            for _ in chunks:
                pass
    return times


async def load(url: str, image_url: str, total: int, concurrency: int) -> dict:
    statuses: dict[str, int] = {}
    latencies: list[float] = []
    kinds = ["text", "stream", "image", "text"]
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(total):
        queue.put_nowait(i)

    async def worker(client: httpx.AsyncClient) -> None:
        while True:
            try:
                i = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            kind = kinds[i % len(kinds)]
            t0 = time.perf_counter()
            try:
                if kind == "stream":
                    async with client.stream("POST", url, json=text_body(stream=True)) as response:
                        async for _ in response.aiter_raw():
                            pass
                    status: int | str = response.status_code
                else:
                    response = await client.post(url, json=image_body(image_url) if kind == "image" else text_body())
                    status = response.status_code
            except httpx.HTTPError as err:  # counted as an error, never hidden
                status = f"transport:{type(err).__name__}"
            latencies.append((time.perf_counter() - t0) * 1000)
            statuses[str(status)] = statuses.get(str(status), 0) + 1

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        t0 = time.perf_counter()
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
        elapsed = time.perf_counter() - t0
    return {"requests": total, "concurrency": concurrency, "statuses": statuses, "seconds": round(elapsed, 2),
            "requests_per_s": round(total / elapsed, 1), "p50_ms": round(pct(latencies, 0.5), 2), "p99_ms": round(pct(latencies, 0.99), 2)}


def image_variants(data: bytes, n: int) -> list[bytes]:
    """``n`` PNGs of the image, each with one pixel changed (distinct bytes, same cost to scan)."""
    import io

    from PIL import Image

    base = Image.open(io.BytesIO(data)).convert("RGB")
    out = []
    for i in range(n):
        image = base.copy()
        image.putpixel((i % image.width, 0), (i % 256, 0, 0))
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        out.append(buffer.getvalue())
    return out


def detector_alone_ms(guard_file: str, variants: list[bytes]) -> list[float]:
    """The core guard on the same images in this process: read, decode, scan, mask (no HTTP)."""
    from guardalign_core.guard import ContentImage, ImageGuard

    guard = ImageGuard(guard_file)
    guard.screen([ContentImage("warm-up", source=variants[0])], reuse=False)  # warm
    times = []
    for data in variants:
        t0 = time.perf_counter()
        guard.screen([ContentImage("image", source=data)], reuse=False)
        times.append((time.perf_counter() - t0) * 1000)
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sequential", type=int, default=200, help="requests per overhead measurement")
    parser.add_argument("--max-growth-mb", type=float, default=50.0)
    parser.add_argument("--guard", default=None, help="guard preset/file (default: the tiny random CLIP)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--serve-imitation", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_imitation is not None:
        serve_imitation(args.serve_imitation)
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    tmp = Path(tempfile.mkdtemp(prefix="guardalign-load-"))
    guard_file = args.guard
    if guard_file is None:
        from guardalign_core.config import GuardConfig, save_config
        from guardalign_core.testing.tiny_clip import save_tiny_clip_checkpoint, tiny_detector_config

        checkpoint = save_tiny_clip_checkpoint(tmp / "tiny-clip.pt")
        guard_file = str(save_config(GuardConfig(detector=tiny_detector_config(checkpoint, cache_dir=str(tmp))), tmp / "guard.yaml"))
    data = IMAGE.read_bytes()
    image_url = "data:image/png;base64," + base64.b64encode(data).decode()
    up_port, gw_port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, __file__, "--serve-imitation", str(up_port)], env=env)
    gateway = subprocess.Popen([sys.executable, "-m", "guardalign_integrations.server.cli", "--upstream", f"http://127.0.0.1:{up_port}/v1",
                                "--guard", guard_file, "--port", str(gw_port), "--log-level", "warning"], env=env)
    report: dict = {"image": IMAGE.name, "image_bytes": len(data), "guard": "tiny-random CLIP" if args.guard is None else args.guard}
    try:
        wait_http(f"http://127.0.0.1:{up_port}/v1/models", upstream)
        wait_http(f"http://127.0.0.1:{gw_port}/readyz", gateway)
        direct, via = f"http://127.0.0.1:{up_port}/v1/chat/completions", f"http://127.0.0.1:{gw_port}/v1/chat/completions"
        n = args.sequential
        with httpx.Client(timeout=60) as client:
            timed_sequential(client, via, text_body(), 20)  # warm both paths
            timed_sequential(client, direct, text_body(), 20)
            d, g = timed_sequential(client, direct, text_body(), n), timed_sequential(client, via, text_body(), n)
            report["text_only_ms"] = {"direct_median": round(statistics.median(d), 3), "gateway_median": round(statistics.median(g), 3),
                                      "overhead_median": round(statistics.median(g) - statistics.median(d), 3)}
            d, g = first_chunk_ms(client, direct, n), first_chunk_ms(client, via, n)
            report["first_chunk_ms"] = {"direct_median": round(statistics.median(d), 3), "gateway_median": round(statistics.median(g), 3),
                                        "overhead_median": round(statistics.median(g) - statistics.median(d), 3)}
            m = max(20, n // 5)
            variants = image_variants(data, m)  # distinct bytes: no verdict is reused from memory
            g = []
            for variant in variants:
                t0 = time.perf_counter()
                response = client.post(via, json=image_body("data:image/png;base64," + base64.b64encode(variant).decode()))
                response.raise_for_status()
                g.append((time.perf_counter() - t0) * 1000)
            decision = response.headers.get("x-guardalign-decision")
        alone = detector_alone_ms(guard_file, variants)
        report["one_image_ms"] = {"detector_alone_median": round(statistics.median(alone), 3), "gateway_median": round(statistics.median(g), 3),
                                  "ratio": round(statistics.median(g) / statistics.median(alone), 3), "decision": decision}
        # a first run settles the allocator (arenas, buffer pools); growth is measured over the second, identical run
        warm_run = asyncio.run(load(via, image_url, args.requests, args.concurrency))
        before = rss_mb(gateway.pid)
        report["load"] = asyncio.run(load(via, image_url, args.requests, args.concurrency))
        after = rss_mb(gateway.pid)
        report["warm_run_statuses"] = warm_run["statuses"]
        report["gateway_rss_mb"] = {"before": round(before, 1), "after": round(after, 1), "growth": round(after - before, 1)}
    finally:
        for proc in (gateway, upstream):
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    errors = {k: v for run in (report["warm_run_statuses"], report["load"]["statuses"]) for k, v in run.items() if k not in ("200", "429")}
    report["ok"] = not errors and report["gateway_rss_mb"]["growth"] <= args.max_growth_mb
    text = json.dumps(report, indent=2)
    print(text)  # noqa: T201 (a benchmark's report)
    if args.out:
        Path(args.out).write_text(text + "\n")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())

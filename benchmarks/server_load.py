"""Bounded load test and overhead measurements of ``guardalign serve`` (loopback only, stops by itself).

What it does, in one run:

1. starts the upstream imitation, the gateway (tiny CLIP, through the real
   ``guardalign-serve`` command) and a *floor proxy* (a trivial pass-through written with the
   gateway's own stack: uvicorn + uvloop + httptools, Starlette, one pooled
   ``httpx.AsyncClient``) as separate processes on 127.0.0.1;
2. overhead, sequentially and interleaved (each round calls direct, floor and gateway in a
   shuffled order, so drifting machine load hits all three alike): text-only latency and
   time to the first streamed chunk, reported as medians, the per-round paired differences
   (median and interquartile range); the floor is what one extra loopback HTTP hop costs with
   this stack, i.e. the least any gateway built on it can add. Then a one-image request: the
   gateway's added cost (gateway minus direct, same body; and gateway minus floor, i.e. beyond
   the extra hop that carries the 1 MB body) against the core guard alone on the same image
   (the same data URL, read, decode, scan, policy, memory, on a worker thread as the gateway
   runs it, same guard file; in a process of its own started and pinned like the gateway,
   timed from inside), interleaved image by image, every image a distinct variant (no
   verdict reuse);
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


def serve_floor(port: int, upstream: str) -> None:
    """The least a gateway on this stack can cost: forward the body as is, relay the answer (no checks at all)."""
    import uvicorn
    from starlette.applications import Starlette
    from starlette.background import BackgroundTask
    from starlette.requests import Request
    from starlette.responses import Response, StreamingResponse
    from starlette.routing import Route

    client = httpx.AsyncClient(base_url=upstream, timeout=60, limits=httpx.Limits(max_connections=256, max_keepalive_connections=256))

    async def chat(request: Request) -> Response:
        upstream_request = client.build_request("POST", "chat/completions", content=await request.body(),
                                                headers={"content-type": "application/json"})
        response = await client.send(upstream_request, stream=True)
        if response.headers.get("content-type", "").startswith("text/event-stream"):
            return StreamingResponse(response.aiter_raw(), media_type="text/event-stream", background=BackgroundTask(response.aclose))
        data = await response.aread()
        return Response(data, status_code=response.status_code, media_type="application/json")

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"])])
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", access_log=False)


def tiny_guard_file(tmp: Path) -> str:
    """A guard file on the tiny random CLIP (a checkpoint saved under ``tmp``): the default ``--guard``."""
    from guardalign_core.config import GuardConfig, save_config
    from guardalign_core.testing.tiny_clip import save_tiny_clip_checkpoint, tiny_detector_config

    checkpoint = save_tiny_clip_checkpoint(tmp / "tiny-clip.pt")
    return str(save_config(GuardConfig(detector=tiny_detector_config(checkpoint, cache_dir=str(tmp))), tmp / "guard.yaml"))


def stop(procs: list[subprocess.Popen]) -> None:
    """Terminate the servers, each given 30 s to drain, then killed."""
    for proc in procs:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()


def png_data_url(data: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(data).decode()


def wait_http(url: str, proc: subprocess.Popen, timeout: float = 180, method: str = "GET") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{url}: the process exited with {proc.returncode}")
        try:
            body = json.dumps(text_body()).encode() if method == "POST" else None
            if httpx.request(method, url, content=body, timeout=2).status_code == 200:
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


def request_ms(client: httpx.Client, url: str, content: bytes) -> float:
    """One whole request, in ms (the body pre-serialised, so only the HTTP exchange is timed)."""
    t0 = time.perf_counter()
    response = client.post(url, content=content, headers={"content-type": "application/json"})
    elapsed = (time.perf_counter() - t0) * 1000
    response.raise_for_status()
    return elapsed


def first_chunk_ms(client: httpx.Client, url: str, content: bytes) -> float:
    """Time to the first streamed chunk, in ms (the rest of the stream is read, untimed)."""
    t0 = time.perf_counter()
    with client.stream("POST", url, content=content, headers={"content-type": "application/json"}) as response:
        chunks = response.iter_raw()
        next(chunks)
        elapsed = (time.perf_counter() - t0) * 1000
        for _ in chunks:
            pass
    response.raise_for_status()
    return elapsed


def spread(values: list[float]) -> dict[str, float]:
    """Median and interquartile range, in ms."""
    return {"median": round(statistics.median(values), 3), "p25": round(pct(values, 0.25), 3), "p75": round(pct(values, 0.75), 3)}


def round_orders(names: list[str], rounds: int) -> list[list[str]]:
    """One order of ``names`` per round, shuffled (fixed seed): no target always follows the same neighbour."""
    import random

    shuffle = random.Random(0)
    orders = []
    for _ in range(rounds):
        order = list(names)
        shuffle.shuffle(order)
        orders.append(order)
    return orders


def interleaved(measure, client: httpx.Client, urls: dict[str, str], content: bytes, rounds: int) -> dict[str, list[float]]:
    """``rounds`` rounds, each timing every target once, in a shuffled order."""
    times: dict[str, list[float]] = {name: [] for name in urls}
    for order in round_orders(list(urls), rounds):
        for name in order:
            times[name].append(measure(client, urls[name], content))
    return times


def overhead_report(times: dict[str, list[float]]) -> dict:
    """Medians per target and the per-round differences to ``direct`` and to the floor (median, IQR)."""
    out: dict = {name: spread(values) for name, values in times.items()}
    for name in times:
        if name != "direct":
            out[f"{name}_minus_direct"] = spread([a - b for a, b in zip(times[name], times["direct"])])
        if name not in ("direct", "floor"):
            out[f"{name}_minus_floor"] = spread([a - b for a, b in zip(times[name], times["floor"])])
    return out


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


def serve_alone(guard_file: str, urls_file: str) -> None:
    """``--serve-alone``: the core guard alone, in a process of its own, timed from inside.

    The same work the gateway's screening step does for a one-image request: the same guard
    file, the image as the same data URL string (so the base64 decode counts on both sides),
    the verdict remembered as the gateway remembers it, on a worker thread as the gateway
    runs it (``run_in_threadpool``). It runs in its own process, started the way the gateway
    is and pinned with it (``--pin``), so both see the same cores and the same torch thread
    count: an in-client reference shared the client's core and measured 3,281 ms against
    the gateway's 1,504 ms for ViT-B-32. Protocol on stdin/stdout, one line each: an index
    into the URL list in, the milliseconds of that one screening out (``ready <threads>``
    first, after a warm-up scan).
    """
    from concurrent.futures import ThreadPoolExecutor

    import torch

    from guardalign_core.guard import ContentImage, ImageGuard

    urls = json.loads(Path(urls_file).read_text())
    guard = ImageGuard(guard_file)
    worker = ThreadPoolExecutor(1, thread_name_prefix="guard-alone")

    def scan(url: str) -> float:
        t0 = time.perf_counter()
        guard.screen([ContentImage("image", source=url, mime="image/png")])
        return (time.perf_counter() - t0) * 1000

    worker.submit(scan, urls[-1]).result()
    print(f"ready {torch.get_num_threads()}", flush=True)  # noqa: T201 (the protocol)
    for line in sys.stdin:
        print(f"{worker.submit(scan, urls[int(line)]).result():.6f}", flush=True)  # noqa: T201


class GuardAlone:
    """The client's end of ``--serve-alone``: ``alone(i)`` screens ``urls[i]`` in the reference process."""

    def __init__(self, guard_file: str, urls: list[str], env: dict[str, str], tmp: Path) -> None:
        urls_file = tmp / "alone-urls.json"
        urls_file.write_text(json.dumps(urls))
        self.proc = subprocess.Popen([sys.executable, __file__, "--serve-alone", guard_file, str(urls_file)], env=env,
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.torch_threads: int | None = None

    def wait_ready(self) -> None:
        line = self.proc.stdout.readline()
        if not line.startswith("ready"):
            raise RuntimeError(f"the guard-alone process did not start (exit {self.proc.poll()})")
        self.torch_threads = int(line.split()[1])

    def __call__(self, index: int) -> float:
        self.proc.stdin.write(f"{index}\n")
        self.proc.stdin.flush()
        return float(self.proc.stdout.readline())

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def pin(pid: int, cpu: int | None) -> None:
    """Keep process ``pid`` on one CPU (``--pin``): no migrations between the sequential hops."""
    if cpu is not None and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(pid, {cpu % (os.cpu_count() or 1)})


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--sequential", type=int, default=600, help="rounds of the interleaved text/stream overhead measurement")
    parser.add_argument("--image-rounds", type=int, default=40, help="rounds of the one-image measurement (distinct images)")
    parser.add_argument("--pin", action="store_true", help="pin the upstream to CPU 0 and the gateway, floor proxy, guard-alone reference and client to CPU 1 (one torch thread each)")
    parser.add_argument("--skip-load", action="store_true", help="only the overhead measurements")
    parser.add_argument("--baseline-tree", default=None, metavar="DIR",
                        help="also start the gateway of another checkout (e.g. `git archive` of an older commit) and measure it "
                        "in the same interleaved rounds, as 'baseline'")
    parser.add_argument("--max-growth-mb", type=float, default=50.0)
    parser.add_argument("--guard", default=None, help="guard preset/file (default: the tiny random CLIP)")
    parser.add_argument("--out", default=None)
    parser.add_argument("--serve-imitation", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--serve-floor", nargs=2, metavar=("PORT", "UPSTREAM"), default=None, help=argparse.SUPPRESS)
    parser.add_argument("--serve-alone", nargs=2, metavar=("GUARD", "URLS"), default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve_alone is not None:
        serve_alone(*args.serve_alone)
        return 0
    if args.serve_imitation is not None:
        serve_imitation(args.serve_imitation)
        return 0
    if args.serve_floor is not None:
        serve_floor(int(args.serve_floor[0]), args.serve_floor[1])
        return 0

    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    tmp = Path(tempfile.mkdtemp(prefix="guardalign-load-"))
    guard_file = args.guard or tiny_guard_file(tmp)
    data = IMAGE.read_bytes()
    image_url = png_data_url(data)
    # every one-image round uses distinct variants (one pixel changed: same scan cost, no verdict from memory)
    variant_urls = [png_data_url(v) for v in image_variants(data, 2 * args.image_rounds + 1)]
    # Pinned, the gateway and the guard-alone reference each get one core: one torch thread each, said
    # explicitly (torch sizes its pool from the CPUs it may use when imported, which raced the pinning:
    # measured, the reference at 2x the gateway's time for ViT-B-32 when it got two threads on one core)
    torch_env = {**env, "OMP_NUM_THREADS": "1"} if args.pin else env
    alone = GuardAlone(guard_file, variant_urls, torch_env, tmp)
    up_port, gw_port, floor_port = free_port(), free_port(), free_port()
    upstream_base = f"http://127.0.0.1:{up_port}/v1"
    upstream = subprocess.Popen([sys.executable, __file__, "--serve-imitation", str(up_port)], env=env)
    floor = subprocess.Popen([sys.executable, __file__, "--serve-floor", str(floor_port), upstream_base + "/"], env=env)
    gateway = subprocess.Popen([sys.executable, "-m", "guardalign_integrations.server.cli", "--upstream", upstream_base,
                                "--guard", guard_file, "--port", str(gw_port), "--log-level", "warning"], env=torch_env)
    servers = [gateway, floor, alone.proc, upstream]
    base_port = free_port()
    if args.baseline_tree:
        tree = str(Path(args.baseline_tree).resolve())
        servers.insert(0, subprocess.Popen([sys.executable, "-m", "guardalign_integrations.server.cli", "--upstream", upstream_base,
                                            "--guard", guard_file, "--port", str(base_port), "--log-level", "warning"],
                                           env={**torch_env, "PYTHONPATH": tree}, cwd=tree))
    import torch

    report: dict = {"image": IMAGE.name, "image_bytes": len(data), "guard": "tiny-random CLIP" if args.guard is None else args.guard,
                    "pinned": args.pin, "client_torch_threads": torch.get_num_threads(), "load_average_before": os.getloadavg()}
    if args.pin:
        pin(upstream.pid, 0)
        for proc in servers[:-1]:  # the gateway, the floor proxy, the guard alone (and the baseline gateway)
            pin(proc.pid, 1)
        pin(os.getpid(), 1)
    try:
        wait_http(f"http://127.0.0.1:{up_port}/v1/models", upstream)
        wait_http(f"http://127.0.0.1:{gw_port}/readyz", gateway)
        wait_http(f"http://127.0.0.1:{floor_port}/v1/chat/completions", floor, method="POST")
        alone.wait_ready()
        targets = [("direct", up_port), ("floor", floor_port), ("gateway", gw_port)]
        if args.baseline_tree:
            wait_http(f"http://127.0.0.1:{base_port}/readyz", servers[0])
            targets.append(("baseline", base_port))
        urls = {name: f"http://127.0.0.1:{port}/v1/chat/completions" for name, port in targets}
        text, stream = json.dumps(text_body()).encode(), json.dumps(text_body(stream=True)).encode()
        with httpx.Client(timeout=60) as client:
            interleaved(request_ms, client, urls, text, 50)  # warm every path (connections, caches)
            interleaved(first_chunk_ms, client, urls, stream, 50)
            report["text_only_ms"] = overhead_report(interleaved(request_ms, client, urls, text, args.sequential))
            report["first_chunk_ms"] = overhead_report(interleaved(first_chunk_ms, client, urls, stream, args.sequential))
            report["one_image_ms"] = one_image(client, urls, alone, variant_urls, args.image_rounds)
            report["guard_alone_torch_threads"] = alone.torch_threads
        report["load_average_after_overheads"] = os.getloadavg()
        if not args.skip_load:
            # a first run settles the allocator (arenas, buffer pools); growth is measured over the second, identical run
            warm_run = asyncio.run(load(urls["gateway"], image_url, args.requests, args.concurrency))
            before = rss_mb(gateway.pid)
            report["load"] = asyncio.run(load(urls["gateway"], image_url, args.requests, args.concurrency))
            after = rss_mb(gateway.pid)
            report["warm_run_statuses"] = warm_run["statuses"]
            report["gateway_rss_mb"] = {"before": round(before, 1), "after": round(after, 1), "growth": round(after - before, 1)}
    finally:
        alone.close()
        stop(servers)
    ok = True
    if not args.skip_load:
        errors = {k: v for run in (report["warm_run_statuses"], report["load"]["statuses"]) for k, v in run.items() if k not in ("200", "429")}
        ok = not errors and report["gateway_rss_mb"]["growth"] <= args.max_growth_mb
    report["ok"] = ok
    text_out = json.dumps(report, indent=2)
    print(text_out)  # noqa: T201 (a benchmark's report)
    if args.out:
        Path(args.out).write_text(text_out + "\n")
    return 0 if ok else 1


def one_image(client: httpx.Client, urls: dict[str, str], alone: GuardAlone, image_urls: list[str], rounds: int) -> dict:
    """One image: the gateway's added cost (gateway minus direct, same body) against the guard alone on that image.

    Round ``i`` sends ``image_urls[i]`` through every HTTP target and has the guard-alone
    process screen ``image_urls[rounds + i]`` (a variant of its own: its memory is separate
    anyway), in a shuffled order, pre-serialised bodies.
    """
    bodies = [json.dumps(image_body(url)).encode() for url in image_urls[:rounds]]
    request_ms(client, urls["gateway"], json.dumps(image_body(image_urls[-1])).encode())
    steps = {"direct": lambda i: request_ms(client, urls["direct"], bodies[i]),
             "floor": lambda i: request_ms(client, urls["floor"], bodies[i]),
             "gateway": lambda i: request_ms(client, urls["gateway"], bodies[i]),
             "guard_alone": lambda i: alone(rounds + i)}
    if "baseline" in urls:
        steps["baseline"] = lambda i: request_ms(client, urls["baseline"], bodies[i])
    times: dict[str, list[float]] = {name: [] for name in steps}
    for i, order in enumerate(round_orders(list(steps), rounds)):
        for name in order:
            times[name].append(steps[name](i))
    report: dict = {name: spread(values) for name, values in times.items()}
    report["floor_minus_direct"] = spread([f - d for f, d in zip(times["floor"], times["direct"])])
    for name in [n for n in times if n in ("gateway", "baseline")]:
        added = [g - d for g, d in zip(times[name], times["direct"])]
        report[f"{name}_minus_direct"] = spread(added)
        report[f"{name}_added_over_alone_ratio"] = spread([a / s for a, s in zip(added, times["guard_alone"])])
        # what the gateway adds beyond one more HTTP hop carrying the same body, against the guard's own work
        beyond = [g - f for g, f in zip(times[name], times["floor"])]
        report[f"{name}_minus_floor"] = spread(beyond)
        report[f"{name}_beyond_hop_over_alone_ratio"] = spread([b / s for b, s in zip(beyond, times["guard_alone"])])
    report["decision"] = client.post(urls["gateway"], content=bodies[0], headers={"content-type": "application/json"}).headers.get("x-guardalign-decision")
    return report


if __name__ == "__main__":
    raise SystemExit(main())

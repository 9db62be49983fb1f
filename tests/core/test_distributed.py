"""Screening a Ray Dataset: one row per input, error rows for bad images, verdicts equal to the in-process scan.

The first tests exercise the per-batch conversion (``scan_values``) in-process; the Ray tests
start one local cluster for the module (``num_cpus=2``) and skip cleanly without the extra.
"""

import io
import json
import os

import numpy as np
import pytest
from PIL import Image

from shared_images import shared_data
from guardalign_core import GuardConfig, PolicyConfig, create_detector
from guardalign_core.corpus import VERDICT_COLUMNS
from guardalign_core.distributed import scan_values
from guardalign_core.images import encode_png
from guardalign_core.memory import config_fingerprint
from guardalign_core.testing.tiny_clip import tiny_detector_config

ray_only = pytest.mark.skipif(
    not __import__("guardalign_core.distributed", fromlist=["is_ray_available"]).is_ray_available(),
    reason="ray[data] is not installed (extra 'ray')",
)


def _files(n=6):
    root = shared_data()
    return sorted(p for sub in ("benign", "figstep-tiny") for p in (root / sub).iterdir() if p.suffix.lower() in (".png", ".jpg"))[:: 62 // n][:n]


@pytest.fixture(scope="module")
def base_config(tiny_clip_checkpoint, embed_cache_dir):
    return GuardConfig(detector=tiny_detector_config(tiny_clip_checkpoint, cache_dir=str(embed_cache_dir), grid_size=2))


@pytest.fixture(scope="module")
def config(base_config):
    """A threshold between the shared images' scores, so some are masked and some allowed."""
    scores = sorted(r.score for r in create_detector(base_config).scan([str(f) for f in _files()]))
    threshold = (scores[len(scores) // 2 - 1] + scores[len(scores) // 2]) / 2
    return base_config.model_copy(update={"detector": base_config.detector.model_copy(update={"threshold": threshold})})


@pytest.fixture(scope="module")
def detector(config):
    return create_detector(config)


def _truncated_png():
    data = (shared_data("benign") / "coins.png").read_bytes()
    return data[: len(data) // 2]


def _assert_same_verdict(row, result):
    assert row["status"] == "ok" and result.status.value == "ok", row["error"]
    assert row["decision"] == result.decision.value
    assert np.allclose(row["scores"], result.scores, atol=1e-5)
    assert row["score"] == pytest.approx(result.score, abs=1e-5)
    boxes = [{k: v for k, v in b.model_dump().items() if k != "score"} for b in result.unsafe_boxes]
    assert [{k: v for k, v in b.items() if k != "score"} for b in row["boxes"]] == boxes
    assert np.allclose([b["score"] for b in row["boxes"]], [b.score for b in result.unsafe_boxes], atol=1e-5)


# -- per-batch conversion, no Ray ---------------------------------------------------------------
def test_bytes_paths_and_arrays_give_the_in_process_verdict(detector, config):
    files = _files(3)
    fingerprint = config_fingerprint(config, detector)
    array = np.asarray(Image.open(files[2]).convert("RGB"))
    rows = scan_values(detector, [files[0].read_bytes(), str(files[1]), array], [str(files[0]), str(files[1]), None], fingerprint=fingerprint)
    expected = detector.scan([str(files[0]), str(files[1]), Image.fromarray(array)])
    for row, result in zip(rows, expected):
        _assert_same_verdict(row, result)
        assert tuple(row) == VERDICT_COLUMNS and row["config_fingerprint"] == fingerprint
    assert rows[0]["source"] == str(files[0]) and rows[2]["source"] is None


def test_bad_rows_are_error_rows_not_failures(detector, tmp_path):
    bad = [_truncated_png(), os.urandom(256), None, b"", str(tmp_path / "secret-dir" / "missing.png"), str(tmp_path), np.zeros((4, 4), np.float32), 7]
    rows = scan_values(detector, bad, [None] * len(bad), fingerprint="f")
    assert len(rows) == len(bad)
    assert all(r["status"] == "error" and r["decision"] == "block" and r["error"] for r in rows)
    assert "truncated or damaged" in rows[0]["error"]


def test_an_unreadable_path_says_only_that_it_could_not_be_read(detector, tmp_path):
    """Probing: an error row must not tell whether a directory exists, or what a path is."""
    (tmp_path / "real-dir").mkdir()
    probes = [str(tmp_path / "real-dir" / "x.png"), str(tmp_path / "no-such-dir" / "x.png"), str(tmp_path / "real-dir")]
    rows = scan_values(detector, probes, probes, fingerprint="f")
    errors = [r["error"] for r in rows]
    assert errors[0] == errors[1] == "x.png: could not be read"
    assert errors[2] == "real-dir: could not be read"
    for row in rows:
        assert str(tmp_path) not in row["error"] and str(tmp_path) not in row["summary"]
        assert "no such" not in row["error"].lower() and "directory" not in row["error"].lower()


def test_other_schemes_are_refused_and_http_is_not_fetched_by_default(detector):
    rows = scan_values(detector, ["ftp://example.invalid/a.png", "http://127.0.0.1:9/a.png"], [None, None], fingerprint="f")
    assert "unsupported URI scheme 'ftp'" in rows[0]["error"]
    assert rows[1]["status"] == "error" and "remote" in rows[1]["error"].lower()


def test_sanitized_png_is_the_masked_image_and_absent_when_blocked(base_config):
    file = _files(1)[0]
    masker = create_detector(base_config, threshold=1e9)
    row = scan_values(masker, [file.read_bytes()], [str(file)], fingerprint="f", include_sanitized=True)[0]
    assert row["decision"] == "mask"
    assert row["sanitized_png"] == encode_png(masker.scan([file.read_bytes()])[0].masked_image)
    assert not np.asarray(Image.open(io.BytesIO(row["sanitized_png"]))).any()  # every patch masked: all black
    blocker = create_detector(base_config, threshold=1e9, policy=PolicyConfig(action="block"))
    blocked = scan_values(blocker, [file.read_bytes()], [str(file)], fingerprint="f", include_sanitized=True)[0]
    assert blocked["decision"] == "block" and blocked["sanitized_png"] is None


def test_ray_is_imported_only_when_used_and_its_absence_names_the_extra(monkeypatch):
    import subprocess
    import sys

    code = "import sys, guardalign_core.distributed; assert 'ray' not in sys.modules, 'ray imported at module import'"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    from guardalign_core.distributed import RayNotAvailableError, scan_dataset

    monkeypatch.setitem(sys.modules, "ray", None)  # as if not installed
    with pytest.raises(RayNotAvailableError, match=r"pip install 'guardalign\[ray\]'"):
        scan_dataset(object())


# -- Ray ----------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    ray = pytest.importorskip("ray")
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False,
             object_store_memory=128 * 1024 * 1024, _temp_dir=str(tmp_path_factory.mktemp("ray")))
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


def _corpus(tmp_path):
    """The shared images plus corrupt ones, as files."""
    folder = tmp_path / "corpus"
    folder.mkdir()
    good = _files()
    for f in good:
        (folder / f.name).write_bytes(f.read_bytes())
    (folder / "truncated.png").write_bytes(_truncated_png())
    (folder / "random.png").write_bytes(os.urandom(512))
    (folder / "empty.png").write_bytes(b"")
    return folder, good, {"truncated.png", "random.png", "empty.png"}


@ray_only
def test_dataset_of_files_gives_one_row_each_equal_to_in_process_and_parquet(ray_cluster, detector, config, tmp_path):
    import pyarrow.parquet as pq

    from guardalign_core.distributed import scan_dataset, verdict_schema

    folder, good, corrupt = _corpus(tmp_path)
    ds = ray_cluster.data.read_binary_files(str(folder), include_paths=True)
    verdicts = scan_dataset(ds, config, batch_size=4, concurrency=1, include_sanitized=True)
    verdicts.write_parquet(str(tmp_path / "verdicts"))
    table = pq.read_table(str(tmp_path / "verdicts"))
    assert table.schema.equals(verdict_schema(include_sanitized=True), check_metadata=False)
    rows = {os.path.basename(r["source"]): r for r in table.to_pylist()}
    assert table.num_rows == len(good) + len(corrupt) and set(rows) == {f.name for f in good} | corrupt
    for name in corrupt:
        assert rows[name]["status"] == "error" and rows[name]["decision"] == "block"
    expected = detector.scan([f.read_bytes() for f in good])
    assert {r.decision.value for r in expected} == {"allow", "mask"}  # both kinds are compared
    for f, result in zip(good, expected):
        _assert_same_verdict(rows[f.name], result)
        assert rows[f.name]["config_fingerprint"] == config_fingerprint(config, detector)
        masked = rows[f.name]["sanitized_png"]
        assert (masked == encode_png(result.masked_image)) if result.decision.value == "mask" else masked is None


@ray_only
def test_decoded_arrays_and_path_strings_with_missing_files(ray_cluster, detector, config, tmp_path):
    from guardalign_core.distributed import scan_dataset

    good = _files(4)
    images = ray_cluster.data.read_images([str(f) for f in good], mode="RGB", include_paths=True)
    by_path = {os.path.basename(r["source"]): r for r in scan_dataset(images, config, batch_size=3).take_all()}
    for f, result in zip(good, detector.scan([Image.open(f).convert("RGB") for f in good])):
        _assert_same_verdict(by_path[f.name], result)

    missing = str(tmp_path / "gone" / "missing.png")
    paths = ray_cluster.data.from_items([{"uri": str(good[0])}, {"uri": missing}, {"uri": None}])
    rows = {r["source"]: r for r in scan_dataset(paths, config, batch_size=2).take_all()}
    assert len(rows) == 3
    _assert_same_verdict(rows[str(good[0])], detector.scan([str(good[0])])[0])
    assert rows[missing]["error"] == "missing.png: could not be read"
    assert rows[None]["status"] == "error"


@ray_only
def test_cli_ray_writes_every_image_once_to_jsonl(ray_cluster, config, tmp_path, capsys):
    from guardalign_cli import main
    from guardalign_core.config import save_config

    folder, good, corrupt = _corpus(tmp_path)
    config_file = save_config(config, tmp_path / "config.json")
    out = tmp_path / "out.jsonl"
    assert main(["scan", str(folder), "--config", str(config_file), "--jsonl", str(out), "--ray", "--chunk-size", "4"]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert sorted(os.path.basename(r["source"]) for r in rows) == sorted([f.name for f in good] + list(corrupt))
    assert ray_cluster.is_initialized()  # a cluster the CLI did not start is left running
    capsys.readouterr()
    # the in-process scan computes the same config fingerprint as the actors: resuming without Ray skips every
    # verdict; the error rows (the corrupt files) are scanned again, and their new rows appended (the last row wins)
    assert main(["scan", str(folder), "--config", str(config_file), "--jsonl", str(out), "--resume"]) == 0
    assert f"{len(corrupt)} image(s) scanned, 0 unsafe, {len(corrupt)} error(s), {len(good)} already in out.jsonl" in capsys.readouterr().out
    assert len(out.read_text().splitlines()) == len(rows) + len(corrupt)


@ray_only
@pytest.mark.parametrize(("kwargs", "message"), [
    ({"concurrency": 0}, "concurrency: must be at least 1"),
    ({"concurrency": (3, 2)}, r"concurrency: a \(min, max\) tuple"),
    ({"batch_size": 0}, "batch_size: must be a positive int"),
    ({"num_gpus": -1}, "num_gpus: must be a non-negative number"),
    ({"config": {"detector": {"device": "cuda"}}, "num_gpus": 0}, "needs GPUs on the actors"),
    ({"config": {"detector": {"treshold": 0.3}}}, "treshold"),
])
def test_bad_arguments_are_refused_before_anything_runs(kwargs, message):
    from guardalign_core.distributed import scan_dataset

    with pytest.raises((ValueError, TypeError), match=message):
        scan_dataset(object(), **kwargs)  # never reaches the dataset


# -- object-store rows: the row names a bucket and key, never where requests go ------------------
@pytest.fixture
def decoy_server():
    """A loopback HTTP server that records every request (it must see none) and serves a PNG."""
    import http.server
    import threading

    body, hits = encode_png(Image.new("RGB", (32, 32), (0, 0, 255))), []

    class Handler(http.server.BaseHTTPRequestHandler):
        def _reply(self, send):
            hits.append((self.command, self.path, self.headers.get("Authorization", "")))
            self.send_response(200)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Content-Type", "image/png")
            self.send_header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")
            self.end_headers()
            if send:
                self.wfile.write(body)

        def do_HEAD(self):
            self._reply(False)

        def do_GET(self):
            self._reply(True)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield server.server_address[1], hits
    server.shutdown()
    server.server_close()


def _aws_env(monkeypatch):
    for name, value in {"AWS_ACCESS_KEY_ID": "AKIAVICTIM", "AWS_SECRET_ACCESS_KEY": "victimsecret",
                        "AWS_EC2_METADATA_DISABLED": "true", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)


def test_an_object_store_row_cannot_choose_the_endpoint_or_poison_the_bucket(detector, tmp_path, decoy_server, monkeypatch):
    """Attack: 's3://bucket/k?endpoint_override=HOST&scheme=http' sent signed requests to HOST and cached that
    file system for the bucket, so the corpus's genuine rows of the bucket were then read from HOST."""
    import pyarrow.fs as pafs

    _aws_env(monkeypatch)
    port, hits = decoy_server
    bucket = tmp_path / "stores" / "victim-bucket" / "real"
    bucket.mkdir(parents=True)
    genuine = _files(1)[0]
    (bucket / "unsafe.png").write_bytes(genuine.read_bytes())
    stores = {"s3": pafs.SubTreeFileSystem(str(tmp_path / "stores"), pafs.LocalFileSystem())}  # the caller's file system
    poison = [
        f"s3://victim-bucket/a.png?endpoint_override=127.0.0.1:{port}&scheme=http",
        f"gs://victim-bucket/a.png?endpoint_override=127.0.0.1:{port}&scheme=http",
        f"s3://victim-bucket/a.png#endpoint_override=127.0.0.1:{port}",
        f"s3://user:pw@victim-bucket/a.png",
        f"s3://victim-bucket:{port}/a.png",
        f"hdfs://127.0.0.1:{port}/a.png",
        f"hdfs://namenode/a.png",
    ]
    values = [f"http://127.0.0.1:{port}/x.png", *poison, "s3://victim-bucket/real/unsafe.png"]
    rows = scan_values(detector, values, values, fingerprint="f", filesystems=stores)
    assert hits == []  # nothing reached the decoy: no request, no signed header
    for row in rows[:-1]:
        assert row["status"] == "error" and row["decision"] == "block"
        assert "127.0.0.1" not in row["error"] and str(port) not in row["error"] and str(tmp_path) not in row["error"]
    assert "query, fragment, user or port" in rows[1]["error"] and "filesystems" in rows[-2]["error"]
    _assert_same_verdict(rows[-1], detector.scan([str(genuine)])[0])  # the genuine row: read through the caller's file system


def test_the_default_file_system_takes_nothing_from_the_row_and_is_cached_per_bucket(monkeypatch):
    from guardalign_core import distributed
    from guardalign_core.images import ImageLimits

    built = []
    monkeypatch.setattr(distributed, "_default_filesystem", lambda scheme, bucket, timeout: built.append((scheme, bucket, timeout)) or object())
    stores = distributed._ObjectStores()
    limits = ImageLimits(fetch_timeout_s=2.5)
    for uri in ("s3://b-one/x.png", "s3://b-one/y.png", "s3://b-two/x.png", "gs://b-one/x.png"):
        with pytest.raises(Exception):
            stores.read(uri, limits, "x.png")  # object() cannot open anything
    assert built == [("s3", "b-one", 2.5), ("s3", "b-two", 2.5), ("gs", "b-one", 2.5)]
    with pytest.raises(ValueError, match="filesystems: keys are URI schemes"):
        distributed._ObjectStores({"http": object()})


@pytest.mark.parametrize("scheme", ["gs", "s3"])
def test_an_unreachable_object_store_fails_the_row_within_the_fetch_timeout(base_config, monkeypatch, scheme):
    """Attack: one row pointing at an unreachable store stalled the scan for minutes (no timeout, GCS retries).
    The default file system is built with the fetch timeout; here it is aimed at a closed loopback port."""
    import socket
    import time

    import pyarrow.fs as pafs

    _aws_env(monkeypatch)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed = probe.getsockname()[1]  # closed once the block ends
    seen = {}
    real = {"gs": pafs.GcsFileSystem, "s3": pafs.S3FileSystem}[scheme]

    def aimed(**kwargs):
        seen.update(kwargs)
        return real(**kwargs, endpoint_override=f"127.0.0.1:{closed}", scheme="http", **({"anonymous": True} if scheme == "gs" else {}))

    monkeypatch.setattr(pafs, {"gs": "GcsFileSystem", "s3": "S3FileSystem"}[scheme], aimed)
    config = base_config.model_copy(update={"images": base_config.images.model_copy(update={"fetch_timeout_s": 1.0})})
    started = time.monotonic()
    uri = f"{scheme}://some-bucket/a.png"
    row = scan_values(create_detector(config), [uri], [uri], fingerprint="f")[0]
    assert row["status"] == "error" and row["error"] == "a.png: could not be read"
    elapsed = time.monotonic() - started
    assert elapsed < 30, elapsed
    assert seen and all(str(closed) not in str(v) for v in seen.values())
    if scheme == "gs":
        assert seen["retry_time_limit"].total_seconds() == 1
    else:
        assert seen["connect_timeout"] == seen["request_timeout"] == 1.0

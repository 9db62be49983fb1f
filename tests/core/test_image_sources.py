"""Images named by message content, as attacks: redirects off the allow-list, slow-drip
servers, local files that must not be revealed. A real HTTP server on 127.0.0.1 per test."""

from __future__ import annotations

import http.server
import io
import os
import threading
import time
from contextlib import contextmanager

import numpy as np
import pytest
from PIL import Image

from guardalign_core.errors import ImageError, InvalidImageSourceError, RemoteImageError
from guardalign_core.images import ImageLimits, load_image, read_content_bytes


def _png(size=(24, 16)) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(buffer, "PNG")
    return buffer.getvalue()


PNG = _png()


class _Handler(http.server.BaseHTTPRequestHandler):
    routes: dict = {}
    drip: dict = {"sent": 0, "total": 0, "closed_early": False}

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):  # noqa: N802 - http.server's API
        route = self.routes.get(self.path.split("?")[0])
        if route is None:
            self.send_error(404)
            return
        kind, value = route
        if kind == "redirect":
            self.send_response(302)
            self.send_header("Location", value)
            self.end_headers()
        elif kind == "body":
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(value)))
            self.end_headers()
            self.wfile.write(value)
        elif kind == "drip":  # a valid PNG, one byte every 50 ms
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.send_header("Content-Length", str(len(value)))
            self.end_headers()
            self.drip["total"] = len(value)
            try:
                for i in range(len(value)):
                    self.wfile.write(value[i : i + 1])
                    self.wfile.flush()
                    self.drip["sent"] = i + 1
                    time.sleep(0.05)
            except (BrokenPipeError, ConnectionResetError):
                self.drip["closed_early"] = True
        elif kind == "no-length":  # chunk-less body of unknown length, larger than allowed
            self.send_response(200)
            self.end_headers()
            self.wfile.write(value)


@contextmanager
def _server(routes: dict):
    handler = type("Handler", (_Handler,), {"routes": routes, "drip": {"sent": 0, "total": 0, "closed_early": False}})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    server.daemon_threads = True
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", handler
    finally:
        server.shutdown()
        server.server_close()


ALLOW = ImageLimits(allow_remote=True, allowed_hosts=("127.0.0.1",), fetch_timeout_s=5.0)


def test_allowed_host_and_allowed_redirect_fetch_the_image():
    with _server({"/img.png": ("body", PNG), "/moved": ("redirect", "/img.png")}) as (base, _):
        assert read_content_bytes(f"{base}/img.png", ALLOW) == PNG
        assert read_content_bytes(f"{base}/moved", ALLOW) == PNG
        assert load_image(f"{base}/moved", ALLOW).size == (24, 16)


def test_redirect_to_a_host_off_the_allow_list_is_refused():
    with _server({"/img.png": ("body", PNG)}) as (base, _):
        port = base.rsplit(":", 1)[1]
        # "localhost" is the same server, but not on the list: the list must hold on every hop
        routes = {"/evil": ("redirect", f"http://localhost:{port}/img.png")}
        with _server(routes) as (base2, _):
            with pytest.raises(RemoteImageError, match="redirect to a host not in ImageLimits.allowed_hosts") as info:
                read_content_bytes(f"{base2}/evil", ALLOW)
            assert "localhost" not in str(info.value)  # the redirect target is not echoed


@pytest.mark.parametrize("target", ["file:///etc/passwd", "ftp://127.0.0.1/img.png", "gopher://127.0.0.1/"])
def test_redirect_to_a_non_http_scheme_is_refused(target):
    with _server({"/evil": ("redirect", target)}) as (base, _):
        with pytest.raises(RemoteImageError, match="redirect to a non-http"):
            read_content_bytes(f"{base}/evil", ALLOW)


def test_redirect_loops_stop_at_max_redirects():
    with _server({"/a": ("redirect", "/b"), "/b": ("redirect", "/a")}) as (base, _):
        with pytest.raises(RemoteImageError, match="max_redirects"):
            read_content_bytes(f"{base}/a", ALLOW)


def test_a_slow_drip_body_is_cut_off_at_the_deadline():
    body = PNG[:200]  # 200 bytes at 20 bytes/s: 10 s, each read well within any per-read timeout
    limits = ALLOW.model_copy(update={"fetch_timeout_s": 1.0})
    with _server({"/drip": ("drip", body)}) as (base, handler):
        with pytest.raises(RemoteImageError, match="fetch_timeout_s|deadline"):
            read_content_bytes(f"{base}/drip", limits)
        for _ in range(100):  # the server notices the closed connection on its next write
            if handler.drip["closed_early"]:
                break
            time.sleep(0.05)
        assert handler.drip["closed_early"] and handler.drip["sent"] < handler.drip["total"]


def test_a_body_over_max_bytes_is_refused_with_or_without_content_length():
    big = PNG + bytes(5000)
    limits = ALLOW.model_copy(update={"max_bytes": 2000})
    with _server({"/big": ("body", big), "/stream": ("no-length", big)}) as (base, _):
        for path in ("/big", "/stream"):
            with pytest.raises(RemoteImageError, match="max_bytes"):
                read_content_bytes(f"{base}{path}", limits)


def test_remote_fetching_stays_off_by_default_and_hosts_must_be_listed():
    with _server({"/img.png": ("body", PNG)}) as (base, _):
        with pytest.raises(RemoteImageError, match="not fetched"):
            read_content_bytes(f"{base}/img.png")
        with pytest.raises(RemoteImageError, match="allowed_hosts"):
            read_content_bytes(f"{base}/img.png", ImageLimits(allow_remote=True, allowed_hosts=("example.org",)))


def test_allowed_hosts_must_be_bare_host_names():
    with pytest.raises(ValueError, match="allowed_hosts"):
        ImageLimits(allowed_hosts=("http://example.org",))
    assert ImageLimits(allowed_hosts=("Example.ORG.", "::1")).allowed_hosts == ("example.org", "::1")


def test_https_to_http_downgrade_is_refused():
    from guardalign_core._fetch import _Fetch

    job = _Fetch("https://127.0.0.1/a", ALLOW, None)
    with pytest.raises(RemoteImageError, match="https to plain http"):
        job._next_hop("https://127.0.0.1/a", "http://127.0.0.1/b")


# -- local files named by message content ---------------------------------------------------------

@pytest.mark.parametrize("allow", [False, True])
@pytest.mark.parametrize("form", ["path", "file URL", "PathLike"])
def test_local_file_errors_reveal_nothing_about_the_file_system(tmp_path, allow, form):
    """Missing, unreadable, too large, not an image, a directory, a FIFO: one and the same answer."""
    (tmp_path / "secret.txt").write_text("password=hunter2\n")
    (tmp_path / "big.png").write_bytes(PNG + bytes(10_000))
    (tmp_path / "a_directory.png").mkdir()
    os.mkfifo(tmp_path / "pipe.png")  # opening it for reading would block forever
    limits = ImageLimits(allow_local_files=allow, max_bytes=2000)
    answers = set()
    for name in ("missing.png", "secret.txt", "big.png", "a_directory.png", "pipe.png"):
        path = tmp_path / name
        probe = {"path": str(path), "file URL": f"file://{path}", "PathLike": path}[form]
        with pytest.raises(ImageError) as info:
            read_content_bytes(probe, limits, source="image 1")
        text = str(info.value)
        assert str(tmp_path) not in text and name not in text and str(len(PNG) + 10_000) not in text, text
        answers.add((type(info.value), text))
    assert len(answers) == 1, answers


def test_local_image_files_are_read_only_when_allowed(tmp_path):
    path = tmp_path / "ok.png"
    path.write_bytes(PNG)
    with pytest.raises(InvalidImageSourceError, match="allow_local_files"):
        read_content_bytes(str(path))
    assert read_content_bytes(str(path), ImageLimits(allow_local_files=True)) == PNG
    assert read_content_bytes(f"file://{path}", ImageLimits(allow_local_files=True)) == PNG
    assert read_content_bytes(path, ImageLimits(allow_local_files=True)) == PNG


def test_callers_own_paths_name_neither_the_path_nor_the_size(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(PNG + bytes(10_000))
    for probe in (str(tmp_path / "missing.png"), big):
        with pytest.raises(ImageError) as info:
            load_image(probe, ImageLimits(max_bytes=2000))
        assert str(tmp_path) not in str(info.value) and str(len(PNG) + 10_000) not in str(info.value)


def _canonical_cases():
    import base64 as b64

    data = b"\x89PNG\r\n\x1a\n" + bytes(range(256)) + b"\xfb\xff"  # 266 bytes: padded, with '+' and '/' in its base64
    std = b64.b64encode(data).decode()
    assert "=" in std and ("+" in std or "/" in std)
    url_safe = b64.urlsafe_b64encode(data).decode()
    return data, [
        (data, True),
        (std, True),
        ("data:image/png;base64," + std, True),
        (url_safe, False),
        ("data:image/png;base64," + url_safe, False),
        (std.rstrip("="), False),
        ("\n".join(std[i:i + 76] for i in range(0, len(std), 76)), False),
        (" " + std, False),
        ("data:image/png;base64," + std + "\n", False),
        ("data:image/png;name=x.png;base64," + std, False),
        ("data:image/png," + "".join(f"%{b:02x}" for b in data), False),
    ]


@pytest.mark.parametrize("case", range(11))
def test_read_content_says_whether_a_source_spells_its_bytes_canonically(case):
    # Only a canonical spelling may be forwarded as it came: decoders disagree on the rest.
    from guardalign_core.images import read_content

    data, cases = _canonical_cases()
    source, canonical = cases[case]
    assert read_content(source) == (data, canonical)

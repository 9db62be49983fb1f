"""What the gateway forwards as it came, and what it rewrites: checked on the wire, decoded as upstreams decode.

The attacks: a payload the guard reads one way and a lenient upstream decoder another (a
JPEG polyglot behind a URL-safe spelling), and a remembered sanitised JPEG relabelled.
"""

from __future__ import annotations

import base64

import httpx
import pytest
from base64_polyglot import jpeg, pixel, polyglot

from server_helpers import ALL_UNSAFE, NONE_UNSAFE, data_url, jpeg_bytes, make_guard, png_bytes, run_gateway  # noqa: F401


def image_request(url: str) -> dict:
    return {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "What colour?"},
                                                                   {"type": "image_url", "image_url": {"url": url}}]}]}


def forwarded_url(gw) -> str:
    """The one image URL of the last forwarded request (a safety system message may precede the user's)."""
    parts = [part for message in gw.forwarded()[-1]["body"]["messages"] if isinstance(message["content"], list)
             for part in message["content"] if part.get("type") == "image_url"]
    assert len(parts) == 1
    return parts[0]["image_url"]["url"]


@pytest.fixture(scope="module")
def allowing(make_guard):
    with run_gateway(make_guard(NONE_UNSAFE)) as gw:
        yield gw


def test_a_url_safe_polyglot_reaches_a_lenient_decoder_as_the_image_that_was_checked(allowing):
    payload, guard_reads, lenient_reads = polyglot()
    assert pixel(guard_reads) != pixel(lenient_reads)  # the attack: two images behind one payload
    response = httpx.post(allowing.base_url + "/chat/completions", json=image_request("data:image/jpeg;base64," + payload), timeout=60)
    assert response.status_code == 200 and response.headers["x-guardalign-decision"] == "allow"
    sent = forwarded_url(allowing)
    assert sent != "data:image/jpeg;base64," + payload  # not forwarded as it came
    on_the_wire = sent.split(",", 1)[1]
    # every decoder, strict or lenient, now reads the bytes the guard checked
    assert base64.b64decode(on_the_wire) == base64.b64decode(on_the_wire, validate=True) == guard_reads


@pytest.mark.parametrize("spell", [
    lambda b64: b64.rstrip("="),  # padding dropped
    lambda b64: "\n".join(b64[i:i + 76] for i in range(0, len(b64), 76)),  # MIME line breaks
    lambda b64: " " + b64,  # whitespace around it
])
def test_other_lenient_spellings_are_rewritten_canonically(allowing, spell):
    data = jpeg((30, 60, 90))
    data += b"\0" * ((1 - len(data)) % 3)  # bytes after the JPEG's end: a length whose base64 is padded
    b64 = base64.b64encode(data).decode()
    assert b64.endswith("==")
    url = "data:image/jpeg;base64," + spell(b64)
    assert httpx.post(allowing.base_url + "/chat/completions", json=image_request(url), timeout=60).status_code == 200
    assert forwarded_url(allowing) == "data:image/jpeg;base64," + b64


def test_a_canonical_data_url_still_goes_byte_identical(allowing):
    url = data_url(jpeg((90, 60, 30)), "image/jpeg")
    assert httpx.post(allowing.base_url + "/chat/completions", json=image_request(url), timeout=60).status_code == 200
    assert forwarded_url(allowing) == url


def test_a_remembered_masked_jpeg_is_labelled_as_the_jpeg_it_is(make_guard, jpeg_bytes):
    # The sanitised re-encode keeps the input's format; the guard's memory used to label it image/png.
    with run_gateway(make_guard(ALL_UNSAFE)) as gw:
        url = data_url(jpeg_bytes, "image/jpeg")
        sent = []
        for _ in range(2):  # the second time from memory
            response = httpx.post(gw.base_url + "/chat/completions", json=image_request(url), timeout=60)
            assert response.status_code == 200 and response.headers["x-guardalign-decision"] == "mask"
            sent.append(forwarded_url(gw))
        assert sent[0] == sent[1]
        header, payload = sent[1].split(",", 1)
        assert header == "data:image/jpeg;base64" and base64.b64decode(payload)[:2] == b"\xff\xd8"


def _image_host(served: list[bytes]):
    """A loopback HTTP server answering every GET with the next of ``served`` (the last one repeated)."""
    import http.server
    import threading

    class Handler(http.server.BaseHTTPRequestHandler):
        hits = 0

        def do_GET(self):  # noqa: N802 (http.server's name)
            body = served[min(Handler.hits, len(served) - 1)]
            Handler.hits += 1
            self.send_response(200)
            self.send_header("content-type", "image/png")
            self.send_header("content-length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, Handler


def test_an_allowed_remote_image_goes_upstream_as_the_bytes_that_were_checked(make_guard, png_bytes):
    # the URL is never forwarded: it could serve the model something else after the check
    server, handler = _image_host([png_bytes, jpeg((250, 0, 0))])
    try:
        url = f"http://127.0.0.1:{server.server_address[1]}/cat.png"
        limits = {"allow_remote": True, "allowed_hosts": ("127.0.0.1",), "fetch_timeout_s": 10}
        with run_gateway(make_guard(NONE_UNSAFE, limits=limits)) as gw:
            response = httpx.post(gw.base_url + "/chat/completions", json=image_request(url), timeout=60)
            assert response.status_code == 200 and response.headers["x-guardalign-decision"] == "allow"
            assert handler.hits == 1
            assert forwarded_url(gw) == data_url(png_bytes, "image/png")
        with run_gateway(make_guard(NONE_UNSAFE)) as gw:  # the default: remote URLs are not fetched
            response = httpx.post(gw.base_url + "/chat/completions", json=image_request(url), timeout=60)
            assert response.headers["x-guardalign-decision"].startswith("block") and gw.forwarded() == []
            assert handler.hits == 1
    finally:
        server.shutdown()
        server.server_close()

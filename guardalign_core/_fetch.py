"""Remote image fetching: allow-listed hosts on every hop, one deadline for the whole download.

``urllib.request.urlopen(url, timeout=t)`` bounds each socket operation, not the download:
a server that drips one byte a second never trips it, and its redirect handler follows a
``Location`` to any host. Here every request (the first and each redirect) must be http(s),
must not downgrade https to http, and must name a host in ``ImageLimits.allowed_hosts``;
and ``fetch_timeout_s`` is a deadline for connect, redirects, headers and body together,
enforced by a watchdog that closes the socket when it passes (which also unblocks a read
stuck in a slow drip, or a header line that never ends).
"""

from __future__ import annotations

import http.client
import socket
import ssl
import threading
import time
import urllib.parse

from ._limits import ImageLimits
from .errors import RemoteImageError

_REDIRECTS = (301, 302, 303, 307, 308)
_CHUNK = 64 * 1024


def host_allowed(host: str | None, limits: ImageLimits) -> bool:
    """Whether ``host`` (from a parsed URL) is on ``limits.allowed_hosts`` (case-insensitive)."""
    return bool(host) and host.lower().rstrip(".") in limits.allowed_hosts


def fetch_url(url: str, limits: ImageLimits, source: str | None = None) -> bytes:
    """Download an image over http(s) under ``limits``, or raise :class:`RemoteImageError`.

    Args:
        url: an ``http://`` or ``https://`` URL.
        limits: ``allow_remote``, ``allowed_hosts``, ``max_redirects``, ``fetch_timeout_s``
            and ``max_bytes`` apply.
        source: a short label for error messages.

    Returns:
        The response body (at most ``limits.max_bytes`` bytes).

    Raises:
        RemoteImageError: fetching is off; the host (or a redirect's host or scheme) is not
            allowed; the deadline passed; the server answered other than 200; the body is
            over ``max_bytes``; the connection failed.
    """
    if not limits.allow_remote:
        raise RemoteImageError(
            "remote URLs are not fetched; set ImageLimits(allow_remote=True, allowed_hosts=(...)) or pass the image bytes",
            source=source,
        )
    parsed = urllib.parse.urlsplit(url)
    if parsed.scheme.lower() not in ("http", "https"):
        raise RemoteImageError("only http(s) URLs are fetched", source=source)
    if not host_allowed(parsed.hostname, limits):
        host = (parsed.hostname or "")[:100]
        raise RemoteImageError(f"host {host!r} is not in ImageLimits.allowed_hosts", source=source)
    job = _Fetch(url, limits, source)
    worker = threading.Thread(target=job.run, name="guardalign-fetch", daemon=True)
    worker.start()
    worker.join(limits.fetch_timeout_s)
    if worker.is_alive():
        job.abort()
        worker.join(1.0)  # the closed socket makes a blocked read return at once
        raise RemoteImageError(
            f"the download did not finish within {limits.fetch_timeout_s:g} s (ImageLimits.fetch_timeout_s)", source=source
        )
    if job.error is not None:
        raise job.error
    if job.result is None:  # run() sets one of the two; never forward "nothing" as an image
        raise RemoteImageError("fetch failed", source=source)
    return job.result


class _Fetch:
    """One download, run in a worker thread so that the caller's deadline is absolute."""

    def __init__(self, url: str, limits: ImageLimits, source: str | None) -> None:
        self.url, self.limits, self.source = url, limits, source
        self.deadline = time.monotonic() + limits.fetch_timeout_s
        self.result: bytes | None = None
        self.error: RemoteImageError | None = None
        self._conn: http.client.HTTPConnection | None = None
        self._sock: socket.socket | None = None  # kept: http.client drops conn.sock once the response owns it
        self._aborted = threading.Event()
        self._lock = threading.Lock()

    def abort(self) -> None:
        self._aborted.set()
        with self._lock:
            conn, sock = self._conn, self._sock
        if sock is not None:
            try:
                sock.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        if conn is not None:
            conn.close()

    def _fail(self, message: str) -> RemoteImageError:
        return RemoteImageError(message, source=self.source)

    def run(self) -> None:
        try:
            self.result = self._download()
        except RemoteImageError as err:
            self.error = err
        except (OSError, http.client.HTTPException, ssl.SSLError, ValueError) as err:
            if self._aborted.is_set() or isinstance(err, TimeoutError) or time.monotonic() >= self.deadline:
                self.error = self._fail(
                    f"the download did not finish within {self.limits.fetch_timeout_s:g} s (ImageLimits.fetch_timeout_s)"
                )
            else:
                self.error = self._fail(f"fetch failed ({type(err).__name__})")
        finally:
            with self._lock:
                if self._conn is not None:
                    self._conn.close()

    def _remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0 or self._aborted.is_set():
            raise self._fail("the download was cut off at the deadline")
        return left

    def _download(self) -> bytes:
        url = self.url
        for _hop in range(self.limits.max_redirects + 1):
            parts = urllib.parse.urlsplit(url)
            conn_class = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
            conn = conn_class(parts.hostname, parts.port, timeout=self._remaining())
            with self._lock:
                if self._aborted.is_set():
                    raise self._fail("the download was cut off at the deadline")
                self._conn = conn
            conn.connect()
            with self._lock:
                self._sock = conn.sock
            if self._aborted.is_set():
                self.abort()
            path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
            conn.request("GET", path, headers={"Accept": "image/*", "User-Agent": "guardalign"})
            self._sock.settimeout(self._remaining())
            response = conn.getresponse()
            if response.status in _REDIRECTS:
                url = self._next_hop(url, response.getheader("Location"))
                conn.close()
                continue
            if response.status != 200:
                raise self._fail(f"the server answered HTTP {response.status}")
            return self._read_body(response)
        raise self._fail(f"more than {self.limits.max_redirects} redirects (ImageLimits.max_redirects)")

    def _next_hop(self, current: str, location: str | None) -> str:
        if not location:
            raise self._fail("a redirect without a Location")
        target = urllib.parse.urljoin(current, location.strip())
        parts = urllib.parse.urlsplit(target)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise self._fail("a redirect to a non-http(s) URL was refused")
        if urllib.parse.urlsplit(current).scheme == "https" and scheme == "http":
            raise self._fail("a redirect from https to plain http was refused")
        if not host_allowed(parts.hostname, self.limits):
            raise self._fail("a redirect to a host not in ImageLimits.allowed_hosts was refused")
        return target

    def _read_body(self, response: http.client.HTTPResponse) -> bytes:
        max_bytes = self.limits.max_bytes
        declared = response.getheader("Content-Length")
        if declared is not None and declared.strip().isdigit() and int(declared) > max_bytes:
            raise self._fail(f"the response is over ImageLimits.max_bytes ({max_bytes} bytes)")
        chunks: list[bytes] = []
        total = 0
        while True:
            self._sock.settimeout(self._remaining())
            chunk = response.read1(_CHUNK)
            if not chunk:
                break
            total += len(chunk)
            if total > max_bytes:
                raise self._fail(f"the response is over ImageLimits.max_bytes ({max_bytes} bytes)")
            chunks.append(chunk)
        self._remaining()  # a body that ended exactly at the deadline is still late
        return b"".join(chunks)

"""The upstream OpenAI-compatible API: forward a screened request, pass the answer back unchanged.

What: one shared ``httpx.AsyncClient`` with connect/read timeouts and a connection limit.
Non-streaming answers are read whole and returned with the upstream's status; streamed
answers (SSE) are passed through chunk by chunk as they arrive (no re-chunking, no
buffering). Answers are asked for uncompressed (``accept-encoding: identity``) and relayed
decoded, without the upstream's ``content-encoding``: a compressing upstream still gives the
client a readable body. Transport failures become 502 (unreachable, broken) or 504
(timed out) OpenAI-style errors; an upstream's own error answer is passed through as sent.

Why: the gateway adds no latency it does not need, and clients keep their SDK's error
handling. Closing a stream (client gone) closes the upstream response, which cancels the
upstream's work.
"""

from __future__ import annotations

from typing import Any, AsyncIterator, Mapping

import httpx

from ._errors import ServerError
from .config import UpstreamConfig

_REQUEST_HEADERS = ("accept", "openai-organization", "openai-project", "openai-beta", "user-agent")
_RESPONSE_HEADERS = frozenset(("content-type", "x-request-id", "openai-processing-ms", "openai-version", "retry-after"))


class UpstreamClient:
    """The gateway's client of one upstream API."""

    def __init__(self, config: UpstreamConfig, *, transport: httpx.AsyncBaseTransport | None = None) -> None:
        self.config = config
        timeout = httpx.Timeout(connect=config.connect_timeout_s, read=config.read_timeout_s, write=config.read_timeout_s, pool=config.connect_timeout_s)
        limits = httpx.Limits(max_connections=config.max_connections, max_keepalive_connections=config.max_connections)
        self.client = httpx.AsyncClient(base_url=config.base_url + "/", timeout=timeout, limits=limits, transport=transport, trust_env=False)
        # absolute URLs parsed once: httpx parses a relative URL against base_url on every request (~100 µs)
        self._urls: dict[str, httpx.URL] = {}
        self._server_auth = f"Bearer {config.api_key}" if config.key_mode == "server" and config.api_key else None

    def url(self, path: str) -> httpx.URL:
        """The absolute upstream URL of ``path`` (relative to ``base_url``), parsed once."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls.setdefault(path, httpx.URL(self.config.base_url + "/" + path.lstrip("/")))
        return url

    async def aclose(self) -> None:
        await self.client.aclose()

    def headers(self, incoming: Mapping[str, str]) -> dict[str, str]:
        """The headers sent upstream: a few pass-through ones and the key chosen by ``key_mode``."""
        out = {k: v for k in _REQUEST_HEADERS if (v := incoming.get(k)) is not None}
        # uncompressed answers: the gateway relays and rewrites bodies, and sends no content-encoding of its own
        out["accept-encoding"] = "identity"
        if self.config.key_mode == "passthrough":
            auth = incoming.get("authorization")
            if auth is not None:
                out["authorization"] = auth
        elif self._server_auth is not None:
            out["authorization"] = self._server_auth
        return out

    async def send(self, method: str, path: str, *, headers: dict[str, str], content: bytes | None = None) -> httpx.Response:
        """Send a request and return the response with its body not yet read (``stream=True``).

        Raises:
            ServerError: 504 on a connect/read timeout, 502 when unreachable or broken.
        """
        if content is not None:
            headers = {**headers, "content-type": "application/json"}
        request = self.client.build_request(method, self.url(path), headers=headers, content=content)
        try:
            return await self.client.send(request, stream=True)
        except httpx.TimeoutException:
            raise ServerError(504, "the upstream model API did not answer in time", "upstream_timeout") from None
        except httpx.HTTPError as err:
            raise ServerError(502, f"the upstream model API could not be reached ({type(err).__name__})", "upstream_unreachable") from None

    async def read(self, response: httpx.Response) -> bytes:
        """The whole body of a response from :meth:`send`, at most ``max_response_bytes`` decoded (closed afterwards).

        Raises:
            ServerError: 502 ``upstream_response_too_large`` over the limit (read no further),
                504 on a timeout, 502 when the upstream breaks off.
        """
        limit = self.config.max_response_bytes
        chunks: list[bytes] = []
        total = 0
        try:
            async for chunk in response.aiter_bytes():  # decoded as it arrives: a gzip bomb stops at the limit
                total += len(chunk)
                if total > limit:
                    raise ServerError(502, f"the upstream's answer is over upstream.max_response_bytes={limit}; not relayed",
                                      "upstream_response_too_large")
                chunks.append(chunk)
            return b"".join(chunks)
        except httpx.TimeoutException:
            raise ServerError(504, "the upstream model API did not finish its answer in time", "upstream_timeout") from None
        except httpx.HTTPError as err:
            raise ServerError(502, f"the upstream model API broke off its answer ({type(err).__name__})", "upstream_unreachable") from None
        finally:
            await response.aclose()

    @staticmethod
    async def relay(response: httpx.Response) -> AsyncIterator[bytes]:
        """The body chunks as they arrive; the upstream response is closed however the relay ends.

        A failure mid-stream cannot change the status any more: the stream ends with an SSE
        error event in OpenAI's shape, which the SDKs raise.
        """
        import json

        try:
            # decoded bytes: an upstream that compresses anyway (identity was asked for) is relayed
            # uncompressed, as the dropped content-encoding header says; identity chunks pass as they come
            async for chunk in response.aiter_bytes():
                yield chunk
        except httpx.HTTPError as err:
            code = "upstream_timeout" if isinstance(err, httpx.TimeoutException) else "upstream_unreachable"
            event = {"error": {"message": f"the upstream stream broke off ({type(err).__name__})", "type": "api_error", "param": None, "code": code}}
            yield f"data: {json.dumps(event)}\n\n".encode()
        finally:
            await response.aclose()

    @staticmethod
    def response_headers(response: httpx.Response) -> dict[str, str]:
        """The upstream's headers a client may rely on (the passed-through few and ``x-ratelimit-*``), in one pass."""
        out: dict[str, str] = {}
        for raw_key, raw_value in response.headers.raw:
            key = raw_key.decode("latin-1").lower()
            if key in _RESPONSE_HEADERS or key.startswith("x-ratelimit-"):
                out[key] = raw_value.decode("latin-1")
        return out


def json_or_none(data: bytes) -> Any:
    import json

    try:
        return json.loads(data)
    except ValueError:
        return None

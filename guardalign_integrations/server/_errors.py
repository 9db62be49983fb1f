"""OpenAI-shaped error bodies, so every client SDK raises its usual, typed exception.

Why: an OpenAI client maps the HTTP status to an exception class and reads ``error.code``;
a guard that answers in another shape breaks retries and error handling in every agent
framework. Messages name the problem, never the server's files or the request's content.
"""

from __future__ import annotations

from typing import Any

from starlette.responses import JSONResponse

_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 408: "invalid_request_error",
          413: "invalid_request_error", 429: "rate_limit_error", 502: "api_error", 503: "api_error", 504: "api_error"}


class ServerError(Exception):
    """An error answered as an OpenAI error object with ``status`` and a stable ``code``."""

    def __init__(self, status: int, message: str, code: str, *, param: str | None = None, headers: dict[str, str] | None = None) -> None:
        self.status = status
        self.code = code
        self.param = param
        self.headers = headers or {}
        super().__init__(message)


def error_body(status: int, message: str, code: str, param: str | None = None) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}`` as the OpenAI API sends it."""
    return {"error": {"message": message, "type": _TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error"),
                      "param": param, "code": code}}


def error_response(status: int, message: str, code: str, *, param: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, code, param), status_code=status, headers=headers)


def from_server_error(err: ServerError) -> JSONResponse:
    return error_response(err.status, str(err), err.code, param=err.param, headers=err.headers)

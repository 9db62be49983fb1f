"""``POST /v1/scan``: the native scan API (verdicts, and on request the sanitised images).

What: images as JSON (``{"images": ["data:..." | base64 | {"image": ..., "name": ...}],
"return_images": bool, "include_scores": bool}``) or as a multipart upload (any file
fields; form fields ``return_images``/``include_scores``), screened by the same core step
as the chat endpoints (:meth:`ImageGuard.screen`: reader, budget, one batch, policy),
answered with per-image verdicts: decision, scores, boxes, categories; an image that cannot
be read is a ``status: error`` verdict (blocked unless ``fail_open``). No model is called.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from guardalign_core.guard import ContentImage
from guardalign_core.results import Decision
from guardalign_core.verdicts import Forward, ImageVerdict

from ._errors import ServerError
from ._openai_content import ContentError, data_url, declared_mime, decision_header

_ARRAYS = {"scores", "category_costs", "top_categories", "categories"}


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"))


def _is_multipart(request: Request) -> bool:
    return request.headers.get("content-type", "").startswith("multipart/form-data")


async def _inputs(request: Request, body: dict[str, Any] | None) -> tuple[list[tuple[str, str | bytes]], dict[str, Any]]:
    """(label, source) pairs and the options, from the parsed JSON body or (``body`` None) the multipart form.

    The form is parsed from the body the preamble has already read (under its deadline):
    Starlette's ``request.form()`` reads the cached bytes.
    """
    if body is None:
        form = await request.form(max_files=1000, max_fields=100)
        items: list[tuple[str, str | bytes]] = []
        options: dict[str, Any] = {}
        for key, value in form.multi_items():
            if hasattr(value, "read"):
                items.append((f"upload {len(items)}", await value.read()))
            elif key in ("return_images", "include_scores"):
                options[key] = _truthy(value)
            else:
                raise ServerError(400, f"form field {key!r} is not understood", "invalid_request", param=key)
        return items, options
    unknown = set(body) - {"images", "return_images", "include_scores"}
    if unknown:
        raise ServerError(400, f"unknown fields: {', '.join(sorted(unknown))}", "invalid_request")
    images = body.get("images")
    if not isinstance(images, list) or not images:
        raise ServerError(400, "images: expected a non-empty list", "invalid_request", param="images")
    items = []
    for i, entry in enumerate(images):
        if isinstance(entry, dict) and set(entry) <= {"image", "name"} and isinstance(entry.get("image"), str):
            items.append((f"images[{i}]", entry["image"]))
        elif isinstance(entry, str):
            items.append((f"images[{i}]", entry))
        else:
            raise ServerError(400, f"images[{i}]: expected a data URL or base64 string, or {{'image': ..., 'name': ...}}", "invalid_request")
    return items, {k: _truthy(body.get(k)) for k in ("return_images", "include_scores")}


def _verdict(verdict: ImageVerdict, options: dict[str, Any]) -> dict[str, Any]:
    result = verdict.result
    view = result.model_dump(mode="json", exclude=None if options.get("include_scores") else _ARRAYS)
    view["fired_categories"] = result.fired_categories
    view["forward"] = verdict.forward.value
    if options.get("return_images") and result.decision == Decision.MASK and verdict.forward == Forward.BYTES:
        view["sanitized_image"] = data_url(verdict.data, verdict.mime)  # type: ignore[arg-type]
    return view


def register(app: FastAPI, state: Any) -> None:
    """Add ``POST /v1/scan``."""

    async def scan(request: Request) -> Response:
        async with state.serving(request, "/v1/scan", parse_json=not _is_multipart(request)) as admitted:
            items, options = await _inputs(request, admitted.body)

            images = [ContentImage(label, source=source, mime=declared_mime(source) if isinstance(source, str) else None)
                      for label, source in items]
            if not images:
                raise ServerError(400, "no images in the request", "invalid_request", param="images")
            t0 = time.perf_counter()
            decision = await run_in_threadpool(state.batcher.screen, images)
            if decision.refused is not None:
                err = ContentError(decision.refused, code="guardalign_image_budget")
                state.metrics.rejections.labels(err.code).inc()
                raise ServerError(400, str(err), err.code) from None
            state.metrics.scan_seconds.observe(time.perf_counter() - t0)
            state.record_decision(request, decision, len(images))
            body = {
                "decision": decision.decision.value, "status": decision.status.value, "policy": decision.policy,
                "unsafe": decision.unsafe, "reason": decision.reason,
                "images": [_verdict(v, options) for v in decision.images],
            }
            return Response(json.dumps(body, separators=(",", ":")), media_type="application/json",
                            headers={"x-guardalign-decision": decision_header(decision)})

    app.add_route("/v1/scan", scan, methods=["POST"])

"""``POST /v1/scan``: the native scan API (verdicts, and on request the sanitised images).

What: images as JSON (``{"images": ["data:..." | base64 | {"image": ..., "name": ...}],
"return_images": bool, "include_scores": bool}``) or as a multipart upload (any file
fields; form fields ``return_images``/``include_scores``), read through the same reader
and budget as the chat endpoints, scanned in one batch, answered with per-image verdicts:
decision, scores, boxes, categories. No model is called.
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import Response

from guardalign_core.results import Decision

from ._errors import ServerError
from ._openai_content import ContentError, ImageBudget, data_url, decision_header

_ARRAYS = {"scores", "category_costs", "top_categories", "categories"}


def _truthy(value: Any) -> bool:
    return value is True or (isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"))


async def _inputs(request: Request) -> tuple[list[tuple[str, str | bytes]], dict[str, Any]]:
    """(label, source) pairs and the options, from a JSON body or a multipart form."""
    kind = request.headers.get("content-type", "")
    if kind.startswith("multipart/form-data"):
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
    from ._gateway import parse_body

    body = parse_body(await request.body())
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


def _verdict(result: Any, png: bytes | None, options: dict[str, Any]) -> dict[str, Any]:
    view = result.model_dump(mode="json", exclude=None if options.get("include_scores") else _ARRAYS)
    view["fired_categories"] = result.fired_categories
    if options.get("return_images") and result.decision == Decision.MASK and png is not None:
        view["sanitized_image"] = data_url(png)
    return view


def register(app: FastAPI, state: Any) -> None:
    """Add ``POST /v1/scan``."""

    @app.post("/v1/scan")
    async def scan(request: Request) -> Response:
        request.scope["state"]["endpoint"] = "/v1/scan"
        state.authenticate(request)
        slot = await state.admit()
        try:
            items, options = await _inputs(request)

            def work() -> Any:
                budget = ImageBudget(state.guard.config.images)
                refs = [budget.read(source, label) for label, source in items]
                return refs, state.batcher.scan([r.data for r in refs], [r.label for r in refs])

            t0 = time.perf_counter()
            try:
                refs, scanned = await run_in_threadpool(work)
            except ContentError as err:
                state.metrics.rejections.labels(err.code).inc()
                raise ServerError(400, str(err), err.code, param=err.param) from None
            state.metrics.scan_seconds.observe(time.perf_counter() - t0)
            state.metrics.images.inc(len(refs))
            decision = state.guard.decide(scanned.results)
            state.metrics.decisions.labels(decision.decision.value).inc()
            request.scope["state"].update(decision=decision.decision.value, images=len(refs))
            body = {
                "decision": decision.decision.value, "status": decision.status.value, "policy": decision.policy,
                "unsafe": decision.unsafe, "reason": decision.reason,
                "images": [_verdict(r, png, options) for r, png in zip(scanned.results, scanned.pngs)],
            }
            return Response(json.dumps(body, separators=(",", ":")), media_type="application/json",
                            headers={"x-guardalign-decision": decision_header(decision)})
        finally:
            state.release(slot)



"""``POST /beta/litellm_basic_guardrail_api``: LiteLLM's Generic Guardrail API, backed by the guard.

The contract, read from LiteLLM's own source (``litellm/types/proxy/guardrails/guardrail_hooks/
generic_guardrail_api.py`` and ``litellm/proxy/guardrails/guardrail_hooks/generic_guardrail_api/``,
litellm 1.110):

- request: ``{"input_type": "request"|"response", "texts": [...], "images": [url, ...],
  "structured_messages": [OpenAI chat rows], "tools", "tool_calls", "model",
  "request_data": {...}, "litellm_call_id", ...}``; LiteLLM sends its configured
  ``api_key`` as the ``x-api-key`` header.
- response: ``{"action": "NONE" | "BLOCKED" | "GUARDRAIL_INTERVENED", "blocked_reason",
  "texts", "images", "structured_messages"}``. LiteLLM raises on ``BLOCKED``; on
  ``GUARDRAIL_INTERVENED`` it writes returned ``structured_messages`` rows that differ from
  what it sent back into the request (rows returned unchanged keep the originals). The
  returned ``images`` list is not written back by LiteLLM's chat handler, so the sanitised
  images travel in ``structured_messages`` (and in ``images`` for other callers).

LiteLLM's chat handler calls the guardrail only when the request has text or tool calls; a
request with images and no text at all is not sent to any guardrail by LiteLLM.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from guardalign_core.guard import ContentImage
from guardalign_core.verdicts import Forward

from ._openai_content import ContentError, data_url, declared_mime, decision_header, forwarded_url, screen_chat_body

NONE, BLOCKED, INTERVENED = "NONE", "BLOCKED", "GUARDRAIL_INTERVENED"


def _has_images(messages: Any) -> bool:
    return isinstance(messages, list) and any(
        isinstance(m, dict) and isinstance(m.get("content"), list)
        and any(isinstance(p, dict) and p.get("type") == "image_url" for p in m["content"])
        for m in messages
    )


def guardrail_answer(state: Any, body: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The guardrail's answer to one LiteLLM request, and the decision (``None`` when nothing was scanned)."""
    guard = state.guard
    messages = body.get("structured_messages")
    images = body.get("images") or []
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        return {"action": BLOCKED, "blocked_reason": "GuardAlign: 'images' must be a list of URL strings"}, None
    try:
        if _has_images(messages):
            screened = screen_chat_body({"messages": messages}, guard, screen=state.batcher.screen, safety_prompt=False)
            decision = screened.decision
            if screened.blocked:
                return {"action": BLOCKED, "blocked_reason": decision.blocked_reason()}, decision
            if not screened.changed:
                return {"action": NONE}, decision
            out_images = [data_url(v.data, v.mime) for v in screened.verdicts if v.forward == Forward.BYTES and v.sanitised]  # type: ignore[arg-type]
            return {"action": INTERVENED, "structured_messages": screened.body["messages"], "images": out_images or None}, decision
        if not images:
            return {"action": NONE}, None
        decision = state.batcher.screen([ContentImage(f"images[{i}]", source=url, mime=declared_mime(url)) for i, url in enumerate(images)])
        if decision.refused is not None:
            raise ContentError(decision.refused, code="guardalign_image_budget")
        if decision.blocked:
            return {"action": BLOCKED, "blocked_reason": decision.blocked_reason()}, decision
        forwarded = [forwarded_url(url, verdict) for url, verdict in zip(images, decision.images)]
        if all(new is url for new, url in zip(forwarded, images)):
            return {"action": NONE}, decision
        return {"action": INTERVENED, "images": [url for url in forwarded if url is not None]}, decision
    except ContentError as err:
        # LiteLLM would forward what we cannot screen: refuse it (default deny)
        state.metrics.rejections.labels(err.code).inc()
        return {"action": BLOCKED, "blocked_reason": f"GuardAlign: {err}"}, None


def register(app: FastAPI, state: Any) -> None:
    """Add LiteLLM's generic guardrail endpoint."""

    async def litellm_guardrail(request: Request) -> Response:
        async with state.serving(request, "/beta/litellm_basic_guardrail_api") as admitted:  # reads and parses the body
            body = admitted.body
            if body.get("input_type") not in ("request", "response"):
                return JSONResponse({"action": BLOCKED, "blocked_reason": "GuardAlign: input_type must be 'request' or 'response'"})
            answer, decision = await run_in_threadpool(guardrail_answer, state, body)
            headers = {}
            if decision is not None:
                state.record_decision(request, decision, len(decision.results))
                headers["x-guardalign-decision"] = decision_header(decision)
            return JSONResponse(answer, headers=headers)

    app.add_route("/beta/litellm_basic_guardrail_api", litellm_guardrail, methods=["POST"])

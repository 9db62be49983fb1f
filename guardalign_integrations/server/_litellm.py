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
  what it sent back into the request (rows returned unchanged keep the originals). No
  LiteLLM handler (chat, Anthropic messages, Responses, response checks) writes the returned
  ``images`` list back, so a masked image reaches the model only through a rewritten
  ``structured_messages`` row; an image that needs changing and has no such row is blocked
  (see :func:`guardrail_answer`).

LiteLLM's chat handler calls the guardrail only when the request has text or tool calls; a
request with images and no text at all is not sent to any guardrail by LiteLLM.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from starlette.concurrency import run_in_threadpool
from starlette.responses import JSONResponse, Response

from guardalign_core.guard import ContentImage

from ._openai_content import ContentError, check_body_fields, collect_images, declared_mime, decision_header, forwarded_url, rewrite_messages

NONE, BLOCKED, INTERVENED = "NONE", "BLOCKED", "GUARDRAIL_INTERVENED"

REQUEST_KEYS = frozenset({
    "input_type", "litellm_call_id", "litellm_trace_id", "structured_messages", "images", "tools", "texts",
    "request_data", "request_headers", "litellm_version", "additional_provider_specific_params", "tool_calls", "model",
})
"""The fields of LiteLLM's ``GenericGuardrailAPIRequest`` (litellm 1.110).

``structured_messages`` and ``images`` are screened; the others carry text, tool
definitions and calls, or metadata, none of which LiteLLM forwards to the model as media.
Any other field that carries data, a URL, a path or a base64 payload is refused (a newer
LiteLLM could send media there that nothing here screens).
"""


ROWS_MARKER = ("guardalign_rows", "as_sent")
"""``additional_provider_specific_params`` entry the LiteLLM guardrail config must send (docs/server.md)."""

ROWS_NOT_AS_SENT = (
    "LiteLLM did not say it sends structured_messages as the client sent them: with its default "
    "forward_messages_as_sent: false it removes the keys its chat types do not declare (an image_url beside a text "
    "part, a message-level images list) before asking, then forwards the original request with them; set "
    "forward_messages_as_sent: true and additional_provider_specific_params: {guardalign_rows: as_sent} in the "
    "guardrail's litellm_params (docs/server.md)"
)


def rows_as_sent(body: dict[str, Any]) -> bool:
    """Whether the request says its ``structured_messages`` are the client's rows unchanged (:data:`ROWS_MARKER`).

    LiteLLM's request carries no field saying so; with ``forward_messages_as_sent`` off it
    validates the rows against its own chat types first, silently dropping undeclared keys,
    and then forwards the *original* messages: media under a dropped key would reach the
    model unseen. So the guardrail's own config must declare it, and without that
    declaration any request with rows is refused (default deny).
    """
    params = body.get("additional_provider_specific_params")
    key, value = ROWS_MARKER
    return isinstance(params, dict) and params.get(key) == value


def _blocked(reason: str) -> dict[str, Any]:
    return {"action": BLOCKED, "blocked_reason": f"GuardAlign: {reason}"}


def _image_list(body: dict[str, Any]) -> list[str]:
    images = body.get("images")
    if images is None:
        return []
    if not isinstance(images, list) or not all(isinstance(i, str) for i in images):
        raise ContentError("'images' must be a list of URL strings", param="images")
    return images


def guardrail_answer(state: Any, body: dict[str, Any]) -> tuple[dict[str, Any], Any]:
    """The guardrail's answer to one LiteLLM request, and the decision (``None`` when nothing was scanned).

    Every carrier of media is screened, in one call to the guard (one budget for the request):

    - ``structured_messages`` (when not empty) goes through the gateway's default-deny walk
      (:func:`collect_images`): its ``image_url`` parts are screened; a part or message field
      that carries data in any other shape (``file``, ``input_image``, an Anthropic ``image``
      block, a message-level ``images`` list, ...) is refused.
    - every entry of ``images`` is screened; one that is exactly an ``image_url`` of
      ``structured_messages`` shares that part's verdict.
    - a top-level field outside :data:`REQUEST_KEYS` that carries data is refused.

    Any block (an unsafe image under ``block``, an image that cannot be read, a refusal) is
    ``BLOCKED``. LiteLLM writes back only changed ``structured_messages`` rows, never the
    ``images`` list, so when ``images`` and the messages disagree an ``images`` entry found in
    no ``image_url`` part can only pass unchanged: if its verdict would forward anything but
    exactly what was sent (masked, re-encoded, dropped) the answer is ``BLOCKED`` rather than
    letting LiteLLM forward the original (so is a request with no ``structured_messages``,
    such as a response check, whose images need masking). Otherwise a changed request is
    ``GUARDRAIL_INTERVENED`` with the rewritten rows, plus ``images`` as each sent entry
    would be forwarded (for callers that read it).
    """
    try:
        check_body_fields(body, REQUEST_KEYS, "LiteLLM guardrail request")
        images = _image_list(body)
        messages = body.get("structured_messages")
        if messages not in (None, []) and not rows_as_sent(body):
            raise ContentError(ROWS_NOT_AS_SENT, code="guardalign_litellm_config", param="structured_messages")
        refs = [] if messages is None or messages == [] else collect_images(messages)
        in_messages = {ref.url for ref in refs}
        loose: dict[str, int] = {}  # images entries in no image_url part: URL -> first index
        for i, url in enumerate(images):
            if url not in in_messages:
                loose.setdefault(url, i)
        content = [ref.content_image() for ref in refs]
        content += [ContentImage(f"images[{i}]", source=url, mime=declared_mime(url)) for url, i in loose.items()]
        if not content:
            return {"action": NONE}, None
        decision = state.batcher.screen(content)
        if decision.refused is not None:
            raise ContentError(decision.refused, code="guardalign_image_budget")
        if decision.blocked:
            return {"action": BLOCKED, "blocked_reason": decision.blocked_reason()}, decision
        if len(decision.images) != len(content):  # never let an image without a verdict through
            return _blocked("the guard returned a verdict count that does not match the request's images"), None
        verdicts = decision.images[: len(refs)]
        for (url, i), verdict in zip(loose.items(), decision.images[len(refs):]):
            if forwarded_url(url, verdict) is not url:
                raise ContentError(
                    f"images[{i}] would be forwarded changed (masked, re-encoded or dropped) but is in no image_url part of "
                    "structured_messages, and LiteLLM does not write the images list back; refused, not forwarded as sent",
                    code="guardalign_unsupported_content",
                    param=f"images[{i}]",
                )
        new_messages, changed = rewrite_messages(messages, refs, verdicts) if refs else (messages, False)
        if not changed:
            return {"action": NONE}, decision
        by_url = {ref.url: forwarded_url(ref.url, verdict) for ref, verdict in zip(refs, verdicts)}
        out_images = [new for new in (by_url.get(url, url) for url in images) if new is not None]
        return {"action": INTERVENED, "structured_messages": new_messages, "images": out_images or None}, decision
    except ContentError as err:
        # LiteLLM would forward what we cannot screen: refuse it (default deny)
        state.metrics.rejections.labels(err.code).inc()
        return _blocked(str(err)), None


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

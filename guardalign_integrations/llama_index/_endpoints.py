"""The screening and response plumbing shared by the guarded LlamaIndex LLM classes.

:class:`GuardedEndpoints` scans a request's images through the :class:`ImageGuard` (one
batch, reusing what the guard already checked), sends the decision events, handles blocked
requests and annotates responses; :class:`~.llm.GuardAlignLLM`,
:class:`~.multi_modal.GuardAlignMultiModalLLM` and :class:`~.local_llm.GuardAlignLocalLLM`
mix it in. :func:`build_guard` builds the guard every adapter (the postprocessor too) uses.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncGenerator, Callable, ClassVar, Generator, Literal, Sequence, TypeVar, Union

from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    MessageRole,
)

from guardalign_core.config import GuardConfig, PolicyConfig
from guardalign_core.errors import GuardAlignViolation
from guardalign_core.guard import ImageGuard
from guardalign_core.screening import ContentImage
from guardalign_core.verdicts import RequestVerdict, SafetyDelivery

from ._messages import FoundBlock, apply_safety_prompt, apply_safety_to_prompt, find_images, prepend_text, write_back
from .events import Component, dispatch_decision_events

GuardSpec = Union[str, Path, GuardConfig, dict, ImageGuard, None]
"""A preset name, a YAML/JSON config file, a :class:`GuardConfig` (or its dict), a core :class:`ImageGuard`, or ``None`` (defaults)."""

METADATA_KEY = "guardalign"
"""Key of the decision summary in responses' ``additional_kwargs`` and in node metadata."""

_T = TypeVar("_T")


class SharesGuardOnCopy:
    """Mixin for components holding their guard in ``_guard``: a deep copy shares the guard instead of copying it.

    The guard holds a lock (not copyable) and the one loaded CLIP; LlamaIndex deep-copies
    components (pipelines, retrievers), so every copy must use the same guard. The mixin
    declares no attribute of its own, so it adds nothing to the pydantic models it joins.
    """

    def __deepcopy__(self, memo: dict[int, Any] | None = None) -> Any:
        memo = {} if memo is None else memo
        guard = getattr(self, "_guard", None)
        if guard is not None:
            memo[id(guard)] = guard
        return super().__deepcopy__(memo)  # type: ignore[misc]


def build_guard(
    config: GuardSpec = None,
    *,
    guard: GuardSpec = None,
    action: Literal["mask", "block", "flag"] | None = None,
    fail_open: bool | None = None,
) -> ImageGuard:
    """Build (or take) the :class:`ImageGuard` an adapter uses, with policy shortcuts applied; fails now, not at the first image.

    Args:
        config: what builds the guard (the positional form of ``guard``).
        guard: a core :class:`ImageGuard` to share, or what builds one: a preset name, a
            config file, a :class:`GuardConfig` or its dict (what the LangChain side accepts).
        action: overrides the policy's ``action`` (``mask``, ``block`` or ``flag``).
        fail_open: overrides the policy's ``fail_open``.

    Raises:
        ValueError: both ``config`` and ``guard`` given, a policy shortcut given with a built
            guard (set the policy in that guard's config instead), an unknown preset, a missing
            file or an invalid field. TypeError: anything else.
    """
    if config is not None and guard is not None:
        raise ValueError("guard: pass the guard either positionally or as guard=, not both")
    spec = guard if guard is not None else config
    overrides = {k: v for k, v in (("action", action), ("fail_open", fail_open)) if v is not None}
    if isinstance(spec, ImageGuard):
        if overrides:
            raise ValueError(f"{', '.join(overrides)}: set the policy in the config of the guard you pass")
        return spec
    if spec is not None and not isinstance(spec, (str, Path, GuardConfig, dict)):
        raise TypeError(f"guard: expected a preset name, a config file, a GuardConfig or an ImageGuard, got {type(spec).__name__}")
    built = ImageGuard(spec)
    if overrides:
        policy = PolicyConfig.model_validate({**built.config.policy.model_dump(), **overrides})
        built.config = built.config.model_copy(update={"policy": policy})
    return built


@dataclass(frozen=True)
class GuardedRequest:
    """One screened request: what to forward, the verdict, and how the safety prompt was delivered."""

    decision: RequestVerdict
    messages: list[ChatMessage] = field(default_factory=list)
    delivery: SafetyDelivery = SafetyDelivery(None, None)
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def blocked(self) -> bool:
        return self.decision.blocked

    def kept_prefix(self, answer_start: str) -> str:
        """What to put before the answer so it starts with the prefill (``""`` without one)."""
        return self.decision.safety_prompt.kept_prefix(self.delivery, answer_start or " ")


def _map_stream(gen: Any, fn: Callable[[Any, bool], _T]) -> Generator[_T, None, None]:
    """Yield ``fn(item, is_first)`` for each item as it arrives (no buffering)."""
    first = True
    for item in gen:
        yield fn(item, first)
        first = False


async def _amap_stream(agen: Any, fn: Callable[[Any, bool], _T]) -> AsyncGenerator[_T, None]:
    first = True
    async for item in agen:
        yield fn(item, first)
        first = False


def _one(item: _T) -> Generator[_T, None, None]:
    yield item


async def _aone(item: _T) -> AsyncGenerator[_T, None]:
    yield item


class GuardedEndpoints:
    """Screening, block handling and response annotation shared by the guarded LLM classes.

    A plain mixin for pydantic models that define ``on_block``, ``refusal``,
    ``allow_block_types``, ``reuse_checked`` and a private ``_guard``; ``_component`` names the
    adapter in decision events.
    """

    _component: ClassVar[Component] = "llm"
    _guard: ImageGuard
    on_block: Literal["refuse", "raise"]
    refusal: str
    reuse_checked: bool
    allow_block_types: tuple[str, ...]

    @property
    def guard(self) -> ImageGuard:
        """The :class:`ImageGuard` (its config, detector and policy) this adapter uses."""
        return self._guard

    @property
    def refusal_text(self) -> str:
        """Former name of :attr:`refusal`."""
        return self.refusal

    def _system_role(self) -> MessageRole:
        return MessageRole.SYSTEM

    # -- screening ---------------------------------------------------------------------------
    def _verdict(self, images: Sequence[ContentImage]) -> RequestVerdict:
        """The one screening step for this request's images, plus one decision event per image."""
        verdict = self._guard.screen(images, reuse=self.reuse_checked)
        if verdict.images:
            dispatch_decision_events(verdict.images, component=self._component, request=verdict.summary())
        return verdict

    def _find(self, messages: Sequence[ChatMessage]) -> list[FoundBlock]:
        return find_images(messages, allow_block_types=self.allow_block_types)

    def _request(self, decision: RequestVerdict, messages: list[ChatMessage], delivery: SafetyDelivery = SafetyDelivery(None, None)) -> GuardedRequest:
        return GuardedRequest(decision=decision, messages=messages, delivery=delivery, summary=decision.summary())

    def _screen(self, messages: Sequence[ChatMessage]) -> GuardedRequest:
        """Screen, sanitise and add the safety prompt: the messages the inner model may see."""
        found = self._find(messages)
        decision = self._verdict([f.image for f in found])
        if decision.blocked:
            return self._request(decision, list(messages))
        sanitised = write_back(messages, found, decision) if found else list(messages)
        sanitised, delivery = apply_safety_prompt(sanitised, decision.safety_prompt, system_role=self._system_role())
        return self._request(decision, sanitised, delivery)

    async def _ascreen(self, messages: Sequence[ChatMessage]) -> GuardedRequest:
        """:meth:`_screen` with the CPU-heavy scan off the event loop (text-only requests stay inline)."""
        if not self._find(messages):
            return self._screen(messages)
        return await asyncio.to_thread(self._screen, messages)

    def check(self, messages: Sequence[ChatMessage]) -> RequestVerdict:
        """Check-only: screen a request's images and return the verdict; no model is called.

        Example:
            >>> decision = guarded.check([ChatMessage(role="user", blocks=[ImageBlock(image=png)])])  # doctest: +SKIP
            >>> decision.decision, [r.source for r in decision.results]  # doctest: +SKIP
            (<Decision.ALLOW: 'allow'>, ['messages[0].blocks[0]'])
        """
        return self._screen(messages).decision

    async def acheck(self, messages: Sequence[ChatMessage]) -> RequestVerdict:
        """Async :meth:`check` (the scan runs in a worker thread)."""
        return (await self._ascreen(messages)).decision

    def _text_only(self, prompt: str) -> tuple[str, GuardedRequest]:
        """A completion prompt has no images: only the prefix policy applies (``always``)."""
        decision = self._guard.screen([])
        return apply_safety_to_prompt(prompt, decision.safety_prompt), self._request(decision, [])

    # -- blocked requests --------------------------------------------------------------------
    def _raise_if_configured(self, request: GuardedRequest) -> None:
        if self.on_block == "raise":
            raise GuardAlignViolation(request.decision.blocked_reason(), request.decision)

    def _refusal_chat(self, request: GuardedRequest) -> ChatResponse:
        self._raise_if_configured(request)
        message = ChatMessage(role=MessageRole.ASSISTANT, content=self.refusal)
        return ChatResponse(message=message, delta=self.refusal, additional_kwargs={METADATA_KEY: request.summary})

    def _refusal_completion(self, request: GuardedRequest) -> CompletionResponse:
        self._raise_if_configured(request)
        return CompletionResponse(text=self.refusal, delta=self.refusal, additional_kwargs={METADATA_KEY: request.summary})

    # -- responses ---------------------------------------------------------------------------
    @staticmethod
    def _finish_chat(response: ChatResponse, request: GuardedRequest, first: bool | None = None) -> ChatResponse:
        """Attach the decision summary; put a kept prefill back at the start of the answer.

        ``first`` is ``None`` for a whole response, else whether this stream chunk is the first
        (only the first chunk's delta gets the prefix; every chunk's cumulative message does).
        """
        update: dict[str, Any] = {"additional_kwargs": {**response.additional_kwargs, METADATA_KEY: request.summary}}
        kept = request.kept_prefix(response.message.content or "") if request.delivery.prefill else ""
        if kept:
            update["message"] = prepend_text(response.message, kept)
            if first:
                update["delta"] = kept + (response.delta or "")
        return response.model_copy(update=update)

    @staticmethod
    def _finish_completion(
        response: CompletionResponse, request: GuardedRequest, first: bool | None = None
    ) -> CompletionResponse:
        update: dict[str, Any] = {"additional_kwargs": {**response.additional_kwargs, METADATA_KEY: request.summary}}
        kept = request.kept_prefix(response.text or "") if request.delivery.prefill else ""
        if kept:
            update["text"] = kept + response.text
            if first:
                update["delta"] = kept + (response.delta or "")
        return response.model_copy(update=update)

    def _chat_stream(self, gen: ChatResponseGen, request: GuardedRequest) -> ChatResponseGen:
        return _map_stream(gen, lambda chunk, first: self._finish_chat(chunk, request, first))

    def _chat_astream(self, agen: ChatResponseAsyncGen, request: GuardedRequest) -> ChatResponseAsyncGen:
        return _amap_stream(agen, lambda chunk, first: self._finish_chat(chunk, request, first))

    def _completion_stream(self, gen: CompletionResponseGen, request: GuardedRequest) -> CompletionResponseGen:
        return _map_stream(gen, lambda chunk, first: self._finish_completion(chunk, request, first))

    def _completion_astream(self, agen: CompletionResponseAsyncGen, request: GuardedRequest) -> CompletionResponseAsyncGen:
        return _amap_stream(agen, lambda chunk, first: self._finish_completion(chunk, request, first))


"""``GuardAlignGuard``: a Runnable that sanitises any chat input before a model sees it.

``prompt | guard | llm`` works with any chat model: the guard finds the request's images
(through ``content_blocks``), scans them in one batch with the OT detector, writes masked
images back as standard v1 blocks, adds the black-box safety prompt when the policy says
so, and returns a ``ChatPromptValue``. Every decision is dispatched as the custom callback
event ``guardalign_decision`` and recorded in the run's metadata under ``guardalign``.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import UUID

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForChainRun,
    CallbackManager,
    CallbackManagerForChainRun,
    adispatch_custom_event,
    dispatch_custom_event,
)
from langchain_core.callbacks.base import BaseCallbackManager
from langchain_core.callbacks.manager import AsyncRunManager
from langchain_core.language_models import LanguageModelInput
from langchain_core.messages import BaseMessage
from langchain_core.prompt_values import ChatPromptValue
from langchain_core.runnables import RunnableConfig, RunnableSerializable
from langchain_core.runnables.config import ensure_config, get_callback_manager_for_config, run_in_executor
from langchain_core.tracers.schemas import Run
from pydantic import ConfigDict, Field, PrivateAttr, field_validator, model_validator

from guardalign_core.config import GuardConfig, resolve_config
from guardalign_core.errors import GuardAlignViolation
from guardalign_core.guard import ImageGuard
from guardalign_core.memory import config_fingerprint
from guardalign_core.verdicts import DEFAULT_REFUSAL, RequestVerdict, SafetyDelivery

from ._messages import FoundImage, apply_safety_prompt, combine_input_chunks, find_images, to_messages, write_back

logger = logging.getLogger(__name__)

EVENT_NAME = "guardalign_decision"
"""Name of the custom callback event carrying each decision (``on_custom_event``)."""

METADATA_KEY = "guardalign"
"""Key of the decision summary in run metadata and in ``response_metadata``."""

_ENGINE_LOCK = threading.Lock()


def resolve_guard_config(spec: str | Path | GuardConfig | dict[str, Any] | None) -> GuardConfig:
    """A :class:`GuardConfig` from a preset name, a YAML/JSON file, a dict or a config (see core ``resolve_config``).

    Example:
        >>> resolve_guard_config("tiny-random").detector.model
        'guardalign-tiny-clip'
    """
    return resolve_config(spec)


def coerce_guard(guard: Any = None, *, action: str | None = None, fail_open: bool | None = None) -> GuardAlignGuard:
    """A :class:`GuardAlignGuard` from a guard, a preset name, a config file or a config.

    ``action`` and ``fail_open``, when given, override the policy (a given guard is copied).
    """
    shortcuts = {k: v for k, v in (("action", action), ("fail_open", fail_open)) if v is not None}
    if isinstance(guard, GuardAlignGuard):
        if not shortcuts:
            return guard
        return GuardAlignGuard(config=guard.config, reuse_checked=guard.reuse_checked, allow_block_types=guard.allow_block_types, **shortcuts)
    return GuardAlignGuard(config=guard, **shortcuts)


@dataclass
class GuardedRequest:
    """The guard's work on one request: the verdict and the messages to forward.

    Attributes:
        messages: the sanitised messages, or ``None`` when the request is blocked (it must
            not be forwarded).
        decision: the request verdict; ``decision.images[i]`` belongs to ``images[i]``.
        images: where each image (or refused block) sits in the request.
        delivery: how the safety prompt was put into ``messages`` (empty when not applied).
    """

    messages: list[BaseMessage] | None
    decision: RequestVerdict
    images: list[FoundImage] = field(default_factory=list)
    delivery: SafetyDelivery = SafetyDelivery(None, None)

    @property
    def blocked(self) -> bool:
        return self.decision.blocked

    def kept_prefix(self, answer: BaseMessage) -> str:
        """What to put before the answer so it starts with the prefill (``""`` without one)."""
        return self.decision.safety_prompt.kept_prefix(self.delivery, answer.text[:1] if answer.text else " ")


class GuardAlignGuard(RunnableSerializable[LanguageModelInput, ChatPromptValue]):
    """Sanitise a chat request's images before any chat model sees them.

    Input: any ``LanguageModelInput`` (a string, a list of messages, a ``PromptValue``).
    Output: a ``ChatPromptValue`` whose unsafe image patches are masked (``mask`` policy),
    or the input unchanged with the finding recorded (``flag``); the ``block`` policy, and
    any image that could not be checked (fail-closed), raise
    :class:`~guardalign_core.errors.GuardAlignViolation` carrying the decision.

    Requests without images load nothing and cost microseconds.

    Example:
        >>> guard = GuardAlignGuard(config="tiny-random")
        >>> guard.invoke("no image here").to_messages()[0].content
        'no image here'
        >>> guard.engine.detector_loaded
        False
        >>> chain = prompt | guard | llm  # doctest: +SKIP
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    config: GuardConfig = Field(default_factory=GuardConfig)
    """Detector, policy, image limits and safety prefix (a preset name or file is accepted too)."""

    reuse_checked: bool = True
    """Reuse verdicts on inline images the engine already checked or sanitised (by SHA-256), so images resent in a chat or agent loop are not rescanned."""

    allow_block_types: tuple[str, ...] = ()
    """Content item types forwarded unscreened although they may carry data (default deny: e.g. ``("file",)`` lets PDFs through)."""

    _engine: ImageGuard | None = PrivateAttr(default=None)
    _fingerprint: tuple[int, str] | None = PrivateAttr(default=None)

    @model_validator(mode="before")
    @classmethod
    def _policy_shortcuts(cls, values: Any) -> Any:
        """``action=`` and ``fail_open=`` as shortcuts for the config's policy fields."""
        if not isinstance(values, dict) or not ({"action", "fail_open"} & set(values)):
            return values
        values = dict(values)
        shortcuts = {k: values.pop(k) for k in ("action", "fail_open") if k in values}
        config = resolve_guard_config(values.get("config"))
        policy = config.policy.model_validate({**config.policy.model_dump(), **shortcuts})
        values["config"] = config.model_copy(update={"policy": policy})
        return values

    @field_validator("config", mode="before")
    @classmethod
    def _resolve_config(cls, value: Any) -> GuardConfig:
        return resolve_guard_config(value)

    # -- engine --------------------------------------------------------------------------
    @property
    def engine(self) -> ImageGuard:
        """The core :class:`ImageGuard` for the current config, built on first use (its CLIP loads on the first image).

        A copy of this guard with another config (``model_copy(update=...)``, or ``config``
        set on a deep copy) gets its own engine: it never decides with the old config.
        """
        engine = self._engine
        if engine is None or engine.config != self.config:
            with _ENGINE_LOCK:
                engine = self._engine
                if engine is None or engine.config != self.config:
                    engine = self._engine = ImageGuard(self.config)
        return engine

    @property
    def InputType(self) -> Any:  # noqa: N802 (Runnable API)
        return LanguageModelInput

    @property
    def OutputType(self) -> type[ChatPromptValue]:  # noqa: N802 (Runnable API)
        return ChatPromptValue

    def describe(self) -> dict[str, Any]:
        """A compact, JSON-ready description of the guard's settings (for traces)."""
        c = self.config
        engine = self.engine
        cached = self._fingerprint
        if cached is None or cached[0] != id(engine):
            cached = self._fingerprint = (id(engine), config_fingerprint(c, engine.detector))  # builds no CLIP
        return {
            "fingerprint": cached[1],  # everything that changes what is forwarded: limits, bank, categories, grid, mask mode
            "reuse_checked": self.reuse_checked,
            "allow_block_types": list(self.allow_block_types),
            "detector": c.detector.kind,
            "backbone": c.detector.backbone_id,
            "threshold": c.detector.cosine_threshold if c.detector.kind == "cosine" else c.detector.threshold,
            "policy": c.policy.action,
            "fail_open": c.policy.fail_open,
            "prefix_when": c.prefix.when,
        }

    # -- the work (no callbacks) ------------------------------------------------------------
    def _screen(self, messages: list[BaseMessage], found: list[FoundImage]) -> RequestVerdict:
        return self.engine.screen([image.image for image in found], reuse=self.reuse_checked)

    def _sanitize_messages(self, messages: list[BaseMessage], found: list[FoundImage], safety_prompt: bool) -> GuardedRequest:
        verdict = self._screen(messages, found)
        logger.debug("guardalign decision: %s", verdict.reason)
        if verdict.blocked:
            return GuardedRequest(None, verdict, found)
        sanitised = write_back(messages, found, verdict) if found else list(messages)
        delivery = SafetyDelivery(None, None)
        if safety_prompt:
            sanitised, delivery = apply_safety_prompt(sanitised, verdict.safety_prompt)
        return GuardedRequest(sanitised, verdict, found, delivery)

    def find(self, messages: list[BaseMessage]) -> list[FoundImage]:
        """The request's images and refused blocks (see :func:`~._messages.find_images`)."""
        return find_images(messages, allow_block_types=self.allow_block_types)

    def check(self, input: LanguageModelInput) -> RequestVerdict:  # noqa: A002 (Runnable naming)
        """Check-only mode: screen the request's images and return the verdict, changing nothing.

        No event is dispatched and no message is rewritten; the verdict is the one ``invoke``
        would take (``verdict.images[i].pixels()`` are the pixels a model would see). Nothing is
        loaded for a request without images.

        Example:
            >>> guard.check(messages).summary()["decision"]  # doctest: +SKIP
            'mask'
        """
        messages = to_messages(input)
        return self._screen(messages, self.find(messages))

    async def acheck(self, input: LanguageModelInput) -> RequestVerdict:  # noqa: A002
        """Async :meth:`check`; the scan runs in a worker thread, off the event loop."""
        messages = to_messages(input)
        found = self.find(messages)
        if not found:
            return self._screen(messages, found)
        return await run_in_executor(None, self._screen, messages, found)

    def sanitize(self, input: LanguageModelInput, *, safety_prompt: bool = True) -> GuardedRequest:  # noqa: A002
        """Screen, apply the verdict and return the messages to forward (no callbacks, never raises on block).

        Args:
            input: any ``LanguageModelInput``.
            safety_prompt: add the planned safety prompt to the messages (the agent
                middleware sets it on the request's system message instead).

        Returns:
            A :class:`GuardedRequest`; ``messages`` is ``None`` when the request is blocked.
        """
        messages = to_messages(input)
        return self._sanitize_messages(messages, self.find(messages), safety_prompt)

    async def asanitize(
        self, input: LanguageModelInput, *, safety_prompt: bool = True, config: RunnableConfig | None = None  # noqa: A002
    ) -> GuardedRequest:
        """Async :meth:`sanitize`: the CPU-heavy scan and re-encoding run in a worker thread."""
        messages = to_messages(input)
        found = self.find(messages)
        if not found:  # nothing to scan: stay on the loop, a thread hop would cost more
            return self._sanitize_messages(messages, found, safety_prompt)
        return await run_in_executor(config, self._sanitize_messages, messages, found, safety_prompt)

    def violation(self, decision: RequestVerdict) -> GuardAlignViolation:
        """The exception for a blocked request, naming each blocked image and why."""
        return GuardAlignViolation(decision.blocked_reason(), decision)

    # -- Runnable API ----------------------------------------------------------------------
    def _run(self, input: LanguageModelInput, run_manager: CallbackManagerForChainRun) -> ChatPromptValue:  # noqa: A002
        guarded = self.sanitize(input)
        emit_decision(guarded.decision, run_manager)
        if guarded.blocked:
            raise self.violation(guarded.decision)
        return ChatPromptValue(messages=guarded.messages)

    async def _arun(
        self, input: LanguageModelInput, run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig  # noqa: A002
    ) -> ChatPromptValue:
        guarded = await self.asanitize(input, config=config)
        await aemit_decision(guarded.decision, run_manager)
        if guarded.blocked:
            raise self.violation(guarded.decision)
        return ChatPromptValue(messages=guarded.messages)

    def invoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any) -> ChatPromptValue:  # noqa: A002
        """Sanitise one request (see the class docstring); callbacks, tags and run names apply."""
        return self._call_with_config(self._run, input, config, run_type="chain")

    async def ainvoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, **kwargs: Any) -> ChatPromptValue:  # noqa: A002
        """Async :meth:`invoke`; the scan runs off the event loop."""
        return await self._acall_with_config(self._arun, input, config, run_type="chain")

    def _transform(
        self, chunks: Iterator[LanguageModelInput], run_manager: CallbackManagerForChainRun
    ) -> Iterator[ChatPromptValue]:
        yield self._run(combine_input_chunks(chunks), run_manager)

    async def _atransform(
        self, chunks: AsyncIterator[LanguageModelInput], run_manager: AsyncCallbackManagerForChainRun, config: RunnableConfig
    ) -> AsyncIterator[ChatPromptValue]:
        collected = [chunk async for chunk in chunks]
        yield await self._arun(combine_input_chunks(collected), run_manager, config)

    def transform(
        self, input: Iterator[LanguageModelInput], config: RunnableConfig | None = None, **kwargs: Any  # noqa: A002
    ) -> Iterator[ChatPromptValue]:
        """Streamed input: the request is assembled, checked once, and passed on as one value.

        Downstream streaming is unaffected: in ``prompt | guard | llm`` the model's tokens
        still stream, since an image can only be judged whole, only the prompt waits.
        """
        yield from self._transform_stream_with_config(input, self._transform, config)

    async def atransform(
        self, input: AsyncIterator[LanguageModelInput], config: RunnableConfig | None = None, **kwargs: Any  # noqa: A002
    ) -> AsyncIterator[ChatPromptValue]:
        """Async :meth:`transform`."""
        async for output in self._atransform_stream_with_config(input, self._atransform, config):
            yield output


# -- making decisions visible ---------------------------------------------------------------


def child_callbacks(run_manager: Any) -> BaseCallbackManager:
    """Callbacks for work nested under ``run_manager``'s run (also for LLM runs, which lack ``get_child``)."""
    if hasattr(run_manager, "get_child"):
        return run_manager.get_child()
    cls = AsyncCallbackManager if isinstance(run_manager, AsyncRunManager) else CallbackManager
    manager = cls(handlers=[], parent_run_id=run_manager.run_id)
    manager.set_handlers(run_manager.inheritable_handlers)
    manager.add_tags(run_manager.inheritable_tags)
    manager.add_metadata(run_manager.inheritable_metadata)
    return manager


def _record_run_metadata(run_manager: Any, data: dict[str, Any]) -> None:
    """Put the decision in the run's metadata, where tracers (LangSmith) and event streams read it.

    Tracers keep each open run in ``run_map`` and send its metadata when it ends (the same
    path langchain-core uses to attach gateway metadata after a model call).
    """
    run_id: UUID = run_manager.run_id
    for handler in run_manager.handlers:
        run_map = getattr(handler, "run_map", None)
        if not isinstance(run_map, dict):
            continue
        run = run_map.get(str(run_id), run_map.get(run_id))
        if isinstance(run, Run):
            run.extra["metadata"] = {**run.extra.get("metadata", {}), METADATA_KEY: data}
        elif isinstance(run, dict) and isinstance(run.get("metadata"), dict):  # astream_events' run info
            run["metadata"] = {**run["metadata"], METADATA_KEY: data}


def emit_decision(decision: RequestVerdict, run_manager: Any | None) -> None:
    """Dispatch ``guardalign_decision`` under ``run_manager``'s run and add it to its metadata."""
    if run_manager is None:
        return
    data = decision.summary()
    _record_run_metadata(run_manager, data)
    dispatch_custom_event(EVENT_NAME, data, config={"callbacks": child_callbacks(run_manager)})


async def aemit_decision(decision: RequestVerdict, run_manager: Any | None) -> None:
    """Async :func:`emit_decision`."""
    if run_manager is None:
        return
    data = decision.summary()
    _record_run_metadata(run_manager, data)
    await adispatch_custom_event(EVENT_NAME, data, config={"callbacks": child_callbacks(run_manager)})


def _context_has_run() -> bool:
    return get_callback_manager_for_config(ensure_config()).parent_run_id is not None


def emit_decision_in_context(decision: RequestVerdict) -> None:
    """Dispatch the event under the run active in this context (a graph node), if any."""
    if _context_has_run():
        dispatch_custom_event(EVENT_NAME, decision.summary())


async def aemit_decision_in_context(decision: RequestVerdict) -> None:
    """Async :func:`emit_decision_in_context`."""
    if _context_has_run():
        await adispatch_custom_event(EVENT_NAME, decision.summary())


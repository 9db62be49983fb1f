"""``GuardedChatModel``: any LangChain chat model behind the GuardAlign guard (DESIGN §1C).

The black-box fallback for API models (OpenAI, Anthropic, any ``BaseChatModel``): the
guard masks unsafe image patches and adds the safety prompt, then the wrapped model
answers. Blocked requests get a refusal (with LangChain's standard refusal block) or raise,
as configured. Streaming passes the wrapped model's chunks through as they arrive.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass
from typing import Any, Literal

from langchain_core.callbacks import (
    AsyncCallbackManager,
    AsyncCallbackManagerForLLMRun,
    CallbackManager,
    CallbackManagerForLLMRun,
)
from langchain_core.callbacks.base import BaseCallbackManager
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.language_models.model_profile import ModelProfile
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable, RunnableBinding, RunnableConfig
from langchain_core.runnables.config import ensure_config
from langchain_core.tools import BaseTool
from pydantic import ConfigDict, Field, model_validator

from guardalign_core.verdicts import RequestVerdict

from ._messages import prepend_text, refusal_message
from .guard import (
    DEFAULT_REFUSAL,
    METADATA_KEY,
    GuardAlignGuard,
    GuardedRequest,
    aemit_decision,
    child_callbacks,
    coerce_guard,
    emit_decision,
)

_INNER_TAGS = ["nostream"]
"""The wrapped model's run is traced as a child but not streamed again (LangGraph's ``nostream`` tag)."""

_PROVIDER_PARAMS = ("api_key", "base_url", "timeout", "max_retries", "model_name")

_END = object()


def with_guard_field(values: dict[str, Any]) -> dict[str, Any]:
    """Constructor values with ``guard`` made a :class:`GuardAlignGuard` and ``action``/``fail_open`` folded into it.

    Shared by the chat models' ``model_validator(mode="before")``: a preset name, config file
    or ``GuardConfig`` is accepted for ``guard``, and the policy shortcuts override its policy.
    """
    shortcuts = {k: values[k] for k in ("action", "fail_open") if k in values}
    guard = values.get("guard")
    if shortcuts or (guard is not None and not isinstance(guard, GuardAlignGuard)):
        rest = {k: v for k, v in values.items() if k not in shortcuts}
        values = {**rest, "guard": coerce_guard(guard, **shortcuts)}
    return values


@dataclass(frozen=True)
class _OuterRun:
    """This model's own run, as ``invoke``/``stream`` start it: its id and its callbacks."""

    run_id: uuid.UUID
    callbacks: BaseCallbackManager


_OUTER_RUN: ContextVar[_OuterRun | None] = ContextVar("guardalign_outer_run", default=None)
"""Set only while this model's run starts up.

langchain-core 1.8 calls ``_stream``/``_astream`` without the run manager (it reports
tokens itself), but the guard needs its run: to dispatch the decision under it, to record
it in its metadata and to nest the wrapped model's run inside it. ``invoke``/``stream``
therefore fix the run id and the callback handlers up front and publish them here for
the first step of the run.
"""


class GuardedChatModel(BaseChatModel):
    """Wrap any chat model so its inputs pass GuardAlign first.

    Args:
        model: the chat model that answers (any ``BaseChatModel``).
        guard: a :class:`GuardAlignGuard`, or what builds one (a preset name, a config
            file, a ``GuardConfig``).
        action, fail_open: shortcuts for the guard's policy (``"mask"``, ``"block"``,
            ``"flag"``; pass unchecked images on instead of blocking).
        on_block: ``"refuse"`` (default) answers with :attr:`refusal`; ``"raise"`` raises
            :class:`~guardalign_core.errors.GuardAlignViolation`.

    Example:
        >>> from langchain_openai import ChatOpenAI  # doctest: +SKIP
        >>> llm = GuardedChatModel(model=ChatOpenAI(model="gpt-4o-mini"), guard="fast-cpu")  # doctest: +SKIP
        >>> llm.invoke([HumanMessage(content=[{"type": "text", "text": "What is this?"}, image_block])])  # doctest: +SKIP
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid")

    model: BaseChatModel
    """The wrapped chat model that answers once the guard has passed the request."""

    guard: GuardAlignGuard = Field(default_factory=GuardAlignGuard)
    """The guard applied to every request (a preset name, file or GuardConfig is accepted too)."""

    on_block: Literal["refuse", "raise"] = "refuse"
    """On a blocked request: answer with a refusal message, or raise GuardAlignViolation."""

    refusal: str = DEFAULT_REFUSAL
    """Text of the refusal returned for blocked requests."""

    stop: list[str] | None = None
    """Stop sequences passed to the wrapped model on every call (a call's own ``stop`` wins)."""

    temperature: float | None = None
    """If set, copied onto the wrapped model's ``temperature`` field."""

    max_tokens: int | None = None
    """If set, copied onto the wrapped model's ``max_tokens`` field."""

    streaming: bool = False
    """Use the streaming path even under ``invoke`` (LangChain's standard flag)."""

    @model_validator(mode="before")
    @classmethod
    def _coerce(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        for key in _PROVIDER_PARAMS:
            if key in values:
                raise ValueError(f"{key}: set it on the wrapped chat model, e.g. GuardedChatModel(model=ChatOpenAI({key}=...))")
        return with_guard_field(values)

    @model_validator(mode="after")
    def _apply_sampling(self) -> GuardedChatModel:
        updates = {k: v for k, v in (("temperature", self.temperature), ("max_tokens", self.max_tokens)) if v is not None}
        for key in updates:
            if key not in type(self.model).model_fields:
                raise ValueError(f"{key}: {type(self.model).__name__} has no {key!r} field; set it on the wrapped model instead")
        if updates:
            self.model = self.model.model_copy(update=updates)
        return self

    # -- identity ----------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "guardalign-guarded"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {
            "model": {"_type": self.model._llm_type, **self.model._identifying_params},  # noqa: SLF001
            "guard": self.guard.describe(),
            "on_block": self.on_block,
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        """The wrapped model's tracing parameters (provider and model name)."""
        return self.model._get_ls_params(stop=stop if stop is not None else self.stop, **kwargs)  # noqa: SLF001

    def _resolve_model_profile(self) -> ModelProfile | None:
        return self.model.profile

    # -- the run the guard reports under ----------------------------------------------------------
    @staticmethod
    def _outer_run(config: RunnableConfig | None, *, is_async: bool) -> tuple[RunnableConfig, _OuterRun]:
        """Fix the run id and resolve the inheritable callbacks once (tracers included), so the
        run langchain-core starts and the guard's run handle share the same handler objects."""
        config = ensure_config(config)
        manager_cls = AsyncCallbackManager if is_async else CallbackManager
        callbacks = manager_cls.configure(config.get("callbacks"), None, False, config.get("tags"), None, config.get("metadata"))
        run_id = config.get("run_id") or uuid.uuid4()
        return {**config, "callbacks": callbacks, "run_id": run_id}, _OuterRun(run_id, callbacks)

    @staticmethod
    def _current_run_manager(run_manager: Any | None, *, is_async: bool) -> Any | None:
        """The run manager langchain-core passed, or a handle on this run rebuilt from ``_OUTER_RUN``."""
        if run_manager is not None:
            return run_manager
        outer = _OUTER_RUN.get()
        if outer is None:
            return None  # called outside invoke/stream (e.g. generate()): the decision still goes in response_metadata
        cls = AsyncCallbackManagerForLLMRun if is_async else CallbackManagerForLLMRun
        cb = outer.callbacks
        return cls(
            run_id=outer.run_id,
            handlers=cb.handlers,
            inheritable_handlers=cb.inheritable_handlers,
            parent_run_id=cb.parent_run_id,
            tags=cb.tags,
            inheritable_tags=cb.inheritable_tags,
            metadata=cb.metadata,
            inheritable_metadata=cb.inheritable_metadata,
        )

    def invoke(self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop: list[str] | None = None, **kwargs: Any) -> AIMessage:  # noqa: A002
        config, outer = self._outer_run(config, is_async=False)
        token = _OUTER_RUN.set(outer)
        try:
            return super().invoke(input, config, stop=stop, **kwargs)
        finally:
            _OUTER_RUN.reset(token)

    async def ainvoke(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop: list[str] | None = None, **kwargs: Any  # noqa: A002
    ) -> AIMessage:
        config, outer = self._outer_run(config, is_async=True)
        token = _OUTER_RUN.set(outer)
        try:
            return await super().ainvoke(input, config, stop=stop, **kwargs)
        finally:
            _OUTER_RUN.reset(token)

    def stream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop: list[str] | None = None, **kwargs: Any  # noqa: A002
    ) -> Iterator[AIMessageChunk]:
        config, outer = self._outer_run(config, is_async=False)
        chunks = super().stream(input, config, stop=stop, **kwargs)
        token = _OUTER_RUN.set(outer)  # only around the first step (the guard), never across a yield
        try:
            first = next(chunks, _END)
        finally:
            _OUTER_RUN.reset(token)
        if first is _END:
            return
        yield first
        yield from chunks

    async def astream(
        self, input: LanguageModelInput, config: RunnableConfig | None = None, *, stop: list[str] | None = None, **kwargs: Any  # noqa: A002
    ) -> AsyncIterator[AIMessageChunk]:
        config, outer = self._outer_run(config, is_async=True)
        chunks = super().astream(input, config, stop=stop, **kwargs)
        token = _OUTER_RUN.set(outer)
        try:
            first = await anext(chunks, _END)
        finally:
            _OUTER_RUN.reset(token)
        if first is _END:
            return
        yield first
        async for chunk in chunks:
            yield chunk

    # -- helpers -------------------------------------------------------------------------------
    def _inner_config(self, run_manager: Any | None) -> RunnableConfig:
        config: RunnableConfig = {"tags": list(_INNER_TAGS)}
        if run_manager is not None:
            config["callbacks"] = child_callbacks(run_manager)
        return config

    def _stop(self, stop: list[str] | None) -> list[str] | None:
        return stop if stop is not None else self.stop

    def _refuse(self, decision: RequestVerdict, *, chunk: bool = False) -> AIMessage:
        if self.on_block == "raise":
            raise self.guard.violation(decision)
        return refusal_message(self.refusal, metadata={METADATA_KEY: decision.summary()}, chunk=chunk)

    def _annotate(self, message: AIMessage, guarded: GuardedRequest) -> AIMessage:
        """Add the decision to ``response_metadata`` and, with prefill, keep the prefix in the text."""
        message = prepend_text(message, guarded.kept_prefix(message))
        return message.model_copy(update={"response_metadata": {**message.response_metadata, METADATA_KEY: guarded.decision.summary()}})

    # -- generation ----------------------------------------------------------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        run_manager = self._current_run_manager(run_manager, is_async=False)
        guarded = self.guard.sanitize(messages)
        emit_decision(guarded.decision, run_manager)
        if guarded.blocked:
            return ChatResult(generations=[ChatGeneration(message=self._refuse(guarded.decision))])
        answer = self.model.invoke(guarded.messages, config=self._inner_config(run_manager), stop=self._stop(stop), **kwargs)
        return ChatResult(generations=[ChatGeneration(message=self._annotate(answer, guarded))])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        run_manager = self._current_run_manager(run_manager, is_async=True)
        guarded = await self.guard.asanitize(messages)
        await aemit_decision(guarded.decision, run_manager)
        if guarded.blocked:
            return ChatResult(generations=[ChatGeneration(message=self._refuse(guarded.decision))])
        answer = await self.model.ainvoke(guarded.messages, config=self._inner_config(run_manager), stop=self._stop(stop), **kwargs)
        return ChatResult(generations=[ChatGeneration(message=self._annotate(answer, guarded))])

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        run_manager = self._current_run_manager(run_manager, is_async=False)
        guarded = self.guard.sanitize(messages)
        emit_decision(guarded.decision, run_manager)
        if guarded.blocked:
            yield ChatGenerationChunk(message=self._refuse(guarded.decision, chunk=True))
            return
        first = True
        for chunk in self.model.stream(guarded.messages, config=self._inner_config(run_manager), stop=self._stop(stop), **kwargs):
            if first:
                chunk, first = self._annotate(chunk, guarded), False
            yield ChatGenerationChunk(message=chunk)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        run_manager = self._current_run_manager(run_manager, is_async=True)
        guarded = await self.guard.asanitize(messages)
        await aemit_decision(guarded.decision, run_manager)
        if guarded.blocked:
            yield ChatGenerationChunk(message=self._refuse(guarded.decision, chunk=True))
            return
        first = True
        async for chunk in self.model.astream(guarded.messages, config=self._inner_config(run_manager), stop=self._stop(stop), **kwargs):
            if first:
                chunk, first = self._annotate(chunk, guarded), False
            yield ChatGenerationChunk(message=chunk)

    # -- tools and structured output: the wrapped model formats, the guard still runs first --
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Bind tools the way the wrapped model does; calls still go through the guard.

        The wrapped model formats the tools for its provider; the formatted arguments are
        bound to this model and handed to the wrapped model on every call, so blocked
        requests still get a refusal and streaming stays streaming.
        """
        if tool_choice is not None:
            kwargs["tool_choice"] = tool_choice
        bound = self.model.bind_tools(tools, **kwargs)
        if isinstance(bound, RunnableBinding) and bound.bound is self.model and not bound.config:
            return self.bind(**bound.kwargs)
        # An unusual bind_tools (extra steps, configs): keep it whole behind the guard Runnable.
        return self.guard | bound

    def with_structured_output(
        self, schema: dict[str, Any] | type, *, include_raw: bool = False, **kwargs: Any
    ) -> Runnable[LanguageModelInput, dict[str, Any] | Any]:
        """The wrapped model's structured output, behind the guard (a blocked request raises)."""
        return self.guard | self.model.with_structured_output(schema, include_raw=include_raw, **kwargs)

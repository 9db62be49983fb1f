"""``GuardAlignMiddleware``: GuardAlign in LangChain agents (``langchain.agents.create_agent``).

Before every model call the middleware checks the images in the conversation (user
uploads and images returned by tools alike), hands the model a sanitised copy (the
agent's state keeps the originals), adds the safety prompt to the system message when the
policy says so, and records the decision. A blocked call ends the run with a refusal or
raises, as configured. Needs the ``agents`` extra (``langchain>=1``).
"""

from __future__ import annotations

import operator
from dataclasses import replace
from collections.abc import Awaitable, Callable
from typing import Annotated, Any, Literal

from langchain.agents.middleware.types import (
    AgentMiddleware,
    AgentState,
    ExtendedModelResponse,
    ModelRequest,
    ModelResponse,
    OmitFromInput,
)
from langchain_core.messages import AIMessage
from langgraph.types import Command
from typing_extensions import NotRequired

from guardalign_core.config import GuardConfig

from ._messages import merge_system_text, prepend_text, refusal_message, role_of
from .guard import (
    DEFAULT_REFUSAL,
    METADATA_KEY,
    GuardAlignGuard,
    GuardedRequest,
    aemit_decision_in_context,
    coerce_guard,
    emit_decision_in_context,
)

STATE_KEY = "guardalign_decisions"
"""Agent-state key holding one decision summary per guarded model call."""


class GuardAlignState(AgentState[Any]):
    """Agent state with the guard's decisions (in the run's output, not its input)."""

    # LangGraph takes the reducer from the last Annotated item, so operator.add goes last.
    guardalign_decisions: NotRequired[Annotated[list[dict[str, Any]], OmitFromInput, operator.add]]


class GuardAlignMiddleware(AgentMiddleware[GuardAlignState, Any, Any]):
    """Sanitise the images the model sees at every step of an agent.

    Args:
        guard: a :class:`GuardAlignGuard`, or what builds one (preset name, config file,
            ``GuardConfig``); ``None`` uses the default configuration.
        action, fail_open: shortcuts for the guard's policy.
        on_block: ``"refuse"`` (default) ends the run with a refusal message; ``"raise"``
            raises :class:`~guardalign_core.errors.GuardAlignViolation`.
        refusal: text of the refusal.

    Each decision is dispatched as the ``guardalign_decision`` custom event and appended to
    the state key ``guardalign_decisions``.

    Example:
        >>> from langchain.agents import create_agent  # doctest: +SKIP
        >>> agent = create_agent(model, tools=[...], middleware=[GuardAlignMiddleware("fast-cpu")])  # doctest: +SKIP
        >>> agent.invoke({"messages": [user_message_with_image]})["guardalign_decisions"]  # doctest: +SKIP
    """

    state_schema = GuardAlignState

    def __init__(
        self,
        guard: GuardAlignGuard | GuardConfig | str | None = None,
        *,
        action: Literal["mask", "block", "flag"] | None = None,
        fail_open: bool | None = None,
        on_block: Literal["refuse", "raise"] = "refuse",
        refusal: str = DEFAULT_REFUSAL,
    ) -> None:
        super().__init__()
        if on_block not in ("refuse", "raise"):
            raise ValueError(f"on_block: expected 'refuse' or 'raise', got {on_block!r}")
        self.guard = coerce_guard(guard, action=action, fail_open=fail_open)
        self.on_block = on_block
        self.refusal = refusal

    def _messages(self, request: ModelRequest) -> list[Any]:
        """What the model will see, system message included (its images are screened too)."""
        return [request.system_message, *request.messages] if request.system_message is not None else list(request.messages)

    def _request(self, request: ModelRequest, guarded: GuardedRequest) -> tuple[ModelRequest, GuardedRequest]:
        """The request with sanitised messages and, when planned, the safety prompt; and the prefix to keep."""
        messages = list(guarded.messages or [])
        system = messages.pop(0) if request.system_message is not None else None
        delivery = guarded.decision.safety_prompt.delivery(role_of(messages[-1]) if messages else None)
        if delivery.system_text:
            system = merge_system_text(system, delivery.system_text)
        if delivery.prefill:
            messages.append(AIMessage(content=delivery.prefill))
        return request.override(messages=messages, system_message=system), replace(guarded, delivery=delivery)

    @staticmethod
    def _with_prefix(response: ModelResponse, guarded: GuardedRequest) -> ModelResponse:
        """Put a prefilled prefix back at the start of the answer, as GuardedChatModel does."""
        if not guarded.delivery.prefill:
            return response
        result = list(response.result)
        for i, message in enumerate(result):
            if isinstance(message, AIMessage):
                result[i] = prepend_text(message, guarded.kept_prefix(message))
                break
        return ModelResponse(result=result, structured_response=response.structured_response)

    def _blocked(self, guarded: GuardedRequest, update: dict[str, Any]) -> ExtendedModelResponse:
        if self.on_block == "raise":
            raise self.guard.violation(guarded.decision)
        refusal = refusal_message(self.refusal, metadata={METADATA_KEY: guarded.decision.summary()})
        return ExtendedModelResponse(model_response=ModelResponse(result=[refusal]), command=Command(update=update))

    def wrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], ModelResponse]
    ) -> ExtendedModelResponse:
        """Guard the request, then call the model with the sanitised copy (or refuse)."""
        guarded = self.guard.sanitize(self._messages(request), safety_prompt=False)
        emit_decision_in_context(guarded.decision)
        update = {STATE_KEY: [guarded.decision.summary()]}
        if guarded.blocked:
            return self._blocked(guarded, update)
        sanitised, kept = self._request(request, guarded)
        return ExtendedModelResponse(model_response=self._with_prefix(handler(sanitised), kept), command=Command(update=update))

    async def awrap_model_call(
        self, request: ModelRequest, handler: Callable[[ModelRequest], Awaitable[ModelResponse]]
    ) -> ExtendedModelResponse:
        """Async :meth:`wrap_model_call`; the scan runs off the event loop."""
        guarded = await self.guard.asanitize(self._messages(request), safety_prompt=False)
        await aemit_decision_in_context(guarded.decision)
        update = {STATE_KEY: [guarded.decision.summary()]}
        if guarded.blocked:
            return self._blocked(guarded, update)
        sanitised, kept = self._request(request, guarded)
        return ExtendedModelResponse(model_response=self._with_prefix(await handler(sanitised), kept), command=Command(update=update))

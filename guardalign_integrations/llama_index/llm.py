"""``GuardAlignLLM``: put GuardAlign in front of any LlamaIndex LLM (the black-box fallback, DESIGN §1C).

Every :class:`~llama_index.core.base.llms.types.ImageBlock` in the chat messages is scanned
(all images of a request in one batch) and masked, blocked or flagged before the wrapped
model sees it; the safety prefix is delivered by prompt per the prefix policy. The wrapper
is a LlamaIndex ``LLM`` (a ``FunctionCallingLLM`` when the wrapped model is one), so it drops
into query engines, chat engines and agents unchanged.

The screening and response plumbing (:class:`~._endpoints.GuardedEndpoints`) is shared with
:class:`~guardalign_integrations.llama_index.multi_modal.GuardAlignMultiModalLLM` and
:class:`~guardalign_integrations.llama_index.local_llm.GuardAlignLocalLLM`.
"""

from __future__ import annotations

import warnings

from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, Sequence

from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    LLMMetadata,
    MessageRole,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr, SerializeAsAny
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.function_calling import FunctionCallingLLM
from llama_index.core.llms.llm import LLM, ToolSelection
from llama_index.core.tools.types import BaseTool

from guardalign_core.guard import ImageGuard

from ._endpoints import METADATA_KEY, GuardedEndpoints, GuardedRequest, GuardSpec, _aone, _one, build_guard
from ._messages import DEFAULT_REFUSAL

if TYPE_CHECKING:
    from .local_llm import GuardAlignLocalLLM

__all__ = ["METADATA_KEY", "GuardAlignFunctionCallingLLM", "GuardAlignLLM", "GuardSpec", "GuardedEndpoints", "GuardedRequest", "build_guard"]


class GuardAlignLLM(GuardedEndpoints, LLM):
    """Any LlamaIndex LLM behind GuardAlign's image guard (black-box fallback, DESIGN §1C).

    Images in ``ChatMessage.blocks`` (bytes, path or URL; URLs fetched only if the guard's
    image limits allow the host) are scanned in one batch per request, then masked, blocked
    or flagged per the policy before the wrapped model sees them; the safety prefix is added
    by prompt per the prefix policy (default ``when_unsafe``). Every response carries the
    decision summary in ``additional_kwargs["guardalign"]`` and every image produces a
    :class:`~guardalign_integrations.llama_index.events.GuardAlignDecisionEvent`.

    Wrapping a ``FunctionCallingLLM`` gives a :class:`GuardAlignFunctionCallingLLM` (a
    subclass of both), so ``FunctionAgent`` and structured prediction keep working.

    Args:
        llm: the LlamaIndex LLM to guard.
        config: a preset name, config file or :class:`GuardConfig` (default: ``GuardConfig()``).
        guard: what the LangChain adapters accept: an existing :class:`ImageGuard` to share, a
            preset name, a config file, a :class:`GuardConfig` or its dict (instead of ``config``);
            anything else fails here, not at the first image.
        action: shortcut for ``config.policy.action``: ``"mask"`` (default), ``"block"``, ``"flag"``.
        fail_open: shortcut for ``config.policy.fail_open`` (default ``False``: an image that
            cannot be checked blocks the request).
        on_block: ``"refuse"`` (default) returns :attr:`refusal` as the answer;
            ``"raise"`` raises :class:`~guardalign_core.errors.GuardAlignViolation`.
        refusal: the assistant text of a refusal (the LangChain adapters' name; the old
            ``refusal_text`` still works, with a ``DeprecationWarning``).
        reuse_checked: reuse this guard's verdicts on inline images and files it already
            checked, and pass on images it sanitised itself unchanged (default ``True``).
        **kwargs: other ``LLM`` fields (``system_prompt`` defaults to the wrapped model's).

    Raises:
        TypeError: ``llm`` is not a LlamaIndex ``LLM`` (wrap a legacy ``MultiModalLLM``
            with :class:`GuardAlignMultiModalLLM`).

    Example:
        >>> from llama_index.core.llms import ChatMessage, ImageBlock, TextBlock
        >>> from llama_index.llms.openai import OpenAI  # doctest: +SKIP
        >>> llm = GuardAlignLLM(OpenAI(model="gpt-4o-mini"), "fast-cpu")  # doctest: +SKIP
        >>> msg = ChatMessage(role="user", blocks=[ImageBlock(path="photo.jpg"), TextBlock(text="What is this?")])
        >>> response = llm.chat([msg])  # doctest: +SKIP
        >>> response.additional_kwargs["guardalign"]["decision"]  # doctest: +SKIP
        'allow'
    """

    llm: SerializeAsAny[LLM] = Field(description="The wrapped LlamaIndex LLM; it only ever sees sanitised images.")
    on_block: Literal["refuse", "raise"] = Field(
        "refuse", description="On a blocked request: return a refusal ('refuse') or raise GuardAlignViolation ('raise')."
    )
    refusal: str = Field(DEFAULT_REFUSAL, description="The assistant text returned for a blocked request (same name as the LangChain adapters').")
    allow_block_types: tuple[str, ...] = Field(
        (), description="Block types forwarded unscreened although they may carry images (default deny), e.g. ('DocumentBlock',) for PDFs."
    )
    reuse_checked: bool = Field(
        True, description="Do not rescan inline images this guard already checked or sanitised (chat history, RAG postprocessor output)."
    )

    _guard: ImageGuard = PrivateAttr()

    def __new__(cls, *args: Any, **kwargs: Any) -> "GuardAlignLLM":
        inner = args[0] if args else kwargs.get("llm")
        target = GuardAlignFunctionCallingLLM if cls is GuardAlignLLM and isinstance(inner, FunctionCallingLLM) else cls
        return super().__new__(target)

    def __init__(
        self,
        llm: LLM,
        config: GuardSpec = None,
        *,
        guard: GuardSpec = None,
        action: Literal["mask", "block", "flag"] | None = None,
        fail_open: bool | None = None,
        **kwargs: Any,
    ) -> None:
        if "refusal_text" in kwargs:
            warnings.warn("refusal_text is renamed refusal (as in the LangChain adapters)", DeprecationWarning, stacklevel=2)
            kwargs["refusal"] = kwargs.pop("refusal_text")
        built = build_guard(config, guard=guard, action=action, fail_open=fail_open)  # fails here, not at the first image
        if not isinstance(llm, LLM):
            hint = " (use GuardAlignMultiModalLLM for a legacy MultiModalLLM)" if not isinstance(llm, BaseLLM) else ""
            raise TypeError(f"llm: expected a LlamaIndex LLM, got {type(llm).__name__}{hint}")
        kwargs.setdefault("system_prompt", llm.system_prompt)
        super().__init__(llm=llm, **kwargs)
        self._guard = built

    @classmethod
    def class_name(cls) -> str:
        return "GuardAlignLLM"

    @staticmethod
    def from_hf(model: str | Path, config: GuardSpec = None, **kwargs: Any) -> "GuardAlignLocalLLM":
        """The full method on a local Hugging Face LVLM (detection, masking, prefix, calibration).

        Returns a :class:`~guardalign_integrations.llama_index.local_llm.GuardAlignLocalLLM`
        (same screening, events and block handling as this class; the model loads lazily).

        Example:
            >>> llm = GuardAlignLLM.from_hf("llava-hf/llava-1.5-7b-hf", "default", device="cuda")  # doctest: +SKIP
        """
        from .local_llm import GuardAlignLocalLLM

        return GuardAlignLocalLLM(model, config, **kwargs)

    @property
    def metadata(self) -> LLMMetadata:
        """The wrapped model's metadata, with ``is_chat_model=True`` (images travel as chat blocks)."""
        inner = self.llm.metadata
        calls_functions = inner.is_function_calling_model and isinstance(self, FunctionCallingLLM)
        return inner.model_copy(update={"is_chat_model": True, "is_function_calling_model": calls_functions})

    def _system_role(self) -> MessageRole:
        return self.llm.metadata.system_role

    # -- chat --------------------------------------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        request = self._screen(messages)
        if request.blocked:
            return self._refusal_chat(request)
        return self._finish_chat(self.llm.chat(request.messages, **kwargs), request)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        request = self._screen(messages)
        if request.blocked:
            return _one(self._refusal_chat(request))
        return self._chat_stream(self.llm.stream_chat(request.messages, **kwargs), request)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        request = await self._ascreen(messages)
        if request.blocked:
            return self._refusal_chat(request)
        return self._finish_chat(await self.llm.achat(request.messages, **kwargs), request)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        request = await self._ascreen(messages)
        if request.blocked:
            return _aone(self._refusal_chat(request))
        return self._chat_astream(await self.llm.astream_chat(request.messages, **kwargs), request)

    # -- completion (text only: the prefix policy applies, there is nothing to scan) ---------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        prompt, request = self._text_only(prompt)
        return self._finish_completion(self.llm.complete(prompt, formatted=formatted, **kwargs), request)

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        prompt, request = self._text_only(prompt)
        return self._completion_stream(self.llm.stream_complete(prompt, formatted=formatted, **kwargs), request)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        prompt, request = self._text_only(prompt)
        return self._finish_completion(await self.llm.acomplete(prompt, formatted=formatted, **kwargs), request)

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        prompt, request = self._text_only(prompt)
        return self._completion_astream(await self.llm.astream_complete(prompt, formatted=formatted, **kwargs), request)


class GuardAlignFunctionCallingLLM(GuardAlignLLM, FunctionCallingLLM):
    """:class:`GuardAlignLLM` around a ``FunctionCallingLLM``: tool calling delegates to the wrapped model.

    ``chat_with_tools`` and its async and streaming forms go through the guarded ``chat``
    endpoints, so images in the chat history are screened on every agent step; tool
    preparation and tool-call parsing are the wrapped model's own. ``GuardAlignLLM(llm)``
    returns this class automatically when ``llm`` is a ``FunctionCallingLLM``.

    Example:
        >>> from llama_index.core.agent.workflow import FunctionAgent
        >>> agent = FunctionAgent(tools=[...], llm=GuardAlignLLM(OpenAI(model="gpt-4o-mini")))  # doctest: +SKIP
    """

    llm: SerializeAsAny[FunctionCallingLLM] = Field(description="The wrapped function-calling LLM.")

    @classmethod
    def class_name(cls) -> str:
        return "GuardAlignFunctionCallingLLM"

    def _prepare_chat_with_tools(
        self,
        tools: Sequence[BaseTool],
        user_msg: str | ChatMessage | None = None,
        chat_history: list[ChatMessage] | None = None,
        verbose: bool = False,
        allow_parallel_tool_calls: bool = False,
        tool_required: bool = False,
        **kwargs: Any,
    ) -> dict[str, Any]:
        return self.llm._prepare_chat_with_tools_compat(
            tools,
            user_msg=user_msg,
            chat_history=chat_history,
            verbose=verbose,
            allow_parallel_tool_calls=allow_parallel_tool_calls,
            tool_required=tool_required,
            **kwargs,
        )

    def _validate_chat_with_tools_response(
        self, response: ChatResponse, tools: Sequence[BaseTool], allow_parallel_tool_calls: bool = False, **kwargs: Any
    ) -> ChatResponse:
        return self.llm._validate_chat_with_tools_response(
            response, tools, allow_parallel_tool_calls=allow_parallel_tool_calls, **kwargs
        )

    def get_tool_calls_from_response(
        self, response: ChatResponse, error_on_no_tool_call: bool = True, **kwargs: Any
    ) -> list[ToolSelection]:
        return self.llm.get_tool_calls_from_response(response, error_on_no_tool_call=error_on_no_tool_call, **kwargs)

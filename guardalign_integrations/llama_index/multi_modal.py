"""``GuardAlignMultiModalLLM``: the guard behind LlamaIndex's legacy ``MultiModalLLM`` interface.

For code that still calls ``complete(prompt, image_documents)`` or uses the deprecated
``SimpleMultiModalQueryEngine``. It is thin: the same screening, block handling and
response annotation as :class:`~guardalign_integrations.llama_index.llm.GuardAlignLLM`,
around either a legacy ``MultiModalLLM`` or a modern chat ``LLM`` (image documents are then
sent as image blocks of one user message).
"""

from __future__ import annotations

import warnings

import asyncio
from typing import Any, ClassVar, Literal, Sequence, Union

from llama_index.core.base.llms.base import BaseLLM
from llama_index.core.base.llms.types import (
    ChatMessage,
    ChatResponse,
    ChatResponseAsyncGen,
    ChatResponseGen,
    CompletionResponse,
    CompletionResponseAsyncGen,
    CompletionResponseGen,
    ImageBlock,
    MessageRole,
    TextBlock,
)
from llama_index.core.bridge.pydantic import Field, PrivateAttr, SerializeAsAny
from llama_index.core.constants import DEFAULT_NUM_INPUT_FILES
from llama_index.core.multi_modal_llms.base import MultiModalLLM, MultiModalLLMMetadata
from llama_index.core.schema import BaseNode, ImageNode

from guardalign_core.guard import ImageGuard

from ._messages import (
    DEFAULT_REFUSAL,
    apply_safety_prompt,
    apply_safety_to_prompt,
    forwarded_node,
    image_document_to_block,
    node_image,
)
from .events import Component
from ._endpoints import GuardedEndpoints, GuardedRequest, GuardSpec, _amap_stream, _aone, _map_stream, _one, build_guard

ImageDocument = Union[ImageNode, BaseNode, ImageBlock]
"""A legacy image document: an ``ImageNode``, LlamaIndex's own ``ImageDocument`` (any node with an ``image_resource``), or an ``ImageBlock``."""


def _as_completion(response: ChatResponse) -> CompletionResponse:
    """A chat response (or stream chunk) in completion form."""
    return CompletionResponse(
        text=response.message.content or "",
        delta=response.delta,
        raw=response.raw,
        logprobs=response.logprobs,
        additional_kwargs=dict(response.additional_kwargs),
    )


class GuardAlignMultiModalLLM(GuardedEndpoints, MultiModalLLM):
    """A legacy ``MultiModalLLM`` whose image documents and chat images are screened first.

    ``complete(prompt, image_documents)`` scans the documents (``ImageNode`` or
    ``ImageBlock``; base64, path, or URL if allowed) in one batch and forwards sanitised
    ones of the same type; the chat endpoints behave exactly as :class:`GuardAlignLLM`'s.
    All eight endpoints exist; LlamaIndex's ``MultiModalLLM`` base adds its callback
    decorators to them.

    Args:
        llm: the model to guard: a legacy ``MultiModalLLM``, or a chat ``LLM`` (then
            ``complete`` sends the images and prompt as one user message).
        config, guard, action, fail_open, on_block, refusal, reuse_checked: as for
            :class:`GuardAlignLLM`.

    Example:
        >>> from llama_index.core.query_engine import SimpleMultiModalQueryEngine
        >>> mm = GuardAlignMultiModalLLM(OpenAI(model="gpt-4o-mini"), "fast-cpu")  # doctest: +SKIP
        >>> engine = SimpleMultiModalQueryEngine(retriever, multi_modal_llm=mm)  # doctest: +SKIP
    """

    _component: ClassVar[Component] = "multi_modal_llm"

    llm: SerializeAsAny[Union[BaseLLM, MultiModalLLM]] = Field(description="The wrapped model (legacy MultiModalLLM or chat LLM).")
    on_block: Literal["refuse", "raise"] = Field(
        "refuse", description="On a blocked request: return a refusal ('refuse') or raise GuardAlignViolation ('raise')."
    )
    refusal: str = Field(DEFAULT_REFUSAL, description="The assistant text returned for a blocked request (same name as the LangChain adapters').")
    allow_block_types: tuple[str, ...] = Field(
        (), description="Block types forwarded unscreened although they may carry images (default deny), e.g. ('DocumentBlock',) for PDFs."
    )
    reuse_checked: bool = Field(True, description="Do not rescan inline images this guard already checked or sanitised.")
    rate_limiter: Any = Field(
        default=None, exclude=True, description="Read by LlamaIndex's callback decorators (MultiModalLLM lacks it); unused."
    )

    _guard: ImageGuard = PrivateAttr()

    def __init__(
        self,
        llm: BaseLLM | MultiModalLLM,
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
        if not isinstance(llm, (BaseLLM, MultiModalLLM)):
            raise TypeError(f"llm: expected a LlamaIndex LLM or MultiModalLLM, got {type(llm).__name__}")
        super().__init__(llm=llm, **kwargs)
        self._guard = built

    @classmethod
    def class_name(cls) -> str:
        return "guardalign_multi_modal_llm"

    @property
    def metadata(self) -> MultiModalLLMMetadata:
        """The wrapped model's limits and name, as a chat model."""
        inner = self.llm.metadata
        return MultiModalLLMMetadata(
            context_window=inner.context_window,
            num_output=inner.num_output,
            num_input_files=getattr(inner, "num_input_files", DEFAULT_NUM_INPUT_FILES),
            model_name=inner.model_name,
            is_chat_model=True,
            is_function_calling_model=False,
        )

    def to_payload(self) -> dict[str, Any]:
        """What LlamaIndex's callback decorators report about this model (``MultiModalLLM`` lacks it)."""
        return {"class_name": self.class_name(), **self.metadata.model_dump()}

    def _system_role(self) -> MessageRole:
        return getattr(self.llm.metadata, "system_role", MessageRole.SYSTEM)

    # -- legacy image documents --------------------------------------------------------------
    def _screen_documents(self, documents: Sequence[ImageDocument]) -> tuple[GuardedRequest, list[ImageDocument]]:
        """Screen the documents in one batch; returns the request record and the documents to forward."""
        docs = list(documents)
        for i, doc in enumerate(docs):
            if not isinstance(doc, (BaseNode, ImageBlock)):
                raise TypeError(f"image_documents[{i}]: expected an image node, ImageDocument or ImageBlock, got {type(doc).__name__}")
        decision = self._verdict([node_image(d, f"image_documents[{i}]") for i, d in enumerate(docs)])
        request = self._request(decision, [])
        if decision.blocked:
            return request, docs
        forwarded = [forwarded_node(d, entry) for d, entry in zip(docs, decision.images)]
        return request, [d for d in forwarded if d is not None]

    async def _ascreen_documents(self, documents: Sequence[ImageDocument]) -> tuple[GuardedRequest, list[ImageDocument]]:
        if not documents:
            return self._screen_documents(documents)
        return await asyncio.to_thread(self._screen_documents, documents)

    def _as_messages(self, prompt: str, documents: list[ImageDocument], request: GuardedRequest) -> list[ChatMessage]:
        """One user message (sanitised images, then the prompt) plus the safety prompt, for a chat inner model."""
        blocks: list[Any] = [image_document_to_block(d) for d in documents]
        message = ChatMessage(role=MessageRole.USER, blocks=[*blocks, TextBlock(text=prompt)])
        messages, _ = apply_safety_prompt([message], request.decision.safety_prompt, system_role=self._system_role())
        return messages

    def _legacy_prompt(self, prompt: str, request: GuardedRequest) -> str:
        return apply_safety_to_prompt(prompt, request.decision.safety_prompt)

    # -- completion (images as documents) ----------------------------------------------------
    def complete(self, prompt: str, image_documents: list[ImageDocument], **kwargs: Any) -> CompletionResponse:
        request, docs = self._screen_documents(image_documents)
        if request.blocked:
            return self._refusal_completion(request)
        if isinstance(self.llm, MultiModalLLM):
            response = self.llm.complete(self._legacy_prompt(prompt, request), docs, **kwargs)
        else:
            response = _as_completion(self.llm.chat(self._as_messages(prompt, docs, request), **kwargs))
        return self._finish_completion(response, request)

    def stream_complete(self, prompt: str, image_documents: list[ImageDocument], **kwargs: Any) -> CompletionResponseGen:
        request, docs = self._screen_documents(image_documents)
        if request.blocked:
            return _one(self._refusal_completion(request))
        if isinstance(self.llm, MultiModalLLM):
            stream = self.llm.stream_complete(self._legacy_prompt(prompt, request), docs, **kwargs)
        else:
            chat_stream = self.llm.stream_chat(self._as_messages(prompt, docs, request), **kwargs)
            stream = _map_stream(chat_stream, lambda chunk, _: _as_completion(chunk))
        return self._completion_stream(stream, request)

    async def acomplete(self, prompt: str, image_documents: list[ImageDocument], **kwargs: Any) -> CompletionResponse:
        request, docs = await self._ascreen_documents(image_documents)
        if request.blocked:
            return self._refusal_completion(request)
        if isinstance(self.llm, MultiModalLLM):
            response = await self.llm.acomplete(self._legacy_prompt(prompt, request), docs, **kwargs)
        else:
            response = _as_completion(await self.llm.achat(self._as_messages(prompt, docs, request), **kwargs))
        return self._finish_completion(response, request)

    async def astream_complete(
        self, prompt: str, image_documents: list[ImageDocument], **kwargs: Any
    ) -> CompletionResponseAsyncGen:
        request, docs = await self._ascreen_documents(image_documents)
        if request.blocked:
            return _aone(self._refusal_completion(request))
        if isinstance(self.llm, MultiModalLLM):
            stream = await self.llm.astream_complete(self._legacy_prompt(prompt, request), docs, **kwargs)
        else:
            chat_stream = await self.llm.astream_chat(self._as_messages(prompt, docs, request), **kwargs)
            stream = _amap_stream(chat_stream, lambda chunk, _: _as_completion(chunk))
        return self._completion_astream(stream, request)

    # -- chat (images as blocks, as GuardAlignLLM) -------------------------------------------
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        request = self._screen(messages)
        if request.blocked:
            return self._refusal_chat(request)
        return self._finish_chat(self.llm.chat(request.messages, **kwargs), request)

    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        request = self._screen(messages)
        if request.blocked:
            return _one(self._refusal_chat(request))
        return self._chat_stream(self.llm.stream_chat(request.messages, **kwargs), request)

    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        request = await self._ascreen(messages)
        if request.blocked:
            return self._refusal_chat(request)
        return self._finish_chat(await self.llm.achat(request.messages, **kwargs), request)

    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        request = await self._ascreen(messages)
        if request.blocked:
            return _aone(self._refusal_chat(request))
        return self._chat_astream(await self.llm.astream_chat(request.messages, **kwargs), request)

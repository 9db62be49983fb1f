"""``GuardAlignLocalLLM``: the full method on a local Hugging Face LVLM, as a LlamaIndex LLM.

Images in ``ChatMessage.blocks`` are screened exactly as by :class:`GuardAlignLLM` (one batch
per request, decision events, fail closed); the checked request then goes to
:class:`~guardalign_core.pipeline.GuardAlignPipeline`, which adds the safety prefix and
generates with the prefix's attention calibrated (DESIGN §1B). Nothing loads at
construction; the weights load on the first call and are shared by every adapter on the
same checkpoint. Token counts are in ``raw["usage"]`` (read by LlamaIndex's
``TokenCountingHandler``) and in ``additional_kwargs``.
"""

from __future__ import annotations

import warnings

import asyncio
import threading
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Iterator, Literal, Sequence, TypeVar

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
from llama_index.core.bridge.pydantic import Field, PrivateAttr
from llama_index.core.llms.callbacks import llm_chat_callback, llm_completion_callback
from llama_index.core.llms.llm import LLM

from guardalign_core.calibration import CalibrationConfig, calibration_with
from guardalign_core.config import PrefixConfig
from guardalign_core.guard import ImageGuard
from guardalign_core.lvlm import GenerationOptions, LocalLVLM
from guardalign_core.pipeline import CheckedRequest, GuardAlignPipeline, GuardRecord, to_checked_request
from guardalign_core.runners import get_local_lvlm

from ._messages import DEFAULT_REFUSAL, hf_turns
from ._endpoints import METADATA_KEY, GuardedEndpoints, GuardedRequest, GuardSpec, build_guard

__all__ = ["GENERATION_KEY", "GuardAlignLocalLLM"]

GENERATION_KEY = "guardalign_generation"
"""Key of the generation record (prefix, calibration, tokens, timings); ``"guardalign"`` holds the one verdict summary."""

_T = TypeVar("_T")
_U = TypeVar("_U")


class GuardAlignLocalLLM(GuardedEndpoints, LLM):
    """GuardAlign end to end on a local vision-language model: detect, mask, prefix, calibrate.

    Args:
        model: a Hugging Face hub id (``"llava-hf/llava-1.5-7b-hf"``) or a local folder.
        config: the guard's preset name, config file or ``GuardConfig``; or share an
            :class:`ImageGuard` with ``guard=``. ``action``/``fail_open`` are policy shortcuts.
        calibration: attention-calibration strength and layers (default: the paper's middle layers);
            ``gamma``/``layers`` are shortcuts for its fields, as ``action``/``fail_open`` are for
            the guard's policy (a shortcut that disagrees with ``calibration`` is a ``ValueError``).
        prefix: the safety prefix and its policy (default ``None``: the guard config's prefix
            text and placement, on every request, as the start of the answer by default).
        **kwargs: the fields below (``device``, ``max_new_tokens``, ``temperature``, ...).

    Also built with :meth:`GuardAlignLLM.from_hf <guardalign_integrations.llama_index.GuardAlignLLM.from_hf>`.

    Prompts: the model's own chat template renders every request, so LlamaIndex's
    ``messages_to_prompt`` and ``completion_to_prompt`` are not used. ``complete`` and its
    stream/async forms send the prompt as one user turn, after ``system_prompt`` (when set) as
    a system turn, unless ``formatted=True``; ``chat`` sends the messages as given (LlamaIndex's
    ``predict`` and chat engines add ``system_prompt`` themselves). ``MODEL``/``CHATBOT``
    turns are assistant turns; ``TOOL``/``FUNCTION`` turns are user turns labelled as tool results.

    Per-call keywords: ``max_new_tokens`` (or ``max_tokens``), ``temperature``, ``top_p``,
    ``stop`` (a string or a list of strings) and ``seed``; anything else must be a
    ``model.generate`` option, and an unknown one raises ``TypeError`` before any image is scanned.

    Token counts (``raw["usage"]``): ``prompt_tokens`` is the whole model input, image tokens
    included, and the safety prefix too (also when it is placed in the response: it is
    prefilled, not generated); ``completion_tokens`` counts generated tokens only, although the
    returned text starts with the prefix when it is kept in the output.

    Streams: breaking out of ``stream_chat``/``stream_complete`` (or ``close()``), and
    ``aclose()`` of the async ones (or dropping them after leaving ``async for``), stop the
    generation after its current step.

    Example:
        >>> llm = GuardAlignLocalLLM("llava-hf/llava-1.5-7b-hf", "default", device="cuda")  # doctest: +SKIP
        >>> msg = ChatMessage(role="user", blocks=[ImageBlock(path="photo.jpg"), TextBlock(text="What is this?")])
        >>> response = llm.chat([msg])  # doctest: +SKIP
        >>> response.raw["guardalign"]["calibration"], response.raw["usage"]  # doctest: +SKIP
    """

    model: str = Field(description="Hub id or local folder of the vision-language model.")
    device: str = Field("cpu", description="Torch device for the model, e.g. 'cuda'.")
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field("auto", description="Weights dtype ('auto': the checkpoint's).")
    trust_remote_code: bool = Field(False, description="Passed to the transformers Auto classes.")
    max_concurrent_generations: int | None = Field(
        None, ge=1, description="Most generations at once on this checkpoint (shared by its users; None: no limit). Bounds GPU memory."
    )
    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig, description="Prefix attention calibration (Eqs. 12–14).")
    prefix: PrefixConfig | None = Field(
        None,
        description="The safety prefix and its policy; None: the guard config's prefix, on every request (the paper's setting).",
    )
    max_new_tokens: int = Field(256, ge=1, description="Most tokens to generate per answer.")
    temperature: float = Field(0.0, ge=0, description="Sampling temperature; 0 is greedy decoding.")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with temperature > 0).")
    stop: list[str] = Field(default_factory=list, description="Stop strings.")
    seed: int | None = Field(None, description="Seed for sampling.")
    generate_kwargs: dict[str, Any] = Field(default_factory=dict, description="Extra keyword arguments for model.generate.")
    context_window: int = Field(4096, gt=0, description="Reported in metadata for LlamaIndex's prompt packing.")
    on_block: Literal["refuse", "raise"] = Field("refuse", description="On a blocked request: a refusal answer, or raise GuardAlignViolation.")
    refusal: str = Field(DEFAULT_REFUSAL, description="The assistant text returned for a blocked request (same name as the LangChain adapters').")
    allow_block_types: tuple[str, ...] = Field(
        (), description="Block types forwarded unscreened although they may carry images (default deny), e.g. ('DocumentBlock',) for PDFs."
    )
    reuse_checked: bool = Field(True, description="Do not rescan inline images this guard already checked or sanitised.")

    _guard: ImageGuard = PrivateAttr()

    def __init__(
        self,
        model: str | Path,
        config: GuardSpec = None,
        *,
        guard: GuardSpec = None,
        action: Literal["mask", "block", "flag"] | None = None,
        fail_open: bool | None = None,
        gamma: float | None = None,
        layers: list[int] | tuple[float, float] | None = None,
        **kwargs: Any,
    ) -> None:
        if "refusal_text" in kwargs:
            warnings.warn("refusal_text is renamed refusal (as in the LangChain adapters)", DeprecationWarning, stacklevel=2)
            kwargs["refusal"] = kwargs.pop("refusal_text")
        built = build_guard(config, guard=guard, action=action, fail_open=fail_open)  # fails here, not at the first image
        if gamma is not None or layers is not None:
            kwargs["calibration"] = calibration_with(kwargs.get("calibration"), gamma=gamma, layers=layers)
        super().__init__(model=str(model), **kwargs)
        self._guard = built

    @classmethod
    def class_name(cls) -> str:
        return "GuardAlignLocalLLM"

    @property
    def metadata(self) -> LLMMetadata:
        return LLMMetadata(
            context_window=self.context_window, num_output=self.max_new_tokens, is_chat_model=True, model_name=self.model
        )

    @property
    def lvlm(self) -> LocalLVLM:
        """The process-wide runner for this checkpoint (shared by every adapter on it; loads lazily)."""
        return get_local_lvlm(
            self.model, device=self.device, dtype=self.dtype, backend=self.calibration.backend,
            trust_remote_code=self.trust_remote_code, max_concurrent=self.max_concurrent_generations,
        )

    @property
    def pipeline(self) -> GuardAlignPipeline:
        """Detector + calibrated runner with this adapter's current settings (built per call; cheap).

        Nothing is cached on the adapter, so ``model_copy(update=...)`` and ``copy.deepcopy``
        give adapters that use their own settings; the weights stay shared.
        """
        return GuardAlignPipeline(self.lvlm, self._guard, prefix=self.prefix, calibration=self.calibration, refusal=self.refusal)

    @property
    def is_loaded(self) -> bool:
        """Whether this checkpoint's weights are in memory (loaded by any adapter sharing them)."""
        return self.lvlm.is_loaded

    # -- request -> local model ------------------------------------------------------------
    def _screen_local(self, messages: Sequence[ChatMessage]) -> tuple[GuardedRequest, CheckedRequest | None]:
        """Screen (one batch, events) and decide; when not blocked, the request in the runner's format.

        The model gets the pixels the guard checked (masked or not), decoded at most once, never
        a second read of the source; what may not be shown (blocked, or unchecked) is left out.
        """
        found = self._find(messages)
        decision = self._verdict([f.image for f in found])
        request = self._request(decision, [])
        if decision.blocked:
            return request, None
        return request, to_checked_request(hf_turns(messages, found), decision)

    def _options(self, kwargs: dict[str, Any]) -> tuple[GenerationOptions, dict[str, Any]]:
        """Decoding options and the extra ``model.generate`` keywords, validated (before any scan).

        Raises:
            TypeError: a keyword ``model.generate`` does not take, or one the runner sets.
        """
        extra = {**self.generate_kwargs, **kwargs}
        extra.pop("formatted", None)
        defaults = GenerationOptions(max_new_tokens=self.max_new_tokens, temperature=self.temperature, top_p=self.top_p,
                                     stop=list(self.stop), seed=self.seed)
        return GenerationOptions.from_call(defaults, extra)

    @staticmethod
    def _usage(record: GuardRecord) -> dict[str, int]:
        return {
            "prompt_tokens": record.input_tokens,
            "completion_tokens": record.output_tokens,
            "total_tokens": record.input_tokens + record.output_tokens,
        }

    def _extras(self, record: GuardRecord, request: GuardedRequest) -> tuple[dict[str, Any], dict[str, Any]]:
        """(raw, additional_kwargs) of a finished answer: the one verdict summary, the generation record, the token counts."""
        usage = self._usage(record)
        generation = record.generation()
        raw = {"usage": usage, METADATA_KEY: request.summary, GENERATION_KEY: generation, "model": self.model}
        return raw, {METADATA_KEY: request.summary, GENERATION_KEY: generation, **usage}

    def _chat_local(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> ChatResponse:
        options, extra = self._options(kwargs)
        request, checked = self._screen_local(messages)
        if checked is None:
            return self._refusal_chat(request)
        result = self.pipeline.generate(checked, options=options, calibration=self.calibration, **extra)
        raw, additional = self._extras(result.record, request)
        return ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=result.text), raw=raw, additional_kwargs=additional)

    def _stream_local(self, messages: Sequence[ChatMessage], kwargs: dict[str, Any]) -> Iterator[ChatResponse]:
        """Validate the options now (a bad keyword raises at the call); scan and generate as it is iterated."""
        options, extra = self._options(kwargs)
        return self._stream_checked(messages, options, extra)

    def _stream_checked(self, messages: Sequence[ChatMessage], options: GenerationOptions, extra: dict[str, Any]) -> Iterator[ChatResponse]:
        request, checked = self._screen_local(messages)
        if checked is None:
            yield self._refusal_chat(request)
            return
        stream = self.pipeline.stream(checked, options=options, calibration=self.calibration, **extra)
        deltas = iter(stream)
        text = ""
        try:
            for delta in deltas:
                text += delta
                yield ChatResponse(
                    message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta=delta, additional_kwargs={METADATA_KEY: request.summary}
                )
        finally:
            close = getattr(deltas, "close", None)
            if close is not None:
                close()  # the consumer stopped early (or it is done): the generation stops
        assert stream.record is not None  # complete once the deltas are exhausted
        raw, additional = self._extras(stream.record, request)
        yield ChatResponse(message=ChatMessage(role=MessageRole.ASSISTANT, content=text), delta="", raw=raw, additional_kwargs=additional)

    def _prompt_messages(self, prompt: str, formatted: bool) -> list[ChatMessage]:
        """A completion prompt as chat: ``system_prompt`` (unless ``formatted``), then the prompt as the user turn."""
        user = ChatMessage(role=MessageRole.USER, content=prompt)
        if formatted or not self.system_prompt:
            return [user]
        return [ChatMessage(role=MessageRole.SYSTEM, content=self.system_prompt), user]

    @staticmethod
    def _as_completion(response: ChatResponse) -> CompletionResponse:
        return CompletionResponse(
            text=response.message.content or "", delta=response.delta, raw=response.raw, additional_kwargs=response.additional_kwargs
        )

    # -- chat --------------------------------------------------------------------------------
    @llm_chat_callback()
    def chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return self._chat_local(messages, kwargs)

    @llm_chat_callback()
    def stream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseGen:
        return _closing_map(self._stream_local(messages, kwargs), lambda r: r)

    @llm_chat_callback()
    async def achat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponse:
        return await asyncio.to_thread(self._chat_local, messages, kwargs)

    @llm_chat_callback()
    async def astream_chat(self, messages: Sequence[ChatMessage], **kwargs: Any) -> ChatResponseAsyncGen:
        return _in_thread(self._stream_local(messages, kwargs))

    # -- completion: the prompt is one user turn through the model's chat template -----------
    @llm_completion_callback()
    def complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._as_completion(self._chat_local(self._prompt_messages(prompt, formatted), kwargs))

    @llm_completion_callback()
    def stream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseGen:
        return _closing_map(self._stream_local(self._prompt_messages(prompt, formatted), kwargs), self._as_completion)

    @llm_completion_callback()
    async def acomplete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponse:
        return self._as_completion(await asyncio.to_thread(self._chat_local, self._prompt_messages(prompt, formatted), kwargs))

    @llm_completion_callback()
    async def astream_complete(self, prompt: str, formatted: bool = False, **kwargs: Any) -> CompletionResponseAsyncGen:
        responses = _in_thread(self._stream_local(self._prompt_messages(prompt, formatted), kwargs))

        async def completions() -> AsyncIterator[CompletionResponse]:
            try:
                async for response in responses:
                    yield self._as_completion(response)
            finally:
                await responses.aclose()

        return completions()


def _closing_map(gen: Iterator[_T], fn: Callable[[_T], _U]) -> Iterator[_U]:
    """``fn`` over a generator's items; closing this closes ``gen`` (which cancels its generation)."""
    try:
        for item in gen:
            yield fn(item)
    finally:
        close = getattr(gen, "close", None)
        if close is not None:
            close()


_DONE = object()


async def _in_thread(gen: Iterator[Any]) -> AsyncIterator[Any]:
    """Iterate a blocking generator off the event loop, one item per worker-thread hop.

    Closing this (``aclose()``, leaving ``async for``, cancelling the consuming task) closes
    ``gen`` in a worker thread, which stops its generation; a step still running is let
    finish first (a generator cannot be closed while it runs).
    """
    lock = threading.Lock()

    def step() -> Any:
        with lock:
            return next(gen, _DONE)

    def close() -> None:
        with lock:
            gen.close()

    try:
        while True:
            item = await asyncio.to_thread(step)
            if item is _DONE:
                return
            yield item
    finally:
        await asyncio.to_thread(close)

"""``ChatGuardAlign``: the full method on a local Hugging Face LVLM, as a LangChain chat model.

Detection and masking run through the same :class:`GuardAlignGuard` as every other entry
point (so images are read, labelled, remembered and fail closed the same way); the checked
request then goes to :class:`~guardalign_core.pipeline.GuardAlignPipeline`, which adds the
safety prefix and generates with the prefix's attention calibrated (DESIGN §1B). Nothing is
loaded at construction; the model loads on the first call and is shared by every
``ChatGuardAlign`` on the same checkpoint.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Callable, Literal

from langchain_core.callbacks import CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel, LanguageModelInput
from langchain_core.language_models.base import LangSmithParams
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from langchain_core.runnables import Runnable
from langchain_core.tools import BaseTool
from pydantic import ConfigDict, Field, PrivateAttr, model_validator

from guardalign_core.calibration import CalibrationConfig, calibration_with
from guardalign_core.config import PrefixConfig
from guardalign_core.lvlm import GenerationOptions
from guardalign_core.pipeline import GuardAlignPipeline, GuardRecord, to_checked_request
from guardalign_core.runners import get_local_lvlm

from ._messages import hf_turns, refusal_message
from .chat_models import with_guard_field
from .guard import DEFAULT_REFUSAL, METADATA_KEY, GuardAlignGuard, emit_decision

__all__ = ["ChatGuardAlign", "GENERATION_KEY"]

GENERATION_KEY = "guardalign_generation"
"""Key of the local generation's record (prefix, calibration, token counts, timings) in ``response_metadata``.

``response_metadata["guardalign"]`` holds the same verdict summary as every other adapter's.
"""

_NO_TOOLS = (
    "ChatGuardAlign does not support tool calling: the local LVLM runner generates text only. "
    "For an agent, wrap a tool-calling chat model with GuardedChatModel (same detection and masking, prompt-only prefix)."
)


class ChatGuardAlign(BaseChatModel):
    """GuardAlign end to end on a local vision-language model: detect, mask, prefix, calibrate.

    Args:
        model: a Hugging Face hub id (``"llava-hf/llava-1.5-7b-hf"``) or a local checkpoint
            folder, loaded with ``AutoModelForImageTextToText``/``AutoProcessor``.
        guard: a :class:`GuardAlignGuard`, or what builds one (a preset name, a config file,
            a ``GuardConfig``); ``action``/``fail_open`` are shortcuts for its policy.
        calibration: attention-calibration strength and layers (default: the paper's middle layers);
            ``gamma``/``layers`` are shortcuts for its fields (a shortcut that disagrees with a
            value given in ``calibration`` is a ``ValueError``).
        prefix: the safety prefix and its policy (default: always, as the start of the answer).
        device, dtype, trust_remote_code: how the model is loaded.
        max_tokens, temperature, top_p, stop, seed: decoding settings (``temperature=0``: greedy).
        model_kwargs: extra ``model.generate`` keywords (e.g. ``{"repetition_penalty": 1.1}``).
        on_block: ``"refuse"`` (default) answers with :attr:`refusal`; ``"raise"`` raises
            :class:`~guardalign_core.errors.GuardAlignViolation`.

    Every response carries the guard record (decision, per-image verdicts, prefix, calibration,
    token counts, timings) in ``response_metadata["guardalign"]`` and token counts in
    ``usage_metadata``: ``input_tokens`` include the image tokens and, when the prefix is placed
    as the start of the answer, the prefix; ``output_tokens`` are the generated tokens only
    (the returned text still starts with the kept prefix). ``stop`` strings cut the text at
    their first occurrence; a stream abandoned early stops the generation.

    Example:
        >>> llm = ChatGuardAlign(model="llava-hf/llava-1.5-7b-hf", device="cuda", guard="default")  # doctest: +SKIP
        >>> msg = HumanMessage(content=[{"type": "text", "text": "What is this?"},
        ...                             {"type": "image", "base64": data, "mime_type": "image/png"}])  # doctest: +SKIP
        >>> answer = llm.invoke([msg])  # doctest: +SKIP
        >>> answer.response_metadata["guardalign"]["decision"], answer.usage_metadata  # doctest: +SKIP
    """

    model_config = ConfigDict(arbitrary_types_allowed=True, extra="forbid", populate_by_name=True)

    model: str = Field(alias="model_name")
    """Hub id or local folder of the vision-language model."""

    guard: GuardAlignGuard = Field(default_factory=GuardAlignGuard)
    """Detection and masking applied to every request's images."""

    calibration: CalibrationConfig = Field(default_factory=CalibrationConfig)
    """Strength, layers and backend of the prefix attention calibration (Eqs. 12–14)."""

    prefix: PrefixConfig | None = None
    """The safety prefix; ``None``: the guard config's prefix, applied to every request (the paper's setting)."""

    device: str = "cpu"
    """Torch device for the model, e.g. ``"cuda"``."""

    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    """Weights dtype (``"auto"``: the checkpoint's)."""

    trust_remote_code: bool = False
    """Passed to the transformers Auto classes."""

    max_concurrent_generations: int | None = Field(None, ge=1)
    """Most generations at once on this checkpoint (shared by its users; ``None``: no limit).
    Bounds GPU memory under ``batch``/``abatch``, where each call holds its own KV cache."""

    max_tokens: int = Field(256, ge=1)
    """Most tokens to generate per answer."""

    temperature: float = Field(0.0, ge=0)
    """Sampling temperature; 0 is greedy decoding."""

    top_p: float = Field(1.0, gt=0, le=1)
    """Nucleus sampling mass (with ``temperature > 0``)."""

    stop: list[str] | None = None
    """Stop strings (a call's own ``stop`` wins)."""

    seed: int | None = None
    """Seed for sampling."""

    model_kwargs: dict[str, Any] = Field(default_factory=dict)
    """Extra keyword arguments for ``model.generate``."""

    on_block: Literal["refuse", "raise"] = "refuse"
    """On a blocked request: answer with a refusal message, or raise GuardAlignViolation."""

    refusal: str = DEFAULT_REFUSAL
    """Text of the refusal returned for blocked requests."""

    streaming: bool = False
    """Use the streaming path even under ``invoke`` (LangChain's standard flag)."""

    _pipeline: GuardAlignPipeline | None = PrivateAttr(None)  # set only by from_pipeline

    @model_validator(mode="before")
    @classmethod
    def _coerce(cls, values: Any) -> Any:
        if not isinstance(values, dict):
            return values
        if "gamma" in values or "layers" in values:
            values = dict(values)
            gamma, layers = values.pop("gamma", None), values.pop("layers", None)
            values["calibration"] = calibration_with(values.get("calibration"), gamma=gamma, layers=layers)
        return with_guard_field(values)

    @classmethod
    def from_pipeline(cls, pipeline: GuardAlignPipeline, **kwargs: Any) -> ChatGuardAlign:
        """A chat model over an existing pipeline (its runner and prefix; the guard is this model's)."""
        kwargs.setdefault("prefix", pipeline.prefix)
        kwargs.setdefault("calibration", pipeline.calibration)
        chat = cls(model=pipeline.lvlm.model_id, device=pipeline.lvlm.device, dtype=pipeline.lvlm.dtype, **kwargs)
        chat._pipeline = pipeline
        return chat

    # -- identity ----------------------------------------------------------------------------
    @property
    def _llm_type(self) -> str:
        return "guardalign-local"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        """Everything that changes an answer (LangChain's LLM cache keys on it)."""
        params = self.model_dump(exclude={"guard", "calibration", "prefix", "streaming"})
        return {
            **params,
            "guard": self.guard.describe(),
            "calibration": self.calibration.model_dump(),
            "prefix": self.pipeline.prefix.model_dump(),
        }

    def _get_ls_params(self, stop: list[str] | None = None, **kwargs: Any) -> LangSmithParams:
        params = LangSmithParams(
            ls_provider="guardalign", ls_model_name=kwargs.get("model", self.model), ls_model_type="chat",
            ls_temperature=kwargs.get("temperature", self.temperature), ls_max_tokens=kwargs.get("max_tokens", self.max_tokens),
        )
        if stop or self.stop:
            params["ls_stop"] = stop or self.stop
        return params

    # -- the pipeline (lazy) -----------------------------------------------------------------
    def _runner(self, model: str | None = None) -> Any:
        return get_local_lvlm(
            model or self.model, device=self.device, dtype=self.dtype, backend=self.calibration.backend,
            trust_remote_code=self.trust_remote_code, max_concurrent=self.max_concurrent_generations,
        )

    @property
    def pipeline(self) -> GuardAlignPipeline:
        """The detector + calibrated runner for this model's settings (the weights load on the first generation)."""
        return self._pipeline_for(None)

    def _pipeline_for(self, model: str | None) -> GuardAlignPipeline:
        """The pipeline for this model or a per-call ``model=`` override, built from the current settings.

        Building one is cheap (the runner and its weights are shared per checkpoint), so a copy
        of this chat model with other settings never reuses a stale pipeline.
        """
        if self._pipeline is not None and (model is None or model == self.model):
            return self._pipeline
        return GuardAlignPipeline(
            self._runner(model), self.guard.engine, prefix=self.prefix, calibration=self.calibration, refusal=self.refusal
        )

    @property
    def is_loaded(self) -> bool:
        """Whether this checkpoint's weights are in memory (loaded by this or another adapter)."""
        return (self._pipeline.lvlm if self._pipeline is not None else self._runner()).is_loaded

    def _options(self, stop: list[str] | None, kwargs: dict[str, Any]) -> tuple[GenerationOptions, dict[str, Any]]:
        extra = {**self.model_kwargs, **kwargs}
        for key in ("tools", "tool_choice", "response_format"):
            if key in extra:
                raise NotImplementedError(_NO_TOOLS)
        model = extra.pop("model", None)
        defaults = GenerationOptions(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                                     stop=list(self.stop or []), seed=self.seed)
        if stop is not None:
            extra["stop"] = stop
        options, extra = GenerationOptions.from_call(defaults, extra)  # checked before any image is scanned
        if model is not None:
            extra["model"] = model
        return options, extra

    def _check(self, messages: list[BaseMessage], run_manager: CallbackManagerForLLMRun | None) -> tuple[Any, Any]:
        """Guard the request; returns (checked request or None when blocked, decision)."""
        found = self.guard.find(messages)
        verdict = self.guard.engine.screen([image.image for image in found], reuse=self.guard.reuse_checked)
        emit_decision(verdict, run_manager)
        if verdict.blocked:
            if self.on_block == "raise":
                raise self.guard.violation(verdict)
            return None, verdict
        return to_checked_request(hf_turns(messages, found), verdict), verdict

    def _refuse(self, decision: Any, *, chunk: bool = False, model: str | None = None) -> AIMessage:
        metadata = {METADATA_KEY: decision.summary(), "model_name": model or self.model}
        message = refusal_message(self.refusal, metadata=metadata, chunk=chunk)
        message.usage_metadata = UsageMetadata(input_tokens=0, output_tokens=0, total_tokens=0)
        return message

    def _metadata(
        self, record: GuardRecord, decision: Any, options: GenerationOptions, model: str | None = None
    ) -> tuple[dict[str, Any], UsageMetadata]:
        finish = "length" if record.output_tokens >= options.max_new_tokens else "stop"
        metadata = {METADATA_KEY: decision.summary(), GENERATION_KEY: record.generation(), "model_name": model or self.model,
                    "finish_reason": finish}
        usage = UsageMetadata(
            input_tokens=record.input_tokens, output_tokens=record.output_tokens, total_tokens=record.input_tokens + record.output_tokens
        )
        return metadata, usage

    # -- generation --------------------------------------------------------------------------
    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        if self.streaming:
            chunks = list(self._stream(messages, stop=stop, run_manager=run_manager, **kwargs))
            message = chunks[0].message
            for chunk in chunks[1:]:
                message = message + chunk.message
            return ChatResult(generations=[ChatGeneration(message=_as_message(message))])
        options, extra = self._options(stop, kwargs)
        checked, decision = self._check(messages, run_manager)
        if checked is None:
            return ChatResult(generations=[ChatGeneration(message=self._refuse(decision))])
        model = extra.pop("model", None)
        result = self._pipeline_for(model).generate(checked, options=options, calibration=self.calibration, **extra)
        metadata, usage = self._metadata(result.record, decision, options, model)
        message = AIMessage(content=result.text, response_metadata=metadata, usage_metadata=usage)
        return ChatResult(generations=[ChatGeneration(message=message)], llm_output={METADATA_KEY: decision.summary()})

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        options, extra = self._options(stop, kwargs)
        checked, decision = self._check(messages, run_manager)
        if checked is None:
            yield ChatGenerationChunk(message=self._refuse(decision, chunk=True))
            return
        model = extra.pop("model", None)
        stream = self._pipeline_for(model).stream(checked, options=options, calibration=self.calibration, **extra)
        deltas = iter(stream)
        try:
            for delta in deltas:
                chunk = ChatGenerationChunk(message=AIMessageChunk(content=delta))
                if run_manager is not None:
                    run_manager.on_llm_new_token(delta, chunk=chunk)
                yield chunk
        finally:
            deltas.close()  # a consumer that stops early cancels the generation
        assert stream.record is not None  # set once the deltas are exhausted
        metadata, usage = self._metadata(stream.record, decision, options, model)
        yield ChatGenerationChunk(
            message=AIMessageChunk(content="", response_metadata=metadata, usage_metadata=usage, chunk_position="last")
        )

    # -- tools: not supported by a text-only local runner -----------------------------------
    def bind_tools(
        self,
        tools: Sequence[dict[str, Any] | type | Callable[..., Any] | BaseTool],
        *,
        tool_choice: str | None = None,
        **kwargs: Any,
    ) -> Runnable[LanguageModelInput, AIMessage]:
        """Not supported: the local runner has no tool-calling format. Raises ``NotImplementedError``."""
        raise NotImplementedError(_NO_TOOLS)

    def with_structured_output(self, schema: Any, *, include_raw: bool = False, **kwargs: Any) -> Runnable[LanguageModelInput, Any]:
        """Not supported: structured output needs tool calling or a JSON mode, which the local runner lacks."""
        raise NotImplementedError(
            "ChatGuardAlign does not support structured output (no tool calling or JSON mode in the local runner); "
            "parse its text with an output parser, or wrap a model that has structured output with GuardedChatModel."
        )


def _as_message(chunk: BaseMessage) -> AIMessage:
    if isinstance(chunk, AIMessageChunk):
        return AIMessage(
            content=chunk.content, response_metadata=chunk.response_metadata, usage_metadata=chunk.usage_metadata, id=chunk.id
        )
    return chunk  # type: ignore[return-value]

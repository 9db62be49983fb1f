"""The full method on a local model: detect → decide → prefix → calibrated generation.

:class:`GuardAlignPipeline` is the one object integrations call for a local LVLM. It scans a
request's images with the OT detector (masking, blocking or flagging them per policy), adds
the safety prefix per ``prefix.when`` (``always`` by default, the paper's setting), and
generates with the prefix's attention calibrated. Every call returns a :class:`GuardRecord`
of what the guard did.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from .calibration import CalibrationConfig
from .config import GuardConfig, PrefixConfig
from .guard import ImageGuard
from .images import ImageSource
from .lvlm import GenerationOptions, LocalLVLM, Message, PreparedPrompt, first_stop, normalize_messages
from .verdicts import DEFAULT_REFUSAL, RequestVerdict
_IMAGE_KEYS = ("image", "url", "path", "base64", "image_url")


class GuardRecord(BaseModel):
    """What the guard did for one generation: verdicts, prefix, calibration, token counts."""

    model_config = ConfigDict(frozen=True)

    decision: str = Field(description="allow, mask, block or flag (the most severe over the request's images).")
    status: str = Field(description="ok, or error if an image could not be checked.")
    blocked: bool
    reason: str
    images: list[dict[str, Any]] = Field(default_factory=list, description="Per-image verdict summaries, in order.")
    prefix_used: bool = False
    prefix_text: str | None = None
    prefix_placement: str | None = None
    prefix_spans: list[tuple[int, int] | None] | None = Field(None, description="Token positions of the prefix per row.")
    calibration: dict[str, Any] | None = Field(
        None, description="Strength, backend and exactly the layers calibrated (self-attention only; None if not calibrated)."
    )
    input_tokens: int = 0
    output_tokens: int = 0
    timings_ms: dict[str, float] = Field(default_factory=dict)

    def generation(self) -> dict[str, Any]:
        """The generation part of the record (prefix, calibration, tokens, timings), JSON-ready.

        The verdict part is :meth:`RequestVerdict.summary`, the one summary every adapter reports.
        """
        return self.model_dump(mode="json", exclude={"decision", "status", "blocked", "reason", "images"})


class GenerationResult(BaseModel):
    """Generated text plus the guard record."""

    model_config = ConfigDict(frozen=True)

    text: str
    record: GuardRecord


class PipelineStream:
    """Iterate for text deltas as they are decoded; :attr:`record` is complete after the last one.

    Stopping early (``break``, ``close()``) cancels the generation after its current step;
    :attr:`record` then stays ``None``.
    """

    def __init__(self, deltas: Iterator[str], finish: Any) -> None:
        self._deltas = deltas
        self._finish = finish
        self.record: GuardRecord | None = None
        self.text = ""

    def __iter__(self) -> Iterator[str]:
        try:
            for delta in self._deltas:
                self.text += delta
                yield delta
        finally:
            close = getattr(self._deltas, "close", None)
            if close is not None:
                close()  # an early exit reaches the token stream, which cancels generation
        self.record = self._finish()


def until_stop(deltas: Iterator[str], stops: Sequence[str]) -> Iterator[str]:
    """Text deltas cut at the first occurrence of any stop string (which is not returned).

    A stop string can span deltas, so the last ``len(longest stop) - 1`` characters are held
    back until it is clear they do not start one. Returning early closes ``deltas``.
    """
    stops = [s for s in stops if s]
    if not stops:
        yield from deltas
        return
    hold = max(len(s) for s in stops) - 1
    buffer = ""
    try:
        for delta in deltas:
            buffer += delta
            cut = first_stop(buffer, stops)
            if cut is not None:
                if cut:
                    yield buffer[:cut]
                return
            if len(buffer) > hold:
                ready, buffer = buffer[: len(buffer) - hold], buffer[len(buffer) - hold :]
                yield ready
        if buffer:
            yield buffer
    finally:
        close = getattr(deltas, "close", None)
        if close is not None:
            close()


def extract_images(messages: list[Message], images: Sequence[ImageSource]) -> tuple[list[Message], list[ImageSource]]:
    """Collect the images of a request in order: inline in image parts, else from ``images``.

    Returns the messages with bare ``{"type": "image"}`` placeholders and the image sources.
    """
    inline: list[ImageSource] = []
    for message in messages:
        for i, part in enumerate(message["content"]):
            if part.get("type") == "image":
                source = next((part[k] for k in _IMAGE_KEYS if part.get(k) is not None), None)
                if source is not None:
                    inline.append(source)
                message["content"][i] = {"type": "image"}
    if inline and images:
        raise ValueError("give images either inline in the messages or through images=, not both")
    return messages, list(inline or images)


@dataclass(frozen=True)
class CheckedRequest:
    """A request after the guard: messages with image placeholders, the images to use, the decision.

    :meth:`GuardAlignPipeline.check` makes one; an adapter that already scanned the images
    with its own :class:`ImageGuard` (e.g. the LangChain guard) builds one directly so the
    images are not scanned twice. ``images`` must match the messages' image placeholders.
    """

    messages: list[Message]
    images: list[Image.Image]
    decision: RequestVerdict
    guard_ms: float = 0.0


_HF_ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant", "model": "assistant", "chatbot": "assistant"}


def to_checked_request(turns: Sequence[dict[str, Any]], verdict: RequestVerdict, *, guard_ms: float = 0.0) -> CheckedRequest:
    """The one conversion of screened chat turns to a local model's request (Hugging Face chat format).

    Adapters describe each turn framework-free: ``{"role": ..., "name": optional tool name,
    "content": [{"type": "text", "text": ...} | {"type": "image", "index": i}]}``, where ``i``
    is the image's position in ``verdict.images``. Each image part becomes ``{"type": "image"}``
    with the checked (sanitised) pixels collected in order; an image that may not be shown
    (blocked, or unchecked under ``fail_open``) is left out. ``tool``/``function`` turns become
    user turns that say they hold a tool's result; assistant aliases (``model``, ``chatbot``)
    are assistant turns; any other role is a user turn. Turns left empty are dropped.

    Example:
        >>> to_checked_request([{"role": "user", "content": [{"type": "text", "text": "hi"}]}], verdict).messages  # doctest: +SKIP
        [{'role': 'user', 'content': [{'type': 'text', 'text': 'hi'}]}]
    """
    messages: list[Message] = []
    images: list[Image.Image] = []
    for turn in turns:
        role = str(turn.get("role") or "user")
        parts: list[dict[str, Any]] = []
        if role in ("tool", "function"):
            name = turn.get("name")
            parts.append({"type": "text", "text": f"Result of the tool {name!r}:\n" if name else "Result of a tool call:\n"})
        for part in turn.get("content", ()):
            if part.get("type") == "image":
                pixels = verdict.images[part["index"]].pixels()
                if pixels is not None:
                    images.append(pixels)
                    parts.append({"type": "image"})
            elif part.get("type") == "text" and part.get("text"):
                parts.append({"type": "text", "text": part["text"]})
        if parts:
            messages.append({"role": _HF_ROLES.get(role, "user"), "content": parts})
    return CheckedRequest(messages, images, verdict, guard_ms)


def drop_unforwardable(messages: list[Message], results: Sequence[Any]) -> tuple[list[Message], list[Image.Image]]:
    """Keep the images that may reach the model; remove the placeholders of those that may not.

    An image that could not be decoded and was let through by ``fail_open`` has no pixels to
    give a local model (``masked_image`` is ``None``): its placeholder is dropped, its error
    stays in the decision.
    """
    keep = [r.masked_image is not None for r in results]
    if all(keep):
        return messages, [r.masked_image for r in results]
    k = 0
    for message in messages:
        parts = []
        for part in message["content"]:
            if part.get("type") == "image":
                k += 1
                if not keep[k - 1]:
                    continue
            parts.append(part)
        message["content"] = parts
    return messages, [r.masked_image for r in results if r.masked_image is not None]


class GuardAlignPipeline:
    """Detector + local calibrated LVLM + policy: GuardAlign end to end on a local model.

    Args:
        lvlm: the runner (see :class:`LocalLVLM`).
        guard: an :class:`ImageGuard`, a :class:`GuardConfig`, a preset name, or ``None``.
        prefix: prefix settings; default ``PrefixConfig(when="always")`` (the paper's setting).
        calibration: strength and layers of this pipeline's calls (default: the library's, on
            the runner's backend); a call's own ``calibration=`` replaces it for that call.
        refusal: the text returned when the policy blocks a request.

    Example:
        >>> pipe = GuardAlignPipeline.from_pretrained("llava-hf/llava-1.5-7b-hf", guard="fast-cpu")  # doctest: +SKIP
        >>> result = pipe.generate("What is in this image?", images=["photo.jpg"])  # doctest: +SKIP
        >>> result.text, result.record.decision, result.record.calibration  # doctest: +SKIP
    """

    def __init__(
        self,
        lvlm: LocalLVLM,
        guard: ImageGuard | GuardConfig | str | None = None,
        *,
        prefix: PrefixConfig | None = None,
        calibration: CalibrationConfig | None = None,
        refusal: str = DEFAULT_REFUSAL,
    ) -> None:
        self.lvlm = lvlm
        self.calibration = calibration or lvlm.default_calibration()
        self.guard = guard if isinstance(guard, ImageGuard) else ImageGuard(guard)
        self.prefix = prefix or self.guard.config.prefix.model_copy(update={"when": "always"})
        self.refusal = refusal

    @classmethod
    def from_pretrained(
        cls,
        model_id_or_path: str,
        *,
        guard: ImageGuard | GuardConfig | str | None = None,
        calibration: CalibrationConfig | None = None,
        prefix: PrefixConfig | None = None,
        device: str = "cpu",
        dtype: str = "auto",
        **kwargs: Any,
    ) -> "GuardAlignPipeline":
        """Build the pipeline for a hub id or local folder; nothing loads until the first call.

        The runner installs ``calibration.backend``; the pipeline holds ``calibration`` for its calls.
        """
        backend = calibration.backend if calibration is not None else "sdpa"
        lvlm = LocalLVLM.from_pretrained(model_id_or_path, device=device, dtype=dtype, backend=backend)
        return cls(lvlm, guard, prefix=prefix, calibration=calibration, **kwargs)

    # -- shared steps ------------------------------------------------------------------------
    def check(self, messages: str | Sequence[Message], images: Sequence[ImageSource] = ()) -> CheckedRequest:
        """Run the guard only: scan the request's images in one batch and decide (no generation)."""
        t0 = time.perf_counter()
        msgs, sources = extract_images(normalize_messages(messages), images)
        decision = self.guard.check(sources) if sources else self.guard.decide([])
        msgs, sanitised = drop_unforwardable(msgs, decision.results)
        return CheckedRequest(msgs, sanitised, decision, (time.perf_counter() - t0) * 1000)

    def _guard(
        self, messages: str | Sequence[Message] | CheckedRequest, images: Sequence[ImageSource]
    ) -> tuple[list[Message], list[Image.Image], RequestVerdict, float]:
        if isinstance(messages, CheckedRequest):
            if images:
                raise ValueError("a CheckedRequest already holds its images; do not pass images= with it")
            checked = messages
            return [dict(m, content=list(m["content"])) for m in checked.messages], list(checked.images), checked.decision, checked.guard_ms
        checked = self.check(messages, images)
        return checked.messages, checked.images, checked.decision, checked.guard_ms

    def _record(
        self, decision: RequestVerdict, prepared: PreparedPrompt | None, prefix_text: str | None, calibration: CalibrationConfig | None,
        output_tokens: int, timings: dict[str, float],
    ) -> GuardRecord:
        calib = None
        has_prefix = prepared is not None and any(span is not None for span in prepared.prefix_spans or ())
        if has_prefix and calibration is not None:
            layers = self.lvlm.calibrated_layers(calibration)  # the filter the generation applied
            if layers:
                calib = {"gamma": calibration.gamma, "layers": sorted(layers), "backend": calibration.backend,
                         "layer_gamma": {str(k): v for k, v in layers.items()}}
        return GuardRecord(
            decision=decision.decision.value,
            status=decision.status.value,
            blocked=decision.blocked,
            reason=decision.reason,
            images=decision.summary()["images"],
            prefix_used=prefix_text is not None,
            prefix_text=prefix_text,
            prefix_placement=self.prefix.placement if prefix_text else None,
            prefix_spans=prepared.prefix_spans if prepared else None,
            calibration=calib,
            input_tokens=prepared.input_tokens if prepared else 0,
            output_tokens=output_tokens,
            timings_ms={k: round(v, 3) for k, v in timings.items()},
        )

    def _prepare(self, messages: list[Message], images: list[Image.Image], decision: RequestVerdict) -> tuple[PreparedPrompt, str | None]:
        prefix_text = self.prefix.text if self.prefix.applies(decision.unsafe) and self.prefix.text else None
        prepared = self.lvlm.prepare(messages, images, prefix=prefix_text, placement=self.prefix.placement)
        return prepared, prefix_text

    def _visible_prefix(self, prefix_text: str | None) -> str:
        return prefix_text if prefix_text and self.prefix.placement == "response" and self.prefix.keep_in_output else ""

    # -- public API --------------------------------------------------------------------------
    def generate(
        self,
        messages: str | Sequence[Message] | CheckedRequest,
        images: Sequence[ImageSource] = (),
        *,
        options: GenerationOptions | None = None,
        calibration: CalibrationConfig | None = None,
        **generate_kwargs: Any,
    ) -> GenerationResult:
        """Guard, prefix and generate.

        Args:
            messages: a string or Hugging Face chat messages; image parts may carry their
                source inline (``{"type": "image", "image": path|bytes|PIL|data URL}``). Or a
                :class:`CheckedRequest` whose images were already checked (not scanned again).
            images: image sources, when the messages only hold placeholders.
            options: decoding knobs (:class:`GenerationOptions`); or pass its fields as keywords.
            calibration: this call's calibration settings (default: the pipeline's).
            **generate_kwargs: ``GenerationOptions`` fields, or extra ``model.generate`` keywords.

        Returns:
            :class:`GenerationResult`: the text (with the prefix at its start when placed in
            the response and kept) and the :class:`GuardRecord`.
        """
        options, extra = self._split_options(options, generate_kwargs)
        LocalLVLM.check_generate_kwargs(extra)  # before any scan: a typo fails fast
        messages, sanitised, decision, guard_ms = self._guard(messages, images)
        if decision.blocked:
            return GenerationResult(text=self.refusal, record=self._record(decision, None, None, None, 0, {"guard": guard_ms}))
        calibration = calibration or self.calibration
        t0 = time.perf_counter()
        prepared, prefix_text = self._prepare(messages, sanitised, decision)
        ids = self.lvlm.generate_ids(prepared, options, calibration=calibration, **extra)
        answer = self.lvlm.decode(ids)
        cut = first_stop(answer, options.stop)  # generation stops on a token; the text stops at the string
        text = self._visible_prefix(prefix_text) + (answer if cut is None else answer[:cut])
        timings = {"guard": guard_ms, "generate": (time.perf_counter() - t0) * 1000}
        return GenerationResult(text=text, record=self._record(decision, prepared, prefix_text, calibration, int(ids.numel()), timings))

    def stream(
        self,
        messages: str | Sequence[Message] | CheckedRequest,
        images: Sequence[ImageSource] = (),
        *,
        options: GenerationOptions | None = None,
        calibration: CalibrationConfig | None = None,
        **generate_kwargs: Any,
    ) -> PipelineStream:
        """Like :meth:`generate`, but yields text deltas as they are decoded (see :class:`PipelineStream`)."""
        options, extra = self._split_options(options, generate_kwargs)
        LocalLVLM.check_generate_kwargs(extra)
        messages, sanitised, decision, guard_ms = self._guard(messages, images)
        if decision.blocked:
            record = self._record(decision, None, None, None, 0, {"guard": guard_ms})
            return PipelineStream(iter([self.refusal]), lambda: record)
        calibration = calibration or self.calibration
        t0 = time.perf_counter()
        prepared, prefix_text = self._prepare(messages, sanitised, decision)
        tokens = self.lvlm.stream_text(prepared, options, calibration=calibration, **extra)
        visible = self._visible_prefix(prefix_text)

        def deltas() -> Iterator[str]:
            try:
                if visible:
                    yield visible
                yield from until_stop(iter(tokens), options.stop)
            finally:
                tokens.cancel()  # a no-op once generation has finished; stops it if the consumer left early

        def finish() -> GuardRecord:
            timings = {"guard": guard_ms, "generate": (time.perf_counter() - t0) * 1000}
            return self._record(decision, prepared, prefix_text, calibration, tokens.output_tokens, timings)

        return PipelineStream(deltas(), finish)

    def profile(
        self,
        messages: str | Sequence[Message],
        images: Sequence[ImageSource] = (),
        *,
        answer_tokens: int = 16,
        calibration: CalibrationConfig | None = None,
        **generate_kwargs: Any,
    ):
        """Per-layer attention mass on the safety prefix, without and with calibration (Fig. 1b).

        The request is guarded and prefixed as in :meth:`generate` (the prefix is always used
        here); ``answer_tokens`` tokens are generated greedily with calibration, and the
        queries measured are every token after the prefix (instruction and answer).

        Returns:
            A :class:`~guardalign_core.calibration.PrefixAttentionProfile`.
        """
        import torch

        from .calibration import prefix_attention_profile

        messages, sanitised, decision, _ = self._guard(messages, images)
        if decision.blocked:
            raise ValueError(f"the request is blocked by the guard ({decision.reason}); nothing to profile")
        calibration = calibration or self.calibration
        if not self.prefix.text:
            raise ValueError("profile needs a non-empty safety prefix (PrefixConfig.text)")
        prepared = self.lvlm.prepare(messages, sanitised, prefix=self.prefix.text, placement=self.prefix.placement)
        answer = self.lvlm.generate_ids(prepared, GenerationOptions(max_new_tokens=answer_tokens), calibration=calibration, **generate_kwargs)
        inputs = dict(prepared.inputs)
        inputs["input_ids"] = torch.cat([inputs["input_ids"], answer[None].to(inputs["input_ids"].device)], dim=-1)
        if "attention_mask" in inputs:
            ones = torch.ones(1, answer.numel(), dtype=inputs["attention_mask"].dtype, device=inputs["attention_mask"].device)
            inputs["attention_mask"] = torch.cat([inputs["attention_mask"], ones], dim=-1)
        for key in ("mm_token_type_ids", "token_type_ids"):
            if key in inputs:
                zeros = torch.zeros(1, answer.numel(), dtype=inputs[key].dtype, device=inputs[key].device)
                inputs[key] = torch.cat([inputs[key], zeros], dim=-1)
        return prefix_attention_profile(self.lvlm.model, inputs, prepared.prefix_spans, calibration)

    @staticmethod
    def _split_options(options: GenerationOptions | None, kwargs: dict[str, Any]) -> tuple[GenerationOptions, dict[str, Any]]:
        return GenerationOptions.from_call(options or GenerationOptions(), kwargs)

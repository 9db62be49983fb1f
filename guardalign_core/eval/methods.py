"""The methods an evaluation compares, and the targets that run them on one item.

A :class:`MethodSpec` says which parts of GuardAlign are switched on: the detector (OT or
ETA's cosine), what it does with an unsafe image, when the safety prefix is added, and
whether the prefix's attention is calibrated. The registry holds the paper's comparison:

============  ========  ======  ============  =========  =====================================
method        detector  action  prefix        calibrate  what it is
============  ========  ======  ============  =========  =====================================
vanilla       -         -       never         no         the model as it is
eta           cosine    flag    when_unsafe   no         ETA-style baseline (no masking)
ot            ot        mask    never         no         Table 3 "OT only"
calibration   -         -       always        yes        Table 3 "calibration only"
guardalign    ot        mask    always        yes        the full method
ot-block      ot        block   never         no         OT detection; unsafe images are refused
guardalign-b  ot        block   always        yes        ``guardalign-block``: blocking + prefix
============  ========  ======  ============  =========  =====================================

A target runs one method on one :class:`~guardalign_core.eval.items.EvalItem` and returns a
:class:`~guardalign_core.eval.items.ResponseRecord`: :class:`LocalTarget` for a local
Hugging Face LVLM (calibrated generation through
:class:`~guardalign_core.pipeline.GuardAlignPipeline`), :class:`ChatModelTarget` for a
black-box chat model (masking on a local CLIP, the prefix by prompt only; DESIGN §1C).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any, Literal, Protocol, Sequence, runtime_checkable

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import GuardConfig, PrefixConfig
from ..guard import GuardDecision, ImageGuard, SafetyPrompt, plan_safety_prompt
from ..images import load_image, to_base64_png
from ..results import Decision, Status
from .items import EvalItem, ResponseRecord

if TYPE_CHECKING:
    from PIL import Image

    from ..calibration import CalibrationConfig

    from ..lvlm import GenerationOptions, LocalLVLM

logger = logging.getLogger(__name__)

__all__ = [
    "METHODS",
    "ChatModelTarget",
    "EvalTarget",
    "LocalTarget",
    "MethodSpec",
    "build_chat_messages",
    "get_method",
    "list_methods",
    "method_guard_config",
    "override_notes",
    "parse_methods",
    "register_method",
]

DEFAULT_REFUSAL = "I can't help with this request: the image it contains was judged unsafe."
BLACK_BOX_CALIBRATION_NOTE = "unavailable: black-box model (no attention access); the safety prefix was delivered by prompt only"


class MethodSpec(BaseModel):
    """Which parts of GuardAlign a compared method switches on.

    Example:
        >>> MethodSpec(name="ot-block", description="OT detector, block unsafe images", detector="ot", action="block").prefix
        'never'
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(description="Short name used on the command line, in record keys and in the table.")
    description: str = Field("", description="One line on what the method is.")
    detector: Literal["ot", "cosine"] | None = Field(None, description="'ot' (GuardAlign), 'cosine' (ETA) or None: no scan at all.")
    action: Literal["mask", "flag", "block"] = Field("mask", description="What the detector does with an unsafe image.")
    prefix: Literal["never", "always", "when_unsafe"] = Field("never", description="When the safety prefix is added.")
    calibrate: bool = Field(False, description="Calibrate the prefix's attention (local models only; needs a prefix).")

    @model_validator(mode="after")
    def _check(self) -> "MethodSpec":
        if not self.name or "/" in self.name or "," in self.name or self.name != self.name.strip():
            raise ValueError(f"name: {self.name!r} must be non-empty, without '/', ',' or surrounding spaces")
        if self.calibrate and self.prefix == "never":
            raise ValueError(f"calibrate: method {self.name!r} calibrates the prefix's attention but never adds a prefix")
        if self.prefix == "when_unsafe" and self.detector is None:
            raise ValueError(f"prefix: method {self.name!r} adds the prefix 'when_unsafe' but has no detector to decide that")
        return self


METHODS: dict[str, MethodSpec] = {}
"""The registered methods, by name (see :func:`register_method`)."""


def register_method(spec: MethodSpec, *, overwrite: bool = False) -> MethodSpec:
    """Register a method (e.g. a variant with ``action="block"``) for :func:`parse_methods` and the CLI.

    Raises:
        ValueError: the name is taken and ``overwrite`` is false.
    """
    if not isinstance(spec, MethodSpec):
        raise TypeError(f"register_method: expected a MethodSpec, got {type(spec).__name__}")
    if spec.name in METHODS and not overwrite and METHODS[spec.name] != spec:
        raise ValueError(f"method {spec.name!r} is already registered (pass overwrite=True to replace it)")
    METHODS[spec.name] = spec
    return spec


def list_methods() -> list[str]:
    """Names of the registered methods, in registration order."""
    return list(METHODS)


def get_method(name: str) -> MethodSpec:
    """The registered method called ``name``; ``ValueError`` listing the known ones otherwise."""
    try:
        return METHODS[name]
    except KeyError:
        raise ValueError(f"unknown method {name!r}; known methods: {', '.join(METHODS)}") from None


def parse_methods(spec: str | MethodSpec | Sequence[str | MethodSpec]) -> list[MethodSpec]:
    """Methods from ``"vanilla,eta,guardalign"``, a list of names and/or :class:`MethodSpec` s.

    Example:
        >>> [m.name for m in parse_methods("vanilla, guardalign")]
        ['vanilla', 'guardalign']
    """
    if isinstance(spec, (str, MethodSpec)):
        spec = [spec]
    out: list[MethodSpec] = []
    for entry in spec:
        if isinstance(entry, MethodSpec):
            out.append(entry)
            continue
        if not isinstance(entry, str):
            raise TypeError(f"methods: expected names or MethodSpec objects, got {type(entry).__name__}")
        out.extend(get_method(name.strip()) for name in entry.split(",") if name.strip())
    if not out:
        raise ValueError(f"no methods given; known methods: {', '.join(METHODS)}")
    names = [m.name for m in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"methods listed twice: {', '.join(duplicates)}")
    return out


for _spec in (
    MethodSpec(name="vanilla", description="No guard: the model as it is."),
    MethodSpec(
        name="eta", detector="cosine", action="flag", prefix="when_unsafe",
        description="ETA-style baseline: one global CLIP cosine against ETA's unsafe prompt; flagged requests get the prefix; no masking, no calibration.",
    ),
    MethodSpec(name="ot", detector="ot", action="mask", description="OT detection with unsafe-patch masking only (Table 3 'OT only')."),
    MethodSpec(
        name="calibration", prefix="always", calibrate=True,
        description="Safety prefix on every request with attention calibration, no detector (Table 3 'calibration only').",
    ),
    MethodSpec(
        name="guardalign", detector="ot", action="mask", prefix="always", calibrate=True,
        description="GuardAlign: OT masking + safety prefix + attention calibration.",
    ),
    MethodSpec(name="ot-block", detector="ot", action="block", description="OT detection; requests with an unsafe image are refused (blocked)."),
    MethodSpec(
        name="guardalign-block", detector="ot", action="block", prefix="always", calibrate=True,
        description="GuardAlign with blocking: unsafe images are refused; the rest get the safety prefix + attention calibration.",
    ),
):
    register_method(_spec)


def method_guard_config(method: MethodSpec, base: GuardConfig) -> GuardConfig:
    """The user's guard config with the method's detector kind, policy action and prefix policy."""
    update: dict[str, Any] = {"policy": base.policy.model_copy(update={"action": method.action}),
                              "prefix": base.prefix.model_copy(update={"policy": method.prefix})}
    if method.detector is not None:
        update["detector"] = base.detector.model_copy(update={"kind": method.detector})
    return base.model_copy(update=update)


def override_notes(methods: Sequence[MethodSpec], base: GuardConfig) -> list[str]:
    """Run notes for the guard-config settings a method replaces (policy.action, prefix.policy).

    Every method sets its own action and prefix policy, so a ``policy.action: block`` in the
    user's config is not what ``ot`` or ``guardalign`` run with; the note says so.
    """
    defaults = GuardConfig()
    notes = []
    checks = (("policy.action", base.policy.action, defaults.policy.action, "action"),
              ("prefix.policy", base.prefix.policy, defaults.prefix.policy, "prefix"))
    for label, value, default, attr in checks:
        if value == default:
            continue
        replaced = [f"{m.name}: {getattr(m, attr)}" for m in methods if getattr(m, attr) != value and (attr == "prefix" or m.detector is not None)]
        if replaced:
            hint = " (use ot-block or guardalign-block to evaluate blocking)" if label == "policy.action" and value == "block" else ""
            notes.append(f"the guard config's {label} {value!r} is overridden by each method's own ({', '.join(replaced)}){hint}")
    return notes


def _new_record(method: MethodSpec, item: EvalItem, **fields: Any) -> ResponseRecord:
    return ResponseRecord(
        key=f"{method.name}/{item.benchmark}/{item.id}", method=method.name, benchmark=item.benchmark, item_id=item.id,
        safe_item=item.safe, category=item.category, prompt=item.prompt, image=item.image, **fields,
    )


def _json_safe(value: Any) -> Any:
    import json

    return json.loads(json.dumps(value, default=str, sort_keys=True))


def _raise_unchecked(item: EvalItem, config: GuardConfig, reason: str) -> None:
    """An item whose image the guard could not check is an error for every method alike.

    Decoding the image again raises the very error the no-detector methods record, so every
    method excludes the item with the same message.
    """
    if item.image:
        load_image(item.image, config.images, source=f"item {item.id}")
    raise RuntimeError(f"item {item.id}: the guard could not check the request: {reason}")


def _any_unsafe(images: Sequence[dict[str, Any]]) -> bool:
    # "Flagged" is a detector finding; an image that could not be checked is blocked, not flagged.
    return any(image.get("unsafe") for image in images)


@runtime_checkable
class EvalTarget(Protocol):
    """What :func:`~guardalign_core.eval.runner.run_eval` drives: one model, any method."""

    kind: str
    """``"local"`` or ``"black-box"``."""

    @property
    def model_id(self) -> str: ...

    def warm_up(self, methods: Sequence[MethodSpec], guard: GuardConfig, *, item: EvalItem | None = None) -> None:
        """Load everything the methods need, so that no item's time includes loading.

        ``item`` (the first item to run, when the runner has one) gives the warm-up a
        real-size image, so the first method's first item pays no first-call costs.
        """

    def run(self, method: MethodSpec, item: EvalItem, *, guard: GuardConfig, options: "GenerationOptions") -> ResponseRecord:
        """Run one method on one item and return its record (raises if generation fails)."""

    def notes(self, methods: Sequence[MethodSpec]) -> list[str]:
        """Caveats for the run summary (e.g. calibration unavailable)."""

    def settings(self) -> dict[str, Any]:
        """JSON-safe settings that change the responses (stored in ``run.json``; a resume must match them)."""


class _GuardCache:
    """One :class:`ImageGuard` per (guard config, detector kind, action): methods share detectors and CLIP."""

    def __init__(self) -> None:
        self._guards: dict[tuple[str, str, str], ImageGuard] = {}

    def get(self, method: MethodSpec, base: GuardConfig) -> ImageGuard | None:
        if method.detector is None:
            return None
        key = (base.model_dump_json(), method.detector, method.action)
        if key not in self._guards:
            self._guards[key] = ImageGuard(method_guard_config(method, base))
        return self._guards[key]

    def warm_up(self, methods: Sequence[MethodSpec], base: GuardConfig, image: "Image.Image | None" = None) -> None:
        from PIL import Image

        image = image if image is not None else Image.new("RGB", (336, 336))
        warmed: set[int] = set()
        for method in methods:
            guard = self.get(method, base)
            if guard is not None and id(guard) not in warmed:
                # One throw-away check per detector on a real-size image loads CLIP, encodes the
                # concept bank and runs the first scan and mask outside any item's timing.
                warmed.add(id(guard))
                guard.check([image], sources=["warm-up image"], prefix=method_guard_config(method, base).prefix)


def _warm_up_image(item: EvalItem | None, guard: GuardConfig) -> "Image.Image | None":
    if item is None or not item.image:
        return None
    try:
        return load_image(item.image, guard.images, source=f"item {item.id}")
    except Exception as err:  # noqa: BLE001 - a broken first image is that item's error, not the warm-up's
        logger.info("warm-up: item %s's image is unreadable (%s); warming up on a blank image", item.id, err)
        return None


class LocalTarget:
    """Every method on one loaded local LVLM; calibration switched per call.

    Args:
        lvlm: the runner (loaded once and shared by all methods).
        calibration: strength and layers for the calibrating methods (default: the library's).
        generate_kwargs: extra ``model.generate`` keywords for every call.
        suppress_special_tokens: suppress the tokenizer's special tokens (random-weight test models).
        refusal: the text recorded when a ``block`` method refuses a request.

    Example:
        >>> target = LocalTarget(LocalLVLM.from_pretrained("llava-hf/llava-1.5-7b-hf", device="cuda"))  # doctest: +SKIP
    """

    kind = "local"

    def __init__(
        self, lvlm: "LocalLVLM", *, calibration: "CalibrationConfig | None" = None, generate_kwargs: dict[str, Any] | None = None,
        suppress_special_tokens: bool = False, refusal: str = DEFAULT_REFUSAL,
    ) -> None:
        self.lvlm = lvlm
        self.calibration = calibration or lvlm.default_calibration()
        self.generate_kwargs = dict(generate_kwargs or {})
        self.suppress_special_tokens = suppress_special_tokens
        self.refusal = refusal
        self._guards = _GuardCache()

    @property
    def model_id(self) -> str:
        return self.lvlm.model_id

    def warm_up(self, methods: Sequence[MethodSpec], guard: GuardConfig, *, item: EvalItem | None = None) -> None:
        """Load the model, run one throw-away calibrated generation and one check per detector.

        The generation uses ``item`` (its real-size image included) when given, so the first
        method timed pays no first-call costs (kernel selection, caches, the calibration hooks).
        """
        from ..lvlm import GenerationOptions

        self.lvlm.load()
        self._guards.warm_up(methods, guard, _warm_up_image(item, guard))
        probe = item or EvalItem(id="warm-up", benchmark="warm-up", prompt="Describe this image.", safe=True)
        calibrate = any(m.calibrate for m in methods)
        spec = MethodSpec(name="warm-up", prefix="always" if calibrate else "never", calibrate=calibrate)
        try:
            self.run(spec, probe, guard=guard, options=GenerationOptions(max_new_tokens=2))
        except Exception as err:  # noqa: BLE001 - the items' own runs report it where it belongs
            logger.warning("warm-up generation failed (%s: %s); the first item's time may include first-call costs", type(err).__name__, err)

    def notes(self, methods: Sequence[MethodSpec]) -> list[str]:
        return []

    def settings(self) -> dict[str, Any]:
        """Calibration, dtype, device, extra generate keywords, special-token suppression and refusal text."""
        return {
            "calibration": self.calibration.model_dump(mode="json"),
            "dtype": str(self.lvlm.dtype),
            "device": str(self.lvlm.device),
            "generate_kwargs": _json_safe(self.generate_kwargs),
            "suppress_special_tokens": self.suppress_special_tokens,
            "refusal": self.refusal,
        }

    def _extra(self) -> dict[str, Any]:
        extra = dict(self.generate_kwargs)
        if self.suppress_special_tokens and "suppress_tokens" not in extra:
            extra["suppress_tokens"] = list(self.lvlm.tokenizer.all_special_ids)
        return extra

    def run(self, method: MethodSpec, item: EvalItem, *, guard: GuardConfig, options: "GenerationOptions") -> ResponseRecord:
        from ..lvlm import normalize_messages
        from ..pipeline import CheckedRequest, GuardAlignPipeline

        config = method_guard_config(method, guard)
        calibration = self.calibration.model_copy(update={"enabled": method.calibrate})
        image_guard = self._guards.get(method, guard)
        extra = self._extra()
        t0 = time.perf_counter()
        if image_guard is not None:
            pipe = GuardAlignPipeline(self.lvlm, image_guard, prefix=config.prefix, refusal=self.refusal)
            result = pipe.generate(item.prompt, images=[item.image] if item.image else [], options=options, calibration=calibration, **extra)
            seconds = time.perf_counter() - t0
            record = result.record
            if record.status == Status.ERROR.value:
                _raise_unchecked(item, config, record.reason)
            return _new_record(
                method, item, response=result.text, seconds=seconds, flagged=_any_unsafe(record.images), decision=record.decision,
                guard=record.model_dump(mode="json"), input_tokens=record.input_tokens, output_tokens=record.output_tokens,
            )
        # No detector: nothing is scanned (no CLIP time is counted); the pipeline still places the
        # prefix, calibrates and keeps the record, from a request that skips the guard.
        images = [load_image(item.image, config.images, source=f"item {item.id}")] if item.image else []
        unchecked = GuardDecision(
            decision=Decision.ALLOW, status=Status.OK, policy="none", reason=f"no detector: method {method.name!r} scans nothing"
        )
        pipe = GuardAlignPipeline(self.lvlm, config, prefix=config.prefix, refusal=self.refusal)
        result = pipe.generate(CheckedRequest(normalize_messages(item.prompt), images, unchecked), options=options, calibration=calibration, **extra)
        record = result.record
        return _new_record(
            method, item, response=result.text, seconds=time.perf_counter() - t0, flagged=False, decision=None,
            guard=record.model_dump(mode="json"), input_tokens=record.input_tokens, output_tokens=record.output_tokens,
        )


def build_chat_messages(prompt: str, image: "Image.Image | None", safety: SafetyPrompt) -> list[dict[str, Any]]:
    """OpenAI-style dict messages for a black-box chat model (LangChain chat models accept them).

    The safety instruction (and, without prefill, the request to begin with the prefix) goes
    into a system message; the image is inlined as a PNG data URL; with prefill the prefix is
    a trailing assistant message.

    Example:
        >>> build_chat_messages("Hi", None, SafetyPrompt())
        [{'role': 'user', 'content': [{'type': 'text', 'text': 'Hi'}]}]
    """
    messages: list[dict[str, Any]] = []
    system = safety.system_text() if safety.applied else None
    if system:
        messages.append({"role": "system", "content": system})
    content: list[dict[str, Any]] = [{"type": "text", "text": prompt}]
    if image is not None:
        content.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{to_base64_png(image)}"}})
    messages.append({"role": "user", "content": content})
    if safety.applied and safety.prefill:
        messages.append({"role": "assistant", "content": safety.prefill})
    return messages


def _response_text(response: Any) -> str:
    content = getattr(response, "content", response)
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # content blocks (e.g. Anthropic): keep the text ones
        return "".join(b if isinstance(b, str) else str(b.get("text", "")) for b in content if isinstance(b, str) or (isinstance(b, dict) and b.get("type") == "text"))
    return str(content)


class ChatModelTarget:
    """Every method on a black-box chat model: detection and masking on a local CLIP, the prefix by prompt.

    Args:
        model: anything with ``.invoke(messages)`` returning an object with ``.content`` (e.g. any
            LangChain chat model); it receives OpenAI-style dict messages (:func:`build_chat_messages`).
        model_id: a label for the run summary (default: the model's ``model_name``/``model`` or class name).
        refusal: the text recorded when a ``block`` method refuses a request.

    Calibration needs attention access: a method with ``calibrate=True`` runs prompt-only here,
    and its records say so (``guard["calibration_unavailable"]``). Decoding settings belong to
    the chat model itself (e.g. ``init_chat_model(..., temperature=0, max_tokens=512)``): the
    ``options`` passed to :meth:`run` are not forwarded.

    Example:
        >>> from langchain.chat_models import init_chat_model  # doctest: +SKIP
        >>> target = ChatModelTarget(init_chat_model("gpt-4o", model_provider="openai"))  # doctest: +SKIP
    """

    kind = "black-box"

    def __init__(self, model: Any, *, model_id: str | None = None, refusal: str = DEFAULT_REFUSAL) -> None:
        if not callable(getattr(model, "invoke", None)):
            raise TypeError(f"ChatModelTarget needs a model with .invoke(messages), got {type(model).__name__}")
        self.model = model
        self._model_id = model_id or str(getattr(model, "model_name", None) or getattr(model, "model", None) or type(model).__name__)
        self.refusal = refusal
        self._guards = _GuardCache()

    @property
    def model_id(self) -> str:
        return self._model_id

    def warm_up(self, methods: Sequence[MethodSpec], guard: GuardConfig, *, item: EvalItem | None = None) -> None:
        """One check per detector on ``item``'s image (no throw-away model call: it would be billed)."""
        self._guards.warm_up(methods, guard, _warm_up_image(item, guard))

    def settings(self) -> dict[str, Any]:
        """The refusal text and the chat model's decoding settings it exposes."""
        decoding = {k: getattr(self.model, k) for k in ("temperature", "max_tokens", "top_p", "seed") if getattr(self.model, k, None) is not None}
        return {"refusal": self.refusal, "model_settings": _json_safe(decoding)}

    def notes(self, methods: Sequence[MethodSpec]) -> list[str]:
        calibrated = [m.name for m in methods if m.calibrate]
        if not calibrated:
            return []
        return [f"attention calibration is unavailable on a black-box model: {', '.join(calibrated)} ran with the safety prefix by prompt only"]

    def run(self, method: MethodSpec, item: EvalItem, *, guard: GuardConfig, options: "GenerationOptions") -> ResponseRecord:
        config = method_guard_config(method, guard)
        prefix: PrefixConfig = config.prefix
        image_guard = self._guards.get(method, guard)
        t0 = time.perf_counter()
        if image_guard is not None:
            decision = image_guard.check([item.image] if item.image else [], sources=[f"item {item.id}"] if item.image else None, prefix=prefix)
            if decision.status == Status.ERROR:
                _raise_unchecked(item, config, decision.reason)
            safety = decision.safety_prompt
            image = decision.results[0].masked_image if decision.results else None
            summary = decision.summary()
        else:
            decision = None
            safety = plan_safety_prompt(prefix, False)
            image = load_image(item.image, config.images, source=f"item {item.id}") if item.image else None
            summary = {"decision": None, "status": "ok", "policy": None, "unsafe": False, "reason": f"no detector: method {method.name!r} scans nothing",
                       "prefix_applied": safety.applied, "images": []}
        tokens: dict[str, int | None] = {"input_tokens": None, "output_tokens": 0}
        if decision is not None and decision.blocked:
            text = self.refusal
        else:
            response = self.model.invoke(build_chat_messages(item.prompt, image, safety))
            text = _response_text(response)
            if safety.prefill and prefix.keep_in_output:
                text = safety.prefill + text
            usage = getattr(response, "usage_metadata", None) or {}
            tokens = {"input_tokens": usage.get("input_tokens"), "output_tokens": usage.get("output_tokens")}
        seconds = time.perf_counter() - t0
        delivery = None if not safety.applied else ("prefill" if safety.prefill else "instruction")
        summary.update(
            prefix_used=safety.applied, prefix_text=prefix.text if safety.applied else None, prefix_delivery=delivery,
            calibration=None, calibration_requested=method.calibrate,
            calibration_unavailable=BLACK_BOX_CALIBRATION_NOTE if method.calibrate else None, prompt_only=True,
        )
        return _new_record(
            method, item, response=text, seconds=seconds, flagged=_any_unsafe(summary["images"]),
            decision=decision.decision.value if decision is not None else None, guard=summary, **tokens,
        )

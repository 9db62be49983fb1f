"""The targets that run one method on one item: the protocol, and the local-LVLM target.

A target turns (method, item) into a :class:`~.items.ResponseRecord`. :class:`LocalTarget`
runs every method on one loaded Hugging Face LVLM through
:class:`~guardalign_core.pipeline.GuardAlignPipeline` (calibration switched per call).
Black-box chat models are driven through the real adapters, so their targets live in the
adapter packages (``guardalign_integrations.langchain.eval_target``); the helpers they share
with :class:`LocalTarget` (:func:`new_record`, :func:`raise_unchecked`,
:func:`prompt_only_fields`, ...) are here, free of any framework.
"""

from __future__ import annotations

import json
import logging
import time
from typing import TYPE_CHECKING, Any, Protocol, Sequence, runtime_checkable

from ..config import GuardConfig
from ..images import load_image
from ..results import Decision, Status
from ..verdicts import DEFAULT_REFUSAL, RequestVerdict
from .items import EvalItem, ResponseRecord
from .methods import MethodSpec, method_guard_config

if TYPE_CHECKING:
    from PIL import Image

    from ..calibration import CalibrationConfig
    from ..guard import ImageGuard
    from ..lvlm import GenerationOptions, LocalLVLM

logger = logging.getLogger(__name__)

__all__ = [
    "BLACK_BOX_CALIBRATION_NOTE",
    "DEFAULT_REFUSAL",
    "EvalTarget",
    "GuardCache",
    "LocalTarget",
    "any_unsafe",
    "black_box_notes",
    "json_safe",
    "new_record",
    "prompt_only_fields",
    "raise_unchecked",
    "warm_up_image",
]

BLACK_BOX_CALIBRATION_NOTE = "unavailable: black-box model (no attention access); the safety prefix was delivered by prompt only"


def new_record(method: MethodSpec, item: EvalItem, **fields: Any) -> ResponseRecord:
    """A record of ``method`` on ``item`` keyed ``method/benchmark/id``, with the item's fields copied."""
    return ResponseRecord(
        key=f"{method.name}/{item.benchmark}/{item.id}", method=method.name, benchmark=item.benchmark, item_id=item.id,
        safe_item=item.safe, category=item.category, prompt=item.prompt, image=item.image, **fields,
    )


def json_safe(value: Any) -> Any:
    """``value`` as plain JSON types (what ``run.json`` stores and a resume compares)."""
    return json.loads(json.dumps(value, default=str, sort_keys=True))


def raise_unchecked(item: EvalItem, config: GuardConfig, reason: str) -> None:
    """An item whose image the guard could not check is an error for every method alike.

    Decoding the image again raises the very error the no-detector methods record, so every
    method excludes the item with the same message.
    """
    if item.image:
        load_image(item.image, config.images, source=f"item {item.id}")
    raise RuntimeError(f"item {item.id}: the guard could not check the request: {reason}")


def any_unsafe(images: Sequence[dict[str, Any]]) -> bool:
    """Whether the detector flagged any image of a decision summary."""
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


class GuardCache:
    """One :class:`ImageGuard` per (guard config, detector kind, action): methods share detectors and CLIP."""

    def __init__(self) -> None:
        self._guards: dict[tuple[str, str, str], ImageGuard] = {}

    def get(self, method: MethodSpec, base: GuardConfig) -> "ImageGuard | None":
        """The shared guard of ``method`` on ``base`` (``None`` for a method without a detector)."""
        from ..guard import ImageGuard  # torch loads with the first method that scans, not with the package

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


def warm_up_image(item: EvalItem | None, guard: GuardConfig) -> "Image.Image | None":
    """``item``'s image for a warm-up, or ``None`` (no item, no image, or an unreadable one)."""
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
        self._guards = GuardCache()

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
        self._guards.warm_up(methods, guard, warm_up_image(item, guard))
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
            "generate_kwargs": json_safe(self.generate_kwargs),
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
                raise_unchecked(item, config, record.reason)
            return new_record(
                method, item, response=result.text, seconds=seconds, flagged=any_unsafe(record.images), decision=record.decision,
                guard=record.model_dump(mode="json"), input_tokens=record.input_tokens, output_tokens=record.output_tokens,
            )
        # No detector: nothing is scanned (no CLIP time is counted); the pipeline still places the
        # prefix, calibrates and keeps the record, from a request that skips the guard.
        images = [load_image(item.image, config.images, source=f"item {item.id}")] if item.image else []
        unchecked = RequestVerdict(
            decision=Decision.ALLOW, status=Status.OK, policy="none", reason=f"no detector: method {method.name!r} scans nothing"
        )
        pipe = GuardAlignPipeline(self.lvlm, config, prefix=config.prefix, refusal=self.refusal)
        result = pipe.generate(CheckedRequest(normalize_messages(item.prompt), images, unchecked), options=options, calibration=calibration, **extra)
        record = result.record
        return new_record(
            method, item, response=result.text, seconds=time.perf_counter() - t0, flagged=False, decision=None,
            guard=record.model_dump(mode="json"), input_tokens=record.input_tokens, output_tokens=record.output_tokens,
        )


def black_box_notes(methods: Sequence[MethodSpec]) -> list[str]:
    """The run note of a black-box target: which methods asked for a calibration it cannot apply."""
    calibrated = [m.name for m in methods if m.calibrate]
    if not calibrated:
        return []
    return [f"attention calibration is unavailable on a black-box model: {', '.join(calibrated)} ran with the safety prefix by prompt only"]


def prompt_only_fields(method: MethodSpec, prefix_text: str, *, applied: bool, delivery: str | None) -> dict[str, Any]:
    """What a black-box record's guard summary adds: how the prefix went out, and that calibration could not run."""
    return {
        "prefix_used": applied, "prefix_text": prefix_text if applied else None, "prefix_delivery": delivery if applied else None,
        "calibration": None, "calibration_requested": method.calibrate,
        "calibration_unavailable": BLACK_BOX_CALIBRATION_NOTE if method.calibrate else None, "prompt_only": True,
    }

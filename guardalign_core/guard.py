"""Request-level orchestration for any model: screen → decide → plan the safety prompt.

:class:`ImageGuard` is what every integration calls. :meth:`ImageGuard.screen` runs the one
screening step (:mod:`guardalign_core.screening`) over all images of one request in a single
batch, combines their verdicts ("block wins") into a
:class:`~guardalign_core.verdicts.RequestVerdict` and, for black-box models (§1C), plans how
the safety prefix is delivered by prompt alone. Requests with no image cost nothing: the
detector is built lazily and never loaded for them.
"""

from __future__ import annotations

import threading
from typing import Any, Sequence

from .config import GuardConfig, PolicyConfig, PrefixConfig, resolve_config
from .detector import BaseDetector, _label, create_detector
from .images import ImageSource
from .memory import CheckedImageMemory
from .results import Decision, ScanResult, Status
from .screening import ContentImage, screen_images
from .verdicts import DEFAULT_REFUSAL, Forward, ImageVerdict, RequestVerdict, SafetyPrompt

__all__ = ["DEFAULT_REFUSAL", "ContentImage", "ImageGuard", "RequestVerdict", "SafetyPrompt", "combine_results", "plan_safety_prompt"]

SHARED_MEMORY = CheckedImageMemory()
"""What every guard of this process remembers by default, so an image screened once is never masked twice.

Entries are keyed by the config fingerprint, so two guards share verdicts only when they
decide alike (a postprocessor and an LLM adapter built from the same config recognise each
other's output without being handed the same guard object).
"""

_SEVERITY = {Decision.ALLOW: 0, Decision.FLAG: 1, Decision.MASK: 2, Decision.BLOCK: 3}


def combine_results(results: Sequence[ScanResult], policy: PolicyConfig) -> tuple[Decision, Status, str]:
    """Combine per-image verdicts: the most severe decision wins; any error makes the status error."""
    if not results:
        return Decision.ALLOW, Status.OK, "no images in the request"
    worst = max(results, key=lambda r: _SEVERITY[r.decision])
    status = Status.ERROR if any(r.status == Status.ERROR for r in results) else Status.OK
    flagged = sum(r.unsafe for r in results)
    errors = sum(r.status == Status.ERROR for r in results)
    parts = [f"{len(results)} image(s): {flagged} unsafe"]
    if errors:
        parts.append(f"{errors} could not be checked")
    parts.append(f"decision {worst.decision.value} (policy {policy.action}{', fail_open' if policy.fail_open else ''})")
    return worst.decision, status, "; ".join(parts)


def plan_safety_prompt(prefix: PrefixConfig, unsafe: bool) -> SafetyPrompt:
    """The prompt-only delivery of the safety prefix for a black-box model (DESIGN §1C)."""
    if not prefix.applies(unsafe):
        return SafetyPrompt()
    if prefix.prefill:
        return SafetyPrompt(applied=True, system_instruction=prefix.safety_instruction, prefill=prefix.text, keep_in_output=prefix.keep_in_output)
    begin = f'Begin your answer with "{prefix.text.strip()}".' if prefix.text.strip() else None
    return SafetyPrompt(applied=True, system_instruction=prefix.safety_instruction, begin_with=begin, keep_in_output=prefix.keep_in_output)


class ImageGuard:
    """The input-side guard every integration calls: screen a request's images and decide.

    A guard is a shared service: it holds the detector and the memory of images it has
    checked; ``copy.deepcopy`` returns the guard itself.

    Args:
        config: a preset name, config file, :class:`GuardConfig` or ``None`` (defaults).
        detector: an already-built detector to share (otherwise built lazily from ``config``).
        memory: where verdicts are remembered (default: :data:`SHARED_MEMORY`, shared by every
            guard of the process; entries never cross configs).
        **overrides: ``DetectorConfig`` fields (e.g. ``device="cuda"``).

    Example:
        >>> guard = ImageGuard("tiny-random")
        >>> guard.screen([]).decision
        <Decision.ALLOW: 'allow'>
        >>> guard.detector_loaded
        False
    """

    def __init__(
        self,
        config: str | GuardConfig | None = None,
        *,
        detector: BaseDetector | None = None,
        memory: CheckedImageMemory | None = None,
        **overrides: Any,
    ) -> None:
        self.config = resolve_config(config)
        if overrides:
            self.config = self.config.model_copy(
                update={"detector": self.config.detector.model_validate({**self.config.detector.model_dump(), **overrides})}
            )
        self._detector = detector
        self.memory = memory if memory is not None else SHARED_MEMORY
        self._lock = threading.Lock()

    def __deepcopy__(self, memo: dict[int, Any]) -> ImageGuard:
        # A guard is a shared service: copies of what holds it share its detector and memory.
        return self

    @property
    def detector(self) -> BaseDetector:
        """The detector, built on first use (its CLIP loads on its first scan)."""
        if self._detector is None:
            with self._lock:
                if self._detector is None:
                    self._detector = create_detector(self.config)
        return self._detector

    @property
    def detector_loaded(self) -> bool:
        return self._detector is not None and self._detector.is_loaded

    @property
    def policy(self) -> PolicyConfig:
        return self.config.policy

    def screen(
        self, images: Sequence[ContentImage], *, prefix: PrefixConfig | None = None, reuse: bool = True
    ) -> RequestVerdict:
        """The one screening step: what each content image of one request may forward, and the request's verdict.

        Every adapter calls this. Each image is read through the one content reader (local
        files only with ``ImageLimits.allow_local_files``), the request's budget is enforced,
        images this process already checked under the same config are recalled (never masked
        twice), the rest are scanned in one detector batch, and the mask / block / flag policy
        is applied here.

        Args:
            images: the request's images, in order, as the adapter found them.
            prefix: overrides the configured prefix settings for this request.
            reuse: look images up in :attr:`memory` and remember them (``False``: scan everything).

        Returns:
            A :class:`~guardalign_core.verdicts.RequestVerdict`; ``images[i].forward`` says what
            to forward for image ``i``. Blocked when any image is blocked, over budget, or refused.

        Example:
            >>> verdict = guard.screen([ContentImage("upload", source=png_bytes)])  # doctest: +SKIP
            >>> verdict.images[0].forward, verdict.summary()["decision"]  # doctest: +SKIP
            (<Forward.BYTES: 'bytes'>, 'allow')
        """
        images = list(images)
        config = self.config  # read once: a concurrent config change must not mix two configs in one call
        if not images:
            return self._decide([], config, prefix, None)
        entries, refused = screen_images(images, config=config, detector=self.detector, memory=self.memory, reuse=reuse)
        return self._decide(entries, config, prefix, refused)

    def check(
        self,
        images: Sequence[ImageSource],
        *,
        sources: Sequence[str] | None = None,
        prefix: PrefixConfig | None = None,
    ) -> RequestVerdict:
        """Screen images given by a program (paths, bytes, PIL images), not by message content.

        Files are read as given (the caller chose them) and nothing is remembered. Each
        result's ``masked_image`` holds the pixels a model may see (``None`` when blocked).

        Raises:
            ValueError: ``sources`` and ``images`` differ in length.
        """
        images = list(images)
        labels = list(sources) if sources is not None else [_label(image, i) for i, image in enumerate(images)]
        if len(labels) != len(images):
            raise ValueError(f"sources: got {len(labels)} labels for {len(images)} images")
        return self.screen([ContentImage(label, source=image, trusted=True) for label, image in zip(labels, images)], prefix=prefix, reuse=False)

    def decide(self, results: Sequence[ScanResult], *, prefix: PrefixConfig | None = None) -> RequestVerdict:
        """A request verdict from policy-applied results that carry no bytes (e.g. a text-only request: ``decide([])``)."""
        entries = [
            ImageVerdict(r.index, r.source or f"image {r.index}", r, Forward.NOTHING if r.decision == Decision.BLOCK else Forward.AS_SENT)
            for r in results
        ]
        return self._decide(entries, self.config, prefix, None)

    def _decide(self, entries: list[ImageVerdict], config: GuardConfig, prefix: PrefixConfig | None, refused: str | None) -> RequestVerdict:
        results = [entry.result for entry in entries]
        decision, status, reason = combine_results(results, config.policy)
        if refused is not None:
            decision, status, reason = Decision.BLOCK, Status.ERROR, f"request refused: {refused}"
        safety = plan_safety_prompt(prefix or config.prefix, any(r.unsafe for r in results))
        return RequestVerdict(
            decision=decision, status=status, policy=config.policy.action, reason=reason, images=entries, safety_prompt=safety, refused=refused
        )

"""Inspectable verdicts: the ``Decision`` and ``Status`` enums and the per-image ``ScanResult``."""

from __future__ import annotations

from enum import Enum
from typing import Any

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field


class Decision(str, Enum):
    """What the guard did with an input."""

    ALLOW = "allow"  # nothing unsafe found; passed unchanged
    MASK = "mask"  # unsafe patches were masked (Eq. 11); the sanitised image was passed on
    BLOCK = "block"  # the input was not passed on
    FLAG = "flag"  # unsafe patches were found; passed unchanged with the finding recorded


class Status(str, Enum):
    """Whether the check itself ran."""

    OK = "ok"
    ERROR = "error"  # the check could not run (e.g. undecodable image); the policy decides fail-open/closed


class PatchBox(BaseModel):
    """One unsafe patch: its pixel box in the input image and why it fired."""

    model_config = ConfigDict(frozen=True)

    x0: int
    y0: int
    x1: int
    y1: int
    row: int = Field(description="Row of the patch in the patch grid.")
    col: int = Field(description="Column of the patch in the patch grid.")
    score: float = Field(description="The rule's statistic for this patch (see ScanResult.rule); lower is closer to unsafe semantics.")
    category: str = Field(description="The unsafe category this patch is closest to (lowest expected cost E_i).")


class ScanResult(BaseModel):
    """The detector's verdict for one image, with everything needed to explain it.

    ``scores`` is the (rows, cols) grid of patch scores d_OT(m); ``category_costs`` gives,
    per patch, each category's expected cost E_i(m) = Σ_n T_i(m,n)·C_i(m,n) / a^m (lower =
    closer), so the verdict can be explained whatever the entropy-weighting sign.
    ``masked_image`` is the sanitised image (or the input when nothing was masked); it is
    excluded from serialisation.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True)

    index: int = Field(description="Position of the input in the batch.")
    source: str | None = Field(None, description="A short label of the input (file name), never its content.")
    status: Status
    decision: Decision
    unsafe: bool = Field(description="True if at least one patch's statistic is at or under the threshold (Eq. 10).")
    score: float | None = Field(
        None, description="Lowest patch statistic of the rule (OT; compared with threshold) or the global cosine (cosine baseline)."
    )
    reason: str = Field(description="What was found, without echoing the input.")
    detector: str = Field(description="'ot' or 'cosine'.")
    threshold: float = Field(description="The threshold in force (the rule's default when none was configured).")
    rule: str | None = Field(None, description="OT decision rule: 'contrast', 'scaled' or 'paper' (None: cosine baseline).")
    backbone: str = Field(
        description="The CLIP backbone and the execution path it ran on, e.g. 'ViT-B-32/openai (cpu/float32/openvino)' "
        "(only the backbone when no model ran, e.g. an image refused before the scan)."
    )
    execution: str | None = Field(
        None, description="The resolved device/dtype/backend of the CLIP forward, e.g. 'cpu/float32/torch' (None: no model ran)."
    )
    policy: str = Field(description="The action applied to unsafe inputs: mask, block or flag.")
    input_format: str | None = Field(None, description="Pillow format of the input bytes (None: not decoded from bytes).")
    forward_as_sent: bool | None = Field(
        None, description="Whether a model decoding the original bytes sees exactly the scanned pixels (False: forward them re-encoded)."
    )
    reencode_reason: str | None = Field(None, description="Why the original bytes must not be forwarded as sent (alpha, frames, ...).")
    image_size: tuple[int, int] | None = Field(None, description="(width, height) of the decoded input.")
    grid: tuple[int, int] | None = Field(None, description="(rows, cols) of the patch grid.")
    scores: list[list[float]] | None = Field(
        None, description="(rows, cols) scale-free OT score (M/C)·d_OT(m) per patch (cosine baseline: the cosine)."
    )
    d_ot: list[list[float]] | None = Field(None, description="(rows, cols) raw d_OT(m) of Eq. 9.")
    safe_probability: list[list[float]] | None = Field(
        None, description="(rows, cols) P(safe) per patch (rule 'contrast'): zero-shot over the unsafe and reference banks."
    )
    statistic: list[list[float]] | None = Field(
        None, description="(rows, cols) what the rule compared with the threshold, when it is not `scores` (contrast: P(safe); paper: d_OT)."
    )
    categories: list[str] | None = Field(None, description="Category names, in the order of category_costs.")
    category_costs: list[list[list[float]]] | None = Field(None, description="(rows, cols, categories) expected costs E_i(m).")
    top_categories: list[list[str]] | None = Field(None, description="(rows, cols) closest category per patch.")
    unsafe_boxes: list[PatchBox] = Field(default_factory=list)
    timings_ms: dict[str, float] = Field(default_factory=dict, description="Per-image share of each stage, in ms.")
    error: str | None = Field(None, description="Why the check could not run (status error).")
    masked_image: Image.Image | None = Field(None, exclude=True, repr=False)

    @property
    def fired_categories(self) -> list[str]:
        """Distinct categories of the unsafe patches, most frequent first."""
        counts: dict[str, int] = {}
        for box in self.unsafe_boxes:
            counts[box.category] = counts.get(box.category, 0) + 1
        return sorted(counts, key=lambda c: -counts[c])

    def summary(self) -> dict[str, Any]:
        """A compact, JSON-ready view (no per-patch arrays) for logs and callback events."""
        return {
            "index": self.index,
            "source": self.source,
            "status": self.status.value,
            "decision": self.decision.value,
            "unsafe": self.unsafe,
            "score": self.score,
            "threshold": self.threshold,
            "rule": self.rule,
            "detector": self.detector,
            "policy": self.policy,
            "categories": self.fired_categories,
            "unsafe_patches": len(self.unsafe_boxes),
            "reason": self.reason,
            "error": self.error,
        }

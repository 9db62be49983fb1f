"""The methods an evaluation compares: what each switches on, and the registry of them.

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

The targets that run a method on one item live in :mod:`.targets` (the local LVLM) and,
for black-box chat models, in the adapter packages (they go through the real adapters).
"""

from __future__ import annotations

from typing import Any, Literal, Sequence

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..config import GuardConfig

__all__ = [
    "METHODS",
    "MethodSpec",
    "get_method",
    "list_methods",
    "method_guard_config",
    "override_notes",
    "parse_methods",
    "register_method",
]


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
    """The user's guard config with the method's detector kind, policy action and when the prefix applies."""
    update: dict[str, Any] = {"policy": base.policy.model_copy(update={"action": method.action}),
                              "prefix": base.prefix.model_copy(update={"when": method.prefix})}
    if method.detector is not None:
        update["detector"] = base.detector.model_copy(update={"kind": method.detector})
    return base.model_copy(update=update)


def override_notes(methods: Sequence[MethodSpec], base: GuardConfig) -> list[str]:
    """Run notes for the guard-config settings a method replaces (policy.action, prefix.when).

    Every method sets its own action and prefix policy, so a ``policy.action: block`` in the
    user's config is not what ``ot`` or ``guardalign`` run with; the note says so.
    """
    defaults = GuardConfig()
    notes = []
    checks = (("policy.action", base.policy.action, defaults.policy.action, "action"),
              ("prefix.when", base.prefix.when, defaults.prefix.when, "prefix"))
    for label, value, default, attr in checks:
        if value == default:
            continue
        replaced = [f"{m.name}: {getattr(m, attr)}" for m in methods if getattr(m, attr) != value and (attr == "prefix" or m.detector is not None)]
        if replaced:
            hint = " (use ot-block or guardalign-block to evaluate blocking)" if label == "policy.action" and value == "block" else ""
            notes.append(f"the guard config's {label} {value!r} is overridden by each method's own ({', '.join(replaced)}){hint}")
    return notes

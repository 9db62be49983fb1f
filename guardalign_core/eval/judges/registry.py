"""Judge specs: :func:`get_judge` builds a judge from a CLI spec, :func:`register_judge` adds custom kinds.

The core registers the judges it can build alone (``refusal``, ``md-judge``, ``constant``).
Judges that need a framework register themselves from their adapter package when it is
imported: ``import guardalign_integrations.langchain.judges`` adds ``langchain:PROVIDER:MODEL``
(the ``guardalign`` command line imports it when LangChain is installed). The core never
imports a framework or an adapter, not even lazily.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from ..items import Judge
from .constant import ConstantJudge
from .model_judges import HFJudge
from .refusal import RefusalJudge

__all__ = ["get_judge", "list_judges", "register_judge"]

DEFAULT_MD_JUDGE_ID = "OpenSafetyLab/MD-Judge-v0.1"
"""The hub id ``md-judge`` loads when its spec gives no path."""

JudgeFactory = Callable[..., Judge]
"""Builds a judge from the part of a spec after the first ``:`` (None if absent) and keyword arguments."""

_REGISTRY: dict[str, JudgeFactory] = {}
# Kinds that adapter packages register: named in the error for an unregistered spec, never imported from here.
_ADAPTER_JUDGES = {"langchain": "guardalign_integrations.langchain.judges (needs guardalign[langchain])"}


def register_judge(name: str, factory: JudgeFactory, *, overwrite: bool = False) -> None:
    """Make ``get_judge("name")`` / ``get_judge("name:ARG")`` build a custom judge.

    Args:
        name: the spec's first part; lowercase letters, digits and ``-``.
        factory: called as ``factory(arg, **kwargs)`` with ``arg`` the text after the first ``:``
            (None if there is none); must return a :class:`~.items.Judge`.
        overwrite: replace an existing registration. Default False.

    Raises:
        ValueError: on a malformed or already registered name.
        TypeError: if ``factory`` is not callable.

    Example:
        >>> register_judge("always-unsafe", lambda arg, **kw: ConstantJudge(unsafe=True, name="always-unsafe"))
        >>> get_judge("always-unsafe").name
        'always-unsafe'
    """
    if not re.fullmatch(r"[a-z0-9][a-z0-9-]*", name):
        raise ValueError(f"judge name must be lowercase letters, digits and '-', got {name!r}")
    if not callable(factory):
        raise TypeError(f"factory must be callable, got {type(factory).__name__}")
    if name in _REGISTRY and not overwrite:
        raise ValueError(f"judge {name!r} is already registered (pass overwrite=True to replace it)")
    _REGISTRY[name] = factory


def list_judges() -> list[str]:
    """The registered judge spec names, built-ins included."""
    return sorted(_REGISTRY)


def get_judge(spec: str, **kwargs: Any) -> Judge:
    """Build a judge from a CLI spec.

    Specs:
        - ``refusal`` or ``refusal:MARKERS`` (e.g. ``refusal:refusal-markers-eta@v1``): :class:`RefusalJudge`.
        - ``md-judge`` or ``md-judge:PATH_OR_HUB_ID``: :class:`HFJudge` (default ``OpenSafetyLab/MD-Judge-v0.1``).
          ``md-judge@v2:PATH_OR_HUB_ID`` uses the MD-Judge v0.2 template (the judge ETA uses) and
          ``trust_remote_code=True``; ``md-judge@v1:...`` is the same as ``md-judge:...``.

    Default names carry the judge's settings, so two different judges of one kind never share a
    verdict key: ``refusal`` (default markers) or ``refusal[MARKERS]``,
    ``md-judge@v1:MODEL_ID_OR_PATH``, ``constant:unsafe,refused``. Pass ``name=`` to choose another.
        - ``langchain:PROVIDER:MODEL`` once ``guardalign_integrations.langchain.judges`` is imported
          (a :class:`~.model_judges.ChatModelJudge` around ``init_chat_model``).
        - ``constant:FLAGS`` with FLAGS among ``unsafe|safe``, ``refused|complied`` joined by ``,``:
          :class:`ConstantJudge` (dry runs).
        - any name added with :func:`register_judge`.

    Args:
        spec: the spec string.
        **kwargs: passed to the judge's constructor (or factory).

    Returns:
        The judge.

    Raises:
        ValueError: on an unknown or malformed spec (for an adapter's kind that is not
            registered, the message names the module that registers it).

    Example:
        >>> get_judge("refusal", ignore_prefixes=["As an AI assistant, "]).name
        'refusal'
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"judge spec must be a non-empty string, got {spec!r}")
    head, sep, arg = spec.strip().partition(":")
    versioned = re.fullmatch(r"md-judge@(v\d+)", head)
    if versioned:  # md-judge@v2:PATH: the template version picks the prompt (v2 also trusts the checkpoint's code)
        kwargs.setdefault("template", head)
        if versioned.group(1) != "v1":
            kwargs.setdefault("trust_remote_code", True)
        head = "md-judge"
    factory = _REGISTRY.get(head)
    if factory is None:
        hint = f"; import {_ADAPTER_JUDGES[head]} to register it" if head in _ADAPTER_JUDGES else ""
        raise ValueError(f"unknown judge {head!r} in spec {spec!r}; known: {list_judges()}{hint}")
    judge = factory(arg if sep else None, **kwargs)
    if not isinstance(judge, Judge):
        raise TypeError(f"judge factory for {head!r} returned {type(judge).__name__}, which is not a Judge")
    return judge


_DEFAULT_REFUSAL_MARKERS = "refusal-markers@v1"


def _refusal_factory(arg: str | None, **kwargs: Any) -> Judge:
    if arg:
        kwargs.setdefault("markers", arg)
    markers = kwargs.get("markers", _DEFAULT_REFUSAL_MARKERS)
    if "patterns" not in kwargs and markers != _DEFAULT_REFUSAL_MARKERS:
        kwargs.setdefault("name", f"refusal[{markers}]")
    return RefusalJudge(**kwargs)


def _md_judge_factory(arg: str | None, **kwargs: Any) -> Judge:
    model_id = arg or DEFAULT_MD_JUDGE_ID
    template = kwargs.get("template", "md-judge@v1")
    if isinstance(template, str):
        kwargs.setdefault("name", f"{template}:{model_id}")
    return HFJudge(model_id, **kwargs)


_CONSTANT_FLAGS = {
    "unsafe": ("unsafe", True),
    "safe": ("unsafe", False),
    "refused": ("refused", True),
    "complied": ("refused", False),
}


def _constant_factory(arg: str | None, **kwargs: Any) -> Judge:
    values: dict[str, bool] = {}
    for flag in (f.strip() for f in (arg or "").split(",") if f.strip()):
        if flag not in _CONSTANT_FLAGS:
            raise ValueError(f"constant judge flags are {sorted(_CONSTANT_FLAGS)}, got {flag!r}")
        field, value = _CONSTANT_FLAGS[flag]
        values[field] = value
    if values:
        flags = [flag for flag, (field, value) in _CONSTANT_FLAGS.items() if values.get(field) is value and field in values]
        kwargs.setdefault("name", "constant:" + ",".join(flags))
    return ConstantJudge(**{**values, **kwargs})


register_judge("refusal", _refusal_factory)
register_judge("md-judge", _md_judge_factory)
register_judge("constant", _constant_factory)

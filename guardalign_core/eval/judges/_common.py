"""Shared by the judges: the items/responses length check and the optional-dependency probes."""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Sequence

from ..items import EvalItem


@functools.cache
def _is_available(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _is_transformers_available() -> bool:
    return _is_available("transformers")


def _check_lengths(items: Sequence[EvalItem], responses: Sequence[str]) -> None:
    if len(items) != len(responses):
        raise ValueError(f"items and responses must have the same length, got {len(items)} and {len(responses)}")

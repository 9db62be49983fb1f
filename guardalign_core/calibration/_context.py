"""The one per-call context manager, :func:`calibrated`, and the layers it calibrates.

What: ``with calibrated(model, prefix, config):`` makes the forward/``generate`` calls inside
the block calibrated with ``config``'s strength and layers, in this thread or asyncio task only.
Why one entry point: the call's settings are the only holder of the strength; everything that
reports what a generation did (the pipeline's record) asks :func:`calibrated_layers`, the same
filter this context applies.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

from guardalign_core.calibration._install import CalibrationHandle, get_calibration
from guardalign_core.calibration._state import AttentionCall, CallState, PrefixTensors, prefix_tensors, pushed
from guardalign_core.calibration.config import CalibrationConfig
from guardalign_core.calibration.spans import PrefixSpans

if TYPE_CHECKING:
    from transformers import PreTrainedModel


def _installed(model: PreTrainedModel) -> CalibrationHandle:
    handle = get_calibration(model)
    if handle is None:
        raise ValueError(f"{type(model).__name__} has no calibration installed; call apply_calibration(model) first")
    return handle


def _call_config(handle: CalibrationHandle, config: CalibrationConfig | None) -> CalibrationConfig:
    if config is None:
        return CalibrationConfig(backend=handle.backend)  # type: ignore[arg-type]
    if config.backend != handle.backend:
        raise ValueError(
            f"backend {config.backend!r} differs from the installed {handle.backend!r}; the backend is "
            "fixed by apply_calibration (call it again to switch)"
        )
    return config


def calibrated_layers(model: PreTrainedModel, config: CalibrationConfig | None = None) -> dict[int, float]:
    """``{layer: gamma}`` that :func:`calibrated` applies on ``model`` with ``config``.

    Only the language decoder's self-attention layers count (an Mllama cross-attention layer
    in ``config``'s range is not calibrated, so it is not listed).

    Args:
        model: a model with :func:`apply_calibration` installed.
        config: the call's settings. Default: :class:`CalibrationConfig` on the installed backend.

    Returns:
        Sorted ``{layer_index: gamma}``; empty when ``config`` is disabled or every strength is 0.

    Raises:
        ValueError: no calibration is installed, ``config.backend`` differs from the installed
            one, or ``config``'s layers do not fit the model.

    Example:
        >>> from guardalign_core.testing.tiny_lvlm import build_tiny_lvlm
        >>> from guardalign_core.calibration import apply_calibration
        >>> model, _ = build_tiny_lvlm("mllama")
        >>> _ = apply_calibration(model)
        >>> calibrated_layers(model, CalibrationConfig(gamma=0.5))  # layer 2 is cross-attention
        {1: 0.5}
    """
    handle = _installed(model)
    return handle.layer_gammas(_call_config(handle, config))


@contextlib.contextmanager
def _context(
    handle: CalibrationHandle,
    gammas: dict[int, float],
    tensors: PrefixTensors | None,
    observer: Callable[[AttentionCall], None] | None,
) -> Iterator[dict[int, float]]:
    if (not gammas or tensors is None) and observer is None:
        yield gammas if tensors is not None else {}  # nothing to calibrate: the untouched model runs
        return
    state = CallState(handle.token, gammas, tensors or PrefixTensors.empty(), observer=observer)
    with pushed(state):
        yield gammas if tensors is not None else {}


def calibrated(
    model: PreTrainedModel,
    prefix: PrefixSpans,
    config: CalibrationConfig | None = None,
    *,
    observer: Callable[[AttentionCall], None] | None = None,
) -> contextlib.AbstractContextManager[dict[int, float]]:
    """Calibrate the forward/``generate`` calls made inside this block, in this thread or task only.

    The settings live in a context variable: other threads and asyncio tasks using the same
    model are unaffected, and calls outside the block are bit-identical to the untouched
    model. Run ``generate`` in the same thread (for a streaming worker thread, start it with
    ``contextvars.copy_context().run`` or enter the block inside it). Nested blocks on one
    model: the innermost applies.

    Calibrated queries are the row's last prefix token and every later position: the query at
    position ``i`` produces token ``i + 1``, so these are the queries that produce the tokens
    after the prefix (the first answer token included when the prefix ends the prompt).

    Args:
        model: a model with :func:`~guardalign_core.calibration.apply_calibration` installed.
        prefix: safety-prefix token positions of this call's ``input_ids``: a
            ``(batch, seq_len)`` bool mask, or one ``(start, end)`` span (or ``None``) per row,
            in padded coordinates (see :func:`~guardalign_core.calibration.find_prefix_spans`).
            ``None`` or an empty mask calibrates nothing. Rows are repeated for beam
            search/``num_return_sequences``.
        config: this call's strength, layers and on/off switch. Default:
            :class:`CalibrationConfig` (the library's defaults) on the installed backend.
        observer: optional diagnostic callback, called with an
            :class:`~guardalign_core.calibration.AttentionCall` after every attention call of the
            installed layers inside the block.

    Returns:
        A context manager; ``as`` gives the ``{layer: gamma}`` calibrated (empty: none).

    Raises:
        ValueError: the model has no calibration installed, ``config.backend`` differs from the
            installed one, ``config``'s layers do not fit the model, or ``prefix`` is malformed.
            All raised here, before any forward pass.

    Example:
        >>> handle = apply_calibration(model)  # doctest: +SKIP
        >>> spans = find_prefix_spans(inputs["input_ids"], prefix_ids, inputs["attention_mask"])  # doctest: +SKIP
        >>> with calibrated(model, spans, CalibrationConfig(gamma=0.01)) as layers:  # doctest: +SKIP
        ...     output_ids = model.generate(**inputs, max_new_tokens=64)
    """
    handle = _installed(model)
    gammas = handle.layer_gammas(_call_config(handle, config))
    return _context(handle, gammas, prefix_tensors(prefix), observer)

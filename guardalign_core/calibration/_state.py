"""Per-call calibration state: which prefix keys, which queries, what strength per layer.

What: a :class:`CallState` is built by :func:`~guardalign_core.calibration.calibrated` for one
block of forward/``generate`` calls and pushed on a :class:`contextvars.ContextVar`, so two
threads or asyncio tasks generating on one shared model never see each other's settings.
Each forward pass (prefill, or one decoding step) gets one :class:`Geometry`: the tensors that
are the same in every calibrated layer of that pass (visibility of the prefix keys, the
additive base mask, the per-strength coefficients and one reusable mask buffer), computed by
the pass's first calibrated layer and reused by the others.

Why here: the attention-interface functions only read this state; installation only hands out
the owner token it is matched by. Nothing here touches a model.

Which queries are calibrated: every query at or after the row's *last* prefix position. In a
causal LM the query at position ``i`` produces token ``i + 1``, so these are exactly the
queries whose outputs are the tokens after the prefix — the first generated token included
when the prefix ends the prompt (``placement="response"``). See docs/calibration.md.
"""

from __future__ import annotations

import contextlib
import contextvars
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from guardalign_core.calibration.bias import allowed_from_mask
from guardalign_core.calibration.spans import PrefixSpans

_NO_QUERY = torch.iinfo(torch.long).max  # a first-query position no key reaches: the row is not calibrated


@dataclass(frozen=True)
class AttentionCall:
    """What one calibrated attention call saw; handed to an observer (diagnostics, tests).

    Attributes:
        layer_idx: decoder layer index.
        query: ``(batch, heads, q_len, head_dim)`` as passed to the attention function.
        key: ``(batch, kv_heads, kv_len, head_dim)`` (the whole cache at decoding steps).
        attention_mask: the mask handed to the stock function (the biased float mask when a
            bias was applied, otherwise the original one).
        weights: attention probabilities from the eager backend, else ``None``.
        gamma: the strength used in this layer (0 when not calibrated).
        prefix_index: ``(batch, P)`` prefix key positions (padded with 0).
        prefix_valid: ``(batch, P)`` which entries of ``prefix_index`` are real.
        calibrated_queries: ``(batch, q_len)`` which queries are calibrated: the row's last
            prefix token and every later position.
    """

    layer_idx: int
    query: torch.Tensor
    key: torch.Tensor
    attention_mask: torch.Tensor | None
    weights: torch.Tensor | None
    gamma: float
    prefix_index: torch.Tensor
    prefix_valid: torch.Tensor
    calibrated_queries: torch.Tensor


@dataclass(frozen=True)
class PrefixTensors:
    """The prefix of one call as tensors on the host.

    Attributes:
        index: ``(batch, P)`` prefix key positions, padded with 0.
        valid: ``(batch, P)`` which entries of ``index`` are real.
        first_query: ``(batch,)`` the row's last prefix position (queries from it on are
            calibrated); a value no position reaches for a row without a prefix.
        span: ``(start, stop)`` when every row's prefix is the same contiguous span (always
            for a single row), so layers can slice instead of gather; else ``None``.
    """

    index: torch.Tensor
    valid: torch.Tensor
    first_query: torch.Tensor
    span: tuple[int, int] | None

    @property
    def max_position(self) -> int:
        """Largest prefix position (-1 without any), checked on the host: no device sync per layer."""
        return int(torch.where(self.valid, self.index, -1).max()) if self.index.numel() else -1

    @classmethod
    def empty(cls) -> PrefixTensors:
        """No prefix at all (an observed call that calibrates nothing)."""
        index = torch.zeros(1, 0, dtype=torch.long)
        return cls(index, index.bool(), torch.full((1,), _NO_QUERY), None)


def prefix_tensors(prefix: PrefixSpans) -> PrefixTensors | None:
    """:class:`PrefixTensors` from a bool mask or per-row spans; ``None`` if there is no prefix.

    Raises:
        ValueError: a mask that is not ``(batch, seq_len)``, or a span with ``start > end``.
        TypeError: a flat list of ints instead of one ``(start, end)`` pair per row.
    """
    if prefix is None:
        return None
    if isinstance(prefix, torch.Tensor):
        if prefix.dim() == 1:
            prefix = prefix.unsqueeze(0)
        if prefix.dim() != 2:
            raise ValueError(f"prefix mask must be (batch, seq_len), got shape {tuple(prefix.shape)}")
        mask = prefix.detach().to("cpu", torch.bool)
    else:
        rows = list(prefix)
        if rows and isinstance(rows[0], int):
            raise TypeError("prefix spans must be a list of (start, end) pairs, one per row")
        ends = [span[1] for span in rows if span is not None]
        mask = torch.zeros(len(rows), max(ends, default=0), dtype=torch.bool)
        for row, span in enumerate(rows):
            if span is None:
                continue
            start, end = int(span[0]), int(span[1])
            if not 0 <= start <= end:
                raise ValueError(f"prefix span of row {row} must satisfy 0 <= start <= end, got {span}")
            mask[row, start:end] = True
    if mask.shape[0] == 0 or not bool(mask.any()):
        return None
    counts = mask.sum(dim=1)  # (batch,)
    width = int(counts.max())
    positions = torch.arange(mask.shape[1]).expand_as(mask)
    # Sorting puts each row's prefix positions first, in order; the rest is padding.
    order = torch.where(mask, positions, mask.shape[1] + positions).argsort(dim=1)[:, :width]
    valid = torch.arange(width)[None, :] < counts[:, None]  # (batch, P)
    index = torch.where(valid, order, torch.zeros_like(order))  # (batch, P)
    last = torch.where(mask, positions, -1).max(dim=1).values  # (batch,)
    first_query = torch.where(counts > 0, last, torch.full_like(last, _NO_QUERY))
    span = None
    first, stop = int(index[0, 0]), int(last[0]) + 1
    if bool(valid.all()) and stop - first == width and bool((index == index[:1]).all()):
        span = (first, stop)  # every row: the same contiguous positions
    return PrefixTensors(index, valid, first_query, span)


class Geometry:
    """Per-forward quantities shared by every calibrated layer (same mask, same prefix).

    Built by the first calibrated layer of a forward pass; the others reuse it, and with it one
    mask buffer per head count, of which each layer rewrites only the few prefix columns.
    """

    def __init__(
        self,
        mask: torch.Tensor | None,
        key: tuple[Any, ...],
        index: torch.Tensor,
        valid: torch.Tensor,
        span: tuple[int, int] | None,
        calibrated: torch.Tensor,
        any_query: bool,
        visible: torch.Tensor | None,
        base: torch.Tensor | None,
    ) -> None:
        self.mask = mask  # the incoming mask, held so that its identity stays unique
        self.key = key  # (batch, q_len, kv_len, is_causal, dtype, device, thread)
        self.index = index  # (b, P) prefix key positions on the device
        self.valid = valid  # (b, P) which entries of index are real
        self.span = span
        self.calibrated = calibrated  # (b, q) which queries are calibrated
        self.any_query = any_query  # False: no query to bias (e.g. a prompt that ends before the prefix)
        self.visible = visible  # (b, 1, q, P) float32: 1 where a bias applies
        self.base = base  # (b, 1, q, kv) additive float mask without bias
        self._coefficients: dict[float, torch.Tensor] = {}
        self._buffers: dict[int, torch.Tensor] = {}
        self._scatter: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def coefficient(self, scale: float) -> torch.Tensor:
        """``visible * gamma * scaling`` for one layer's ``scale = gamma * scaling`` (cached)."""
        coef = self._coefficients.get(scale)
        if coef is None:
            coef = self.visible * scale  # type: ignore[operator]
            self._coefficients[scale] = coef
        return coef

    def biased(self, heads: int, bias: torch.Tensor) -> torch.Tensor:
        """The base mask with ``bias`` ``(b, heads, q, P)`` added on the prefix columns.

        Returns the pass's shared ``(b, heads, q, kv)`` buffer: its non-prefix columns are the
        base mask and are never written, its prefix columns hold this layer's bias until the
        next layer overwrites them (the stock function consumes the mask before that, in order).
        """
        base = self.base
        assert base is not None  # only called when a bias applies
        buffer = self._buffers.get(heads)
        if buffer is None:
            batch, _, q_len, kv_len = base.shape
            buffer = self._buffers[heads] = base.expand(batch, heads, q_len, kv_len).contiguous()
        bias = bias.to(buffer.dtype)
        if self.span is not None:
            start, stop = self.span
            torch.add(base[..., start:stop], bias, out=buffer[..., start:stop])
        else:
            index, at_prefix = self._scatter_index(heads)
            buffer.scatter_(-1, index, at_prefix)  # reset the prefix columns (duplicates write one value)
            buffer.scatter_add_(-1, index, bias)
        return buffer

    def _scatter_index(self, heads: int) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._scatter.get(heads)
        if cached is None:
            base = self.base
            assert base is not None
            batch, _, q_len, _ = base.shape
            index = self.index[:, None, None, :].expand(batch, heads, q_len, self.index.shape[1])
            cached = self._scatter[heads] = (index, base.expand(batch, heads, -1, -1).gather(-1, index))
        return cached


@dataclass(frozen=True)
class CallState:
    """The settings of one calibrated block: owner token, ``{layer: gamma}``, prefix, observer."""

    owner: object
    layer_gamma: Mapping[int, float]
    prefix: PrefixTensors
    observer: Callable[[AttentionCall], None] | None = None
    _by_device: dict[Any, tuple[torch.Tensor, ...]] = field(default_factory=dict, compare=False)
    _geometries: list[Geometry] = field(default_factory=list, compare=False)

    def tensors(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(index, valid, first_query)`` on ``device``, rows repeated for beam search/``num_return_sequences``."""
        rows = self.prefix.index.shape[0]
        if batch % rows:
            raise ValueError(
                f"calibration prefix covers {rows} row(s) but attention runs on a batch of {batch}; "
                "give one prefix span per input row"
            )
        cache_key = (batch, str(device))
        cached = self._by_device.get(cache_key)
        if cached is None:
            repeat = batch // rows
            cached = tuple(
                t.to(device).repeat_interleave(repeat, dim=0)
                for t in (self.prefix.index, self.prefix.valid, self.prefix.first_query)
            )
            self._by_device[cache_key] = cached
        return cached  # type: ignore[return-value]

    def geometry(
        self, attention_mask: torch.Tensor | None, batch: int, q_len: int, kv_len: int, is_causal: bool,
        dtype: torch.dtype, device: torch.device,
    ) -> Geometry:
        """The :class:`Geometry` of this forward pass, computed by its first layer only.

        All layers of one forward pass receive the same mask object, so it is the cache key
        (with the shapes and the thread, so concurrent copies of one context never share a
        buffer); two entries cover models that alternate full and sliding-window masks.
        """
        key = (batch, q_len, kv_len, is_causal, dtype, str(device), threading.get_ident())
        for geo in self._geometries:
            if geo.mask is attention_mask and geo.key == key:
                return geo
        geo = self._make_geometry(attention_mask, key, device)
        self._geometries[:] = [geo, *self._geometries[:1]]
        return geo

    def _make_geometry(self, attention_mask: torch.Tensor | None, key: tuple[Any, ...], device: torch.device) -> Geometry:
        batch, q_len, kv_len, is_causal, dtype = key[:5]
        index, valid, first_query = self.tensors(batch, device)
        if self.prefix.max_position >= kv_len:
            raise ValueError(
                f"calibration prefix reaches position {self.prefix.max_position} but attention sees only {kv_len} keys; "
                "the prefix must index this call's input_ids"
            )
        allowed = allowed_from_mask(attention_mask, q_len, kv_len, is_causal, device)
        allowed = allowed.expand(batch, 1, q_len, kv_len)
        # A query is calibrated iff it may attend to the row's last prefix position; this reads
        # the query positions off the causal mask (cache offsets and left padding included).
        in_range = first_query < kv_len  # (batch,)
        probe = first_query.clamp(max=kv_len - 1).view(batch, 1, 1, 1).expand(batch, 1, q_len, 1)
        calibrated = allowed.gather(-1, probe).view(batch, q_len) & in_range[:, None]  # (batch, q_len)
        # At prefill, skip the bias (and keep SDPA's fast path) when no query is calibrated;
        # decoding steps always build it (it is tiny), which also avoids a device sync per step.
        any_query = index.shape[1] > 0 and (q_len == 1 or bool(calibrated.any()))
        visible = base = None
        if any_query:
            cols = index[:, None, None, :].expand(batch, 1, q_len, index.shape[1])
            visible = (allowed.gather(-1, cols) & valid[:, None, None, :] & calibrated[:, None, :, None]).float()
            if attention_mask is None or attention_mask.dtype == torch.bool:
                zero = torch.zeros((), dtype=dtype, device=device)
                base = torch.where(allowed, zero, torch.finfo(dtype).min)  # as eager_mask builds it
            else:
                base = attention_mask.expand(batch, -1, q_len, kv_len)
        return Geometry(attention_mask, key, index, valid, self.prefix.span, calibrated, any_query, visible, base)


_CALL_STATES: contextvars.ContextVar[tuple[CallState, ...]] = contextvars.ContextVar(
    "guardalign_calibration_states", default=()
)


def active_state(owner: object | None) -> CallState | None:
    """The innermost call state of this thread/task for the install ``owner``, or ``None``."""
    if owner is None:
        return None
    for state in reversed(_CALL_STATES.get()):
        if state.owner is owner:
            return state
    return None


@contextlib.contextmanager
def pushed(state: CallState) -> Iterator[None]:
    """Make ``state`` active in this thread/task for the duration of the block."""
    token = _CALL_STATES.set((*_CALL_STATES.get(), state))
    try:
        yield
    finally:
        _CALL_STATES.reset(token)

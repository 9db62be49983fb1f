r"""The two functions registered with transformers' ``AttentionInterface`` (Eqs. 12-14).

What: ``"guardalign_sdpa"`` and ``"guardalign_eager"`` add, in the calibrated layers,

.. math::

    \hat Z = Z + \gamma \, M \circ Z, \quad Z = QK^\top/\sqrt{d_k}, \quad
    M_{ij} = \max(0, \langle Q_i, K_j\rangle)

for calibrated queries ``i`` and prefix keys ``j`` to the attention mask, then delegate to the
stock ``sdpa`` or the family's ``eager`` function. The bias touches only the few prefix-key
columns and is computed from ``query`` and ``key``, so SDPA stays a fused kernel (one that
takes a float mask) and nothing is monkey-patched.

Why it is cheap per layer: everything that does not depend on the layer's query and key (the
visibility of the prefix keys, the base mask, the coefficient per strength and the mask buffer
itself) is computed once per forward pass or decoding step by
:meth:`~guardalign_core.calibration._state.CallState.geometry`; a layer only computes the
``(q, P)`` scores of its prefix keys and writes them into the buffer's prefix columns (a slice,
not a gather, when all rows share one prefix span).

References:
    GuardAlign (arXiv 2602.24027), Eqs. 12-14.
"""

from __future__ import annotations

import threading
from typing import Any

import torch

from guardalign_core.calibration._state import AttentionCall, Geometry, active_state
from guardalign_core.calibration.bias import raw_prefix_scores

SDPA_KEY = "guardalign_sdpa"
"""Attention-interface key of the calibrated function that delegates to the stock ``sdpa``."""
EAGER_KEY = "guardalign_eager"
"""Attention-interface key of the calibrated function that delegates to the family's eager attention."""

OWNER_ATTR = "_guardalign_owner"  # on attention modules: the install token their call states carry
EAGER_ATTR = "_guardalign_eager"  # on attention modules: the family's stock eager function

_register_lock = threading.Lock()
_registered: dict[str, Any] = {}  # "functions": transformers' ALL_ATTENTION_FUNCTIONS, once registered


def biased_mask(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    geo: Geometry,
    gamma: float,
    scaling: float,
) -> torch.Tensor | None:
    """The mask with Eq. 13's bias added on the prefix columns (the original when none applies).

    Args:
        query: ``(batch, heads, q_len, head_dim)``.
        key: ``(batch, kv_heads, kv_len, head_dim)``.
        attention_mask: the mask the stock function would have received.
        geo: this forward pass's :class:`~guardalign_core.calibration._state.Geometry`.
        gamma: the layer's strength.
        scaling: the attention's score scaling ``s`` (``1/sqrt(d_k)``).

    Returns:
        ``(batch, heads, q_len, kv_len)`` float mask, or ``attention_mask`` itself when the
        layer is not calibrated or no query of this pass is.
    """
    if gamma == 0 or not geo.any_query:
        return attention_mask
    batch, heads, _, _ = query.shape
    kv_heads, head_dim = key.shape[1], key.shape[3]
    if geo.span is not None:
        prefix_keys = key[:, :, geo.span[0] : geo.span[1]]  # (b, kv_heads, P, d): a view
    else:
        num_prefix = geo.index.shape[1]
        gather_kv = geo.index[:, None, :, None].expand(batch, kv_heads, num_prefix, head_dim)
        prefix_keys = key.gather(2, gather_kv)  # (b, kv_heads, P, d)
    raw = raw_prefix_scores(query, prefix_keys)  # (b, heads, q, P)
    bias = torch.relu(raw).mul_(raw).mul_(geo.coefficient(gamma * scaling))  # gamma*M*Z on visible cells
    return geo.biased(heads, bias)


def _calibrated_attention(
    backend: str,
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *args: Any,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Shared body of the two registered functions: bias the mask, then delegate."""
    if backend == "sdpa":
        delegate = _registered["functions"]["sdpa"]
    else:
        delegate = getattr(module, EAGER_ATTR, None) or _generic_eager_attention
    state = active_state(getattr(module, OWNER_ATTR, None))
    if state is None:
        return delegate(module, query, key, value, attention_mask, *args, **kwargs)

    layer_idx = module.layer_idx
    gamma = state.layer_gamma.get(layer_idx, 0.0)
    scaling = kwargs.get("scaling")
    if scaling is None:
        scaling = query.shape[-1] ** -0.5
    is_causal = kwargs.get("is_causal")
    if is_causal is None:
        is_causal = getattr(module, "is_causal", True)
    geo = state.geometry(
        attention_mask, query.shape[0], query.shape[2], key.shape[2], bool(is_causal), query.dtype, query.device
    )
    mask = biased_mask(query, key, attention_mask, geo, gamma, float(scaling))
    output, weights = delegate(module, query, key, value, mask, *args, **kwargs)
    if state.observer is not None:
        seen = mask.clone() if mask is not attention_mask and mask is not None else mask  # the buffer is reused
        state.observer(
            AttentionCall(
                layer_idx=layer_idx, query=query, key=key, attention_mask=seen, weights=weights, gamma=gamma,
                prefix_index=geo.index, prefix_valid=geo.valid, calibrated_queries=geo.calibrated,
            )
        )
    return output, weights


def _generic_eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama's eager attention, for families whose modeling file has none of its own."""
    groups = query.shape[1] // key.shape[1]
    key = key.repeat_interleave(groups, dim=1)  # (b, heads, kv, d)
    value = value.repeat_interleave(groups, dim=1)
    scaling = query.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, weights


def guardalign_sdpa_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                              value: torch.Tensor, attention_mask: torch.Tensor | None,
                              *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention-interface function ``"guardalign_sdpa"``: calibrated mask, then stock SDPA."""
    return _calibrated_attention("sdpa", module, query, key, value, attention_mask, *args, **kwargs)


def guardalign_eager_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                               value: torch.Tensor, attention_mask: torch.Tensor | None,
                               *args: Any, **kwargs: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Attention-interface function ``"guardalign_eager"``: calibrated mask, then the family's eager."""
    return _calibrated_attention("eager", module, query, key, value, attention_mask, *args, **kwargs)


def register_interfaces() -> None:
    """Register both functions and their mask builders once per process (idempotent, thread-safe)."""
    with _register_lock:
        if _registered:
            return
        from transformers import AttentionInterface
        from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

        AttentionInterface.register(SDPA_KEY, guardalign_sdpa_attention)
        AttentionInterface.register(EAGER_KEY, guardalign_eager_attention)
        # Without a mask builder under the same key, transformers builds no causal mask at all.
        AttentionMaskInterface.register(SDPA_KEY, sdpa_mask)
        AttentionMaskInterface.register(EAGER_KEY, eager_mask)
        _registered["functions"] = ALL_ATTENTION_FUNCTIONS

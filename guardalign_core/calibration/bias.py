"""The pure math of the calibration: the prefix score bias of Eq. 13 and the visibility mask it respects.

No model, no state: tensors in, tensors out, so the equations are tested on their own.
"""

from __future__ import annotations

import torch

__all__ = ["prefix_score_bias"]


def prefix_score_bias(
    query: torch.Tensor,
    prefix_keys: torch.Tensor,
    gamma: float,
    scaling: float,
) -> torch.Tensor:
    r"""The additive score bias of Eq. 13 for the prefix-key columns only.

    .. math::

        B_{ij} = \gamma \, \max(0, \langle Q_i, K_j\rangle) \, \langle Q_i, K_j\rangle \, s

    with ``s`` the attention's score scaling (``1/sqrt(d_k)``), so that ``Z + B = \hat Z``.

    Args:
        query: ``(batch, heads, q_len, head_dim)``.
        prefix_keys: ``(batch, kv_heads, P, head_dim)``; ``heads`` must be a multiple of
            ``kv_heads`` (grouped-query attention: query head ``h`` reads key head
            ``h // (heads // kv_heads)``, as ``repeat_kv`` does).
        gamma: strength (>= 0).
        scaling: score scaling ``s``.

    Returns:
        ``(batch, heads, q_len, P)`` float32 bias, >= 0.

    References:
        GuardAlign (arXiv 2602.24027), Eqs. 12-13.

    Example:
        >>> q, k = torch.ones(1, 2, 1, 4), torch.ones(1, 1, 3, 4)
        >>> prefix_score_bias(q, k, gamma=0.5, scaling=0.5).shape
        torch.Size([1, 2, 1, 3])
    """
    raw = raw_prefix_scores(query, prefix_keys)
    return gamma * scaling * torch.relu(raw) * raw


def raw_prefix_scores(query: torch.Tensor, prefix_keys: torch.Tensor) -> torch.Tensor:
    """``<Q_i, K_j>`` in float32, ``(b, heads, q, P)``, without repeating the key heads."""
    batch, heads, q_len, head_dim = query.shape
    kv_heads, num_prefix = prefix_keys.shape[1], prefix_keys.shape[2]
    groups = heads // kv_heads
    q = query.float().reshape(batch, kv_heads, groups, q_len, head_dim)  # (b, kv_heads, groups, q, d)
    k = prefix_keys.float().unsqueeze(2)  # (b, kv_heads, 1, P, d)
    raw = torch.matmul(q, k.transpose(-1, -2))  # (b, kv_heads, groups, q, P)
    return raw.reshape(batch, heads, q_len, num_prefix)  # head h reads kv head h // groups


def allowed_from_mask(
    attention_mask: torch.Tensor | None, q_len: int, kv_len: int, is_causal: bool, device: torch.device
) -> torch.Tensor:
    """Boolean ``(b|1, 1, q, kv)`` view of which keys each query may see.

    A ``None`` mask means SDPA's implicit pattern: everything for one query (decoding),
    otherwise ``is_causal`` with SDPA's upper-left alignment (exactly what the stock function
    would have used).
    """
    if attention_mask is None:
        if q_len == 1 or not is_causal:
            return torch.ones(1, 1, q_len, kv_len, dtype=torch.bool, device=device)
        causal = torch.arange(q_len, device=device)[:, None] >= torch.arange(kv_len, device=device)[None, :]
        return causal.view(1, 1, q_len, kv_len)
    if attention_mask.dtype == torch.bool:
        return attention_mask[:, :1]
    return attention_mask[:, :1] > torch.finfo(attention_mask.dtype).min / 2

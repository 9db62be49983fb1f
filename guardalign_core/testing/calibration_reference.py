"""The per-layer calibration bias builder that the per-forward mask buffer replaced, kept as a reference.

What: :func:`legacy_biased_mask` is the previous ``_biased_mask`` verbatim — per calibrated
layer it gathered the prefix keys, copied the whole ``(batch, heads, q, kv)`` base mask and
scattered the Eq. 13 bias into it. Why: the tests check that the buffer computes exactly the
same masks, and ``benchmarks/calibration_bias.py`` times the two side by side; one copy serves
both.
"""

from __future__ import annotations

import torch

from ..calibration.bias import raw_prefix_scores

__all__ = ["legacy_biased_mask"]


def legacy_biased_mask(query, key, attention_mask, geo, gamma, scaling):
    """The per-layer rebuild the buffer replaced: gather the prefix keys, copy the whole base mask, scatter the bias."""
    if gamma == 0 or not geo.any_query:
        return attention_mask
    batch, heads, q_len, _ = query.shape
    kv_heads, kv_len, head_dim = key.shape[1], key.shape[2], key.shape[3]
    num_prefix = geo.index.shape[1]
    gather_kv = geo.index[:, None, :, None].expand(batch, kv_heads, num_prefix, head_dim)
    prefix_keys = key.gather(2, gather_kv)
    raw = raw_prefix_scores(query, prefix_keys)
    bias = torch.relu(raw).mul_(raw).mul_(geo.coefficient(gamma * scaling))
    mask = geo.base.expand(batch, heads, q_len, kv_len).contiguous()
    mask.scatter_add_(-1, geo.index[:, None, None, :].expand(batch, heads, q_len, num_prefix), bias.to(mask.dtype))
    return mask

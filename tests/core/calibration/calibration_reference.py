"""NumPy reference of Eq. 13 for the calibration tests (float64, from one call's query and key)."""

from __future__ import annotations

import numpy as np

from guardalign_core.calibration import AttentionCall


def eq13_weights(call: AttentionCall, span: tuple[int, int], gamma: float) -> np.ndarray:
    """Attention probabilities of Eq. 13 for this call's queries, in float64 NumPy."""
    q = call.query.double().numpy()  # (1, heads, q_len, d)
    k = call.key.double().numpy()  # (1, kv_heads, kv_len, d)
    k = np.repeat(k, q.shape[1] // k.shape[1], axis=1)  # repeat_kv order
    q_len, kv_len, d = q.shape[2], k.shape[2], q.shape[3]
    raw = q @ k.transpose(0, 1, 3, 2)  # <Q_i, K_j>
    z = raw / np.sqrt(d)
    positions = np.arange(kv_len - q_len, kv_len)  # absolute query positions (no padding)
    start, end = span
    z_hat = z.copy()
    for row, pos in enumerate(positions):
        if pos >= end - 1:  # calibrated query: the last prefix token and every later one
            cols = slice(start, end)
            z_hat[..., row, cols] += gamma * np.maximum(raw[..., row, cols], 0.0) * z[..., row, cols]
    causal = np.arange(kv_len)[None, :] <= positions[:, None]  # (q_len, kv_len)
    z_hat = np.where(causal, z_hat, -np.inf)
    z_hat -= z_hat.max(axis=-1, keepdims=True)
    weights = np.exp(z_hat)
    return weights / weights.sum(axis=-1, keepdims=True)

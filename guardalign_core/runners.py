"""The process-wide registry of local LVLM runners: one set of weights per checkpoint.

What: :func:`get_local_lvlm` returns the shared :class:`~guardalign_core.lvlm.LocalLVLM` for a
checkpoint, device, dtype and attention backend, creating it (lazily loaded) on first use;
:func:`release_local_lvlms` forgets runners so their weights can be freed.

Why one registry: the LangChain chat model, the LlamaIndex LLM, the server and the CLI all go
through it, so several users of one checkpoint load it once. A runner holds no calibration
strength or layers (those are each call's), so sharing one never lets a user's setting leak
into another's.
"""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Literal

from .lvlm import LocalLVLM

_SHARED: dict[tuple[str, str, str, str, bool], LocalLVLM] = {}  # the process-wide runner registry
_SHARED_LOCK = threading.Lock()


def get_local_lvlm(
    model_id: str,
    *,
    device: str = "cpu",
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto",
    backend: Literal["sdpa", "eager"] = "sdpa",
    trust_remote_code: bool = False,
    max_concurrent: int | None = None,
) -> LocalLVLM:
    """The process-wide runner for ``model_id`` on ``device``/``dtype``: one set of weights shared.

    The adapters (the LangChain chat model, the LlamaIndex LLM), the server and the CLI call
    this so that several of them on the same checkpoint load it once. Nothing loads until
    first use. The runner holds no calibration strength or layers: each caller passes its own
    per call, so users of one runner may differ in both; ``backend`` is installed on the model
    and so is part of the key. ``max_concurrent``, when given, sets the runner's limit on
    simultaneous generations (shared by all its users: the last setting wins).
    """
    key = (_model_key(model_id), device, dtype, backend, trust_remote_code)
    with _SHARED_LOCK:
        runner = _SHARED.get(key)
        if runner is None:
            runner = _SHARED[key] = LocalLVLM(
                model_id, device=device, dtype=dtype, backend=backend, trust_remote_code=trust_remote_code
            )
        if max_concurrent is not None and max_concurrent != runner.max_concurrent:
            runner.limit_concurrency(max_concurrent)
        return runner


def _model_key(model_id: str) -> str:
    """One key per checkpoint: local folders by their resolved path (``./m`` and ``m/`` are one model)."""
    path = Path(model_id).expanduser()
    return str(path.resolve()) if path.exists() else model_id


def release_local_lvlms(model_id: str | None = None) -> int:
    """Forget the shared runners (of ``model_id``, or all), so their weights can be freed.

    Adapters that still hold a runner keep it; the next new user loads the checkpoint again.

    Returns:
        How many runners were released.
    """
    with _SHARED_LOCK:
        keys = [k for k in _SHARED if model_id is None or k[0] == _model_key(model_id)]
        for key in keys:
            del _SHARED[key]
    return len(keys)

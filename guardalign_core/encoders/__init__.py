"""The CLIP backbone: one shared, loaded open_clip model per execution path.

- :class:`ClipEncoder` — loading (QuickGELU where the weights need it), bounded-memory
  preprocessing, batched image/text/token encoding, the text-embedding cache.
- :func:`get_clip_encoder` / :func:`encoder_for_config` — the process-wide shared encoder.
- :func:`resolve_execution` — what ``device='auto'``, ``dtype='auto'``, ``backend='auto'``
  mean on this machine.
"""

from __future__ import annotations

import logging
import threading
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from ._clip import MIN_AGREEMENT, ClipEncoder, _register_shipped_configs, build_open_clip_model, model_build_kwargs
from ._execution import (
    Execution,
    cpu_has_native_bf16,
    is_openvino_available,
    resolve_backend,
    resolve_device,
    resolve_dtype,
    resolve_execution,
)

if TYPE_CHECKING:
    from ..config import DetectorConfig

__all__ = [
    "MIN_AGREEMENT",
    "ClipEncoder",
    "Execution",
    "build_open_clip_model",
    "clear_clip_cache",
    "cpu_has_native_bf16",
    "default_cache_dir",
    "encoder_for_config",
    "get_clip_encoder",
    "is_openvino_available",
    "model_build_kwargs",
    "resolve_backend",
    "resolve_device",
    "resolve_dtype",
    "resolve_execution",
]

logger = logging.getLogger(__name__)

_CACHE: dict[tuple, ClipEncoder] = {}
_CACHE_LOCK = threading.Lock()


def default_cache_dir() -> Path:
    """Where text embeddings and backend exports are cached when a config names no ``cache_dir``."""
    return Path.home() / ".cache" / "guardalign"


def get_clip_encoder(
    model: str,
    pretrained: str | None,
    device: str = "cpu",
    dtype: str = "float32",
    backend: str = "torch",
    cache_dir: str | Path | None = None,
) -> ClipEncoder:
    """Return the process-wide shared :class:`ClipEncoder` for these settings, loading it once.

    ``'auto'`` values are resolved first, so ``dtype='auto'`` and the dtype it resolves to
    share one encoder. ``cache_dir`` only says where a backend export is cached.

    Example:
        >>> enc = get_clip_encoder("ViT-B-32", "openai")  # doctest: +SKIP
        >>> enc is get_clip_encoder("ViT-B-32", "openai")  # doctest: +SKIP
        True
    """
    execution = resolve_execution(device, dtype, backend)
    key = (model, pretrained, execution)
    with _CACHE_LOCK:
        encoder = _CACHE.get(key)
        if encoder is not None and backend != "auto" and encoder.backend != execution.backend:
            encoder = None  # an 'auto' load fell back; an explicit request must succeed or raise
        if encoder is None:
            logger.info("loading CLIP %s (pretrained=%s) on %s", model, pretrained, execution)
            # An 'auto' backend may fall back to torch on load; the request is passed as given.
            encoder = ClipEncoder(model, pretrained, execution.device, execution.dtype, backend, cache_dir)
            _CACHE[key] = encoder
        return encoder


def encoder_for_config(config: "DetectorConfig", *, loader: Callable[..., ClipEncoder] | None = None) -> ClipEncoder:
    """The shared encoder a :class:`~guardalign_core.config.DetectorConfig` asks for (device, dtype, backend, cache).

    Args:
        config: the detector's settings; ``'auto'`` values are resolved for this machine.
        loader: what loads it (default :func:`get_clip_encoder`); the detector passes its own
            module's name for it, the one seam tests patch to prove nothing loads.

    Example:
        >>> encoder_for_config(DetectorConfig(model="ViT-B-32")).execution  # doctest: +SKIP
        Execution(device='cpu', dtype='float32', backend='openvino')
    """
    cache_dir = None
    if config.disk_cache:
        cache_dir = Path(config.cache_dir).expanduser() if config.cache_dir else default_cache_dir()
    load = loader or get_clip_encoder
    return load(config.model, config.pretrained, config.device, config.dtype, config.backend, cache_dir)


def clear_clip_cache() -> None:
    """Forget every shared encoder (frees memory; the next use loads again)."""
    with _CACHE_LOCK:
        _CACHE.clear()

"""Whether model weights can be had, decided in seconds: a local path, the local cache, or a reachable hub.

Without this, a missing checkpoint on a machine with no hub access took 47–49 s of
``huggingface_hub`` retries (each file, each safetensors alternative, backing off 1, 2, 4, 8 s)
and printed more than 20 warning lines before failing with a hint about model names. Here,
before any download starts: weights already on disk (a path, or the Hugging Face cache) are
used with no network at all; otherwise, when ``HF_HUB_OFFLINE`` is set or one quick probe of
the hub endpoint (``HF_ENDPOINT``, no retries, :data:`PROBE_TIMEOUT_S`) gets no answer, the
load fails at once with one :class:`~guardalign_core.errors.ModelLoadError` that says the
weights could not be fetched and how to point at a local copy.

Only ``huggingface_hub``'s own mechanisms are used: its offline flag, its cache lookup
(``try_to_load_from_cache``) and its HTTP session for the probe.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from pathlib import Path
from urllib.parse import urlsplit

from .errors import ModelLoadError

PROBE_TIMEOUT_S = 3.0
"""Seconds the one connectivity probe may take before the hub counts as unreachable."""


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``), as ``huggingface_hub`` read it."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def hub_endpoint() -> str:
    """The hub endpoint in use (``HF_ENDPOINT`` or huggingface.co)."""
    from huggingface_hub import constants

    return constants.ENDPOINT


def hub_reachable(timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """One ``HEAD`` request to the hub endpoint through ``huggingface_hub``'s session, no retries.

    Any HTTP answer (even an error status) means reachable: the real download then reports
    what is wrong. A connection error, a timeout or offline mode means unreachable.
    """
    if is_offline():
        return False
    from huggingface_hub import get_session

    try:
        get_session().head(hub_endpoint(), timeout=timeout_s, follow_redirects=False)
    except (*_http_errors(), OSError):
        return False
    return True


def _http_errors() -> tuple[type[BaseException], ...]:
    """The HTTP client's error base class (``huggingface_hub`` 2.x uses ``httpx2``, 1.x ``httpx``)."""
    errors: list[type[BaseException]] = []
    for module in ("httpx2", "httpx"):
        try:
            errors.append(__import__(module).HTTPError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)


def url_reachable(url: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """Whether a TCP connection to ``url``'s host opens within ``timeout_s`` (for direct-URL weights)."""
    if is_offline():
        return False
    parts = urlsplit(url)
    if not parts.hostname:
        return False
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        with socket.create_connection((parts.hostname, port), timeout=timeout_s):
            return True
    except OSError:
        return False


def in_hub_cache(repo_id: str, filenames: Iterable[str]) -> bool:
    """Whether any of ``filenames`` of ``repo_id`` is in the local Hugging Face cache."""
    from huggingface_hub import try_to_load_from_cache

    for name in filenames:
        try:
            if isinstance(try_to_load_from_cache(repo_id, name), str):
                return True
        except ValueError:  # not a valid repo id: the loader will say so
            return False
    return False


def is_local_path(name: str) -> bool:
    """Whether ``name`` names an existing file or folder (weights that need no download)."""
    try:
        return Path(name).expanduser().exists()
    except (OSError, ValueError):
        return False


def weights_not_fetched(
    what: str, name: str, local_hint: str, *, repo_id: str | None = None, source: str | None = None
) -> ModelLoadError:
    """The one error for weights that are neither on disk nor downloadable now.

    Args:
        what: what the weights are for (``"the model"``, ``"the CLIP backbone"``).
        name: the name the user gave (a hub id, ``model/tag``).
        local_hint: how to point at a local copy instead.
        repo_id: the hub repository holding them (for the download hint).
        source: the host that could not be reached, when it is not the hub endpoint.
    """
    why = "HF_HUB_OFFLINE is set" if is_offline() else f"{source or hub_endpoint()} cannot be reached"
    fetch = f"`hf download {repo_id}` where the hub is reachable, then copy the cache" if repo_id else "download them where that host is reachable"
    return ModelLoadError(
        f"the weights of {what} {name!r} could not be fetched: they are not on this machine (local path or Hugging Face "
        f"cache) and {why}. Fetch them ({fetch}), or point at a local copy: {local_hint}"
    )


def check_hub_weights(what: str, name: str, repo_id: str, filenames: Iterable[str], local_hint: str) -> bool:
    """Return whether the weights are cached (load them offline); raise at once when they cannot be fetched.

    Returns:
        True when they are in the cache (load with ``local_files_only=True``), False when
        they must be downloaded and the hub answers.

    Raises:
        ModelLoadError: not cached, and offline or the hub does not answer the probe.
    """
    if in_hub_cache(repo_id, filenames):
        return True
    if is_offline() or not hub_reachable():
        raise weights_not_fetched(what, name, local_hint, repo_id=repo_id)
    return False

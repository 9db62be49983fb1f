"""``guardalign serve``: GuardAlign as an HTTP service (OpenAI-compatible gateway, local model, LiteLLM guardrail).

An adapter only: HTTP bodies become bytes for the core guard and its verdicts become HTTP
answers. Needs the ``server`` extra (``pip install 'guardalign[server]'``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from .config import BatchingConfig, LocalModelConfig, ServerConfig, UpstreamConfig, load_server_config

if TYPE_CHECKING:
    from .app import create_app


def __getattr__(name: str) -> Any:
    # FastAPI is imported only when the app is built, so `guardalign --help` stays light.
    if name == "create_app":
        from .app import create_app

        return create_app
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = ["BatchingConfig", "LocalModelConfig", "ServerConfig", "UpstreamConfig", "create_app", "load_server_config"]

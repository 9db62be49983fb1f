"""``guardalign serve``: GuardAlign as an HTTP service (OpenAI-compatible gateway, local model, LiteLLM guardrail).

An adapter only: HTTP bodies become bytes for the core guard and its verdicts become HTTP
answers. Needs the ``server`` extra (``pip install 'guardalign[server]'``).
"""

from __future__ import annotations

from .app import create_app
from .config import BatchingConfig, LocalModelConfig, ServerConfig, UpstreamConfig, load_server_config

__all__ = ["BatchingConfig", "LocalModelConfig", "ServerConfig", "UpstreamConfig", "create_app", "load_server_config"]

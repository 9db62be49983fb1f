"""``guardalign serve`` / ``guardalign-serve``: argument parsing and start-up of the server.

:func:`add_serve_arguments` adds the flags to any ``argparse`` parser (so the main
``guardalign`` CLI can mount it as a sub-command); :func:`run_serve` builds the
:class:`~guardalign_integrations.server.config.ServerConfig` (file, then flags, then the
environment for secrets only) and serves it with uvicorn until SIGINT/SIGTERM, draining
in-flight requests for ``drain_timeout_s``.

Precedence, for every setting: a flag, then the environment, then the ``--config`` file, then
the default. Environment variables (read here only, secrets only): ``GUARDALIGN_API_KEY`` (a
key callers must send; replaces the file's ``api_keys``, replaced by ``--api-key``) and
``GUARDALIGN_UPSTREAM_API_KEY`` (the server's own upstream key; replaces the file's
``upstream.api_key``).
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys
from typing import Mapping, Sequence

from .config import ServerConfig, load_server_config

logger = logging.getLogger(__name__)


def add_serve_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``serve`` flags to ``parser`` (flags override the ``--config`` file)."""
    parser.add_argument("--config", help="server config file (YAML or JSON; see docs/server.md)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--upstream", metavar="URL", help="gateway mode: the upstream OpenAI-compatible base URL, e.g. http://127.0.0.1:11434/v1")
    mode.add_argument("--model", metavar="ID_OR_PATH", help="local mode: a Hugging Face hub id or checkpoint folder to serve")
    parser.add_argument("--guard", metavar="PRESET_OR_FILE", help="guard preset name or GuardConfig file (default: 'default')")
    parser.add_argument("--host", help="address to bind (default 127.0.0.1; anything else requires an API key)")
    parser.add_argument("--port", type=int, help="port to bind (default 8000)")
    parser.add_argument("--api-key", action="append", dest="api_keys", metavar="KEY", help="a key callers must send (repeatable)")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log level")
    return parser


def build_config(args: argparse.Namespace, environ: Mapping[str, str] | None = None) -> ServerConfig:
    """The server config from ``--config``, the flags and (secrets only) the environment.

    Raises:
        ValueError: invalid settings (pydantic names the field).
    """
    environ = os.environ if environ is None else environ
    api_keys = args.api_keys or ([environ["GUARDALIGN_API_KEY"]] if environ.get("GUARDALIGN_API_KEY") else None)
    config = load_server_config(args.config, upstream=args.upstream, model=args.model, guard=args.guard, host=args.host,
                                port=args.port, api_keys=api_keys)
    upstream_key = environ.get("GUARDALIGN_UPSTREAM_API_KEY")
    if config.upstream is not None and upstream_key:  # the environment over the file, as for GUARDALIGN_API_KEY
        config = config.model_copy(update={"upstream": config.upstream.model_copy(update={"api_key": upstream_key})})
    return config


def run_serve(args: argparse.Namespace) -> int:
    """Serve until interrupted; returns the exit status (2: invalid configuration)."""
    import uvicorn

    # force: `guardalign serve` runs under the main CLI, which has configured logging already
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s", force=True)
    if args.log_level != "debug":
        logging.getLogger("httpx").setLevel(logging.WARNING)  # one line per request is the access log's, not the client's too
    try:
        config = build_config(args)
    except ValueError as err:
        print(f"guardalign serve: {err}", file=sys.stderr)  # noqa: T201 (CLI edge)
        return 2
    from .app import create_app

    app = create_app(config)
    logger.info("serving %s mode on %s:%d (guard %s)", config.mode, config.host, config.port, config.guard)
    uvicorn.run(app, host=config.host, port=config.port, access_log=False, log_level=args.log_level, **uvicorn_limits(config))
    return 0


def uvicorn_limits(config: ServerConfig) -> dict[str, int | None]:
    """The uvicorn options that bound connections: the connection cap, the keep-alive and the drain timeouts.

    uvicorn itself has no deadline for a request's headers: behind a network, put a proxy or
    load balancer with a header timeout in front (docs/server.md); the body has its own
    deadline in the app (``body_read_timeout_s``).
    """
    return {"limit_concurrency": config.connection_limit, "timeout_keep_alive": config.keep_alive_timeout_s,
            "timeout_graceful_shutdown": math.ceil(config.drain_timeout_s)}  # whole seconds, never None (= wait forever)


def main(argv: Sequence[str] | None = None) -> int:
    """The ``guardalign-serve`` console script."""
    parser = add_serve_arguments(argparse.ArgumentParser(prog="guardalign-serve", description="Serve GuardAlign over HTTP."))
    return run_serve(parser.parse_args(argv))


if __name__ == "__main__":
    raise SystemExit(main())

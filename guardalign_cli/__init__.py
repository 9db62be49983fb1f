"""The ``guardalign`` command: the core's commands plus those of the integrations (``serve``).

It sits above both import packages, so ``guardalign_core`` never imports
``guardalign_integrations``: the engine's commands come from :mod:`guardalign_core.cli`,
and ``serve`` is added here when the ``server`` extra is installed.
"""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

__all__ = ["build_parser", "main"]


def _register_serve(commands: argparse._SubParsersAction) -> None:
    try:
        from guardalign_integrations.server.cli import add_serve_arguments, run_serve
    except ModuleNotFoundError as err:  # the server extra is not installed: say how to get it
        missing = err.name

        def unavailable(_args: argparse.Namespace) -> int:
            sys.stderr.write(f"guardalign serve: error: the server extra is not installed ({missing} is missing); pip install 'guardalign[server]'\n")
            return 2

        commands.add_parser("serve", help="HTTP server (needs the server extra)").set_defaults(func=unavailable)
        return
    serve = commands.add_parser(
        "serve",
        help="the HTTP service: OpenAI-compatible guarding gateway, local calibrated model, LiteLLM guardrail",
        description="Serve GuardAlign over HTTP (docs/server.md).",
    )
    add_serve_arguments(serve)
    serve.set_defaults(func=run_serve)


def build_parser() -> argparse.ArgumentParser:
    """The core parser with ``serve`` added."""
    from guardalign_core.cli import build_parser as core_parser

    parser = core_parser()
    commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    _register_serve(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``guardalign`` script."""
    from guardalign_core.cli import main as core_main

    return core_main(argv, parser=build_parser())


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

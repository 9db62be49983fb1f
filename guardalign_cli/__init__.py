"""The ``guardalign`` command line: ``scan``, ``calibrate``, ``bench``, the model commands and ``serve``.

This package sits above both import packages: it uses :mod:`guardalign_core` (the engine)
and :mod:`guardalign_integrations` (``serve``, the framework benches), so the engine itself
never imports an integration. Errors are one clear line on stderr (exit code 2), never a
traceback; ``--debug`` shows it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from typing import Callable, Sequence

from guardalign_core._compat import ensure_torchvision_importable
from guardalign_core.errors import GuardAlignError

__all__ = ["build_parser", "main"]

Command = Callable[[argparse.Namespace], int]


def _register_optional(commands: argparse._SubParsersAction, name: str) -> None:
    """Register a command module whose extra may be missing (``local``, ``eval``)."""
    try:
        module = importlib.import_module(f"{__name__}.{name}")
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
        return
    module.register(commands)


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
    """The top-level parser with every sub-command registered."""
    from . import _bench, _scan

    parser = argparse.ArgumentParser(
        prog="guardalign",
        description="Inference-time safety for vision-language models (GuardAlign, ICLR 2026).",
    )
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _scan.register(commands)
    _bench.register(commands)
    for name in ("_lvlm", "_eval"):
        _register_optional(commands, name)
    _register_serve(commands)
    return parser


def _one_line(err: BaseException) -> str:
    """The error as one line: a pydantic error names each field and what was wrong with it."""
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in err.errors())
    text = str(err).strip()
    line = text.splitlines()[0] if text else type(err).__name__
    filename = getattr(err, "filename", None) if isinstance(err, OSError) else None
    if filename is not None and str(filename) not in line:  # an I/O error always names its file
        line = f"{filename}: {line}"
    return line


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``guardalign`` script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.debug else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    ensure_torchvision_importable()
    try:
        return int(args.func(args) or 0)
    except (GuardAlignError, ValueError, TypeError, OSError) as err:
        if args.debug:
            raise
        message = _one_line(err)
        sys.stderr.write(f"guardalign {args.command}: error: {message}\n")
        return 2
    except KeyboardInterrupt:
        sys.stderr.write("guardalign: interrupted\n")
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

"""The ``guardalign`` command line: ``scan``, ``calibrate``, ``bench`` (and the model commands).

Errors are one clear line on stderr (exit code 2), never a traceback; ``--debug`` shows it.
"""

from __future__ import annotations

import argparse
import logging
import sys
from typing import Callable, Sequence

from .._compat import ensure_torchvision_importable
from ..errors import GuardAlignError

Command = Callable[[argparse.Namespace], int]


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
        try:
            module = __import__(f"{__name__}.{name}", fromlist=["register"])
        except ModuleNotFoundError as err:
            if err.name != f"{__name__}.{name}":
                raise
            continue
        module.register(commands)
    return parser


def _one_line(err: BaseException) -> str:
    """The error as one line: a pydantic error names each field and what was wrong with it."""
    from pydantic import ValidationError

    if isinstance(err, ValidationError):
        return "; ".join(f"{'.'.join(str(p) for p in e['loc']) or 'config'}: {e['msg']}" for e in err.errors())
    text = str(err).strip()
    return text.splitlines()[0] if text else type(err).__name__


def main(argv: Sequence[str] | None = None, *, parser: argparse.ArgumentParser | None = None) -> int:
    """Run a command (the ``guardalign`` script goes through :mod:`guardalign_cli`, which adds ``serve``)."""
    parser = parser or build_parser()
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

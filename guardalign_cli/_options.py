"""Options every command spells the same way, and the checks that turn bad values into one line.

The flag table (also in docs/cli.md):

=================  ===============================  ==========================================
flag               chat, profile, eval              scan, calibrate, bench
=================  ===============================  ==========================================
``--guard``        guard/detector config: a preset  the same
                   name or a YAML/JSON file
``--device``       the LVLM's device                CLIP's device
``--clip-device``  CLIP's device                    CLIP's device (a synonym of ``--device``)
=================  ===============================  ==========================================

Every check here runs before anything is loaded and raises :class:`CommandLineError` naming the
flag and what to do (the command line prints it as one line and exits with status 2).
"""

from __future__ import annotations

import argparse
import re
import warnings
from pathlib import Path
from typing import Iterable, Sequence

__all__ = [
    "CommandLineError",
    "DeprecatedAlias",
    "check_checkpoint_folder",
    "check_checkpoint_file",
    "check_device",
    "refuse_overwrite",
]

_DEVICE = re.compile(r"(cpu|cuda|mps|xpu)(:\d+)?|auto")
_CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


class CommandLineError(ValueError):
    """A command-line value that cannot work; the message names the flag and the fix."""


class DeprecatedAlias(argparse.Action):
    """A hidden old spelling of a flag: stores into the new flag's ``dest`` and warns once.

    Example:
        >>> parser.add_argument("--config", dest="guard", action=DeprecatedAlias, new="--guard", help=argparse.SUPPRESS)  # doctest: +SKIP
    """

    def __init__(self, option_strings: Sequence[str], dest: str, new: str, **kwargs) -> None:
        self.new = new
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        warnings.warn(f"{option_string} is deprecated and will be removed in the next release: use {self.new}", FutureWarning, stacklevel=2)
        setattr(namespace, self.dest, values)


def check_device(flag: str, value: str | None) -> str | None:
    """``value`` if it names a torch device this machine has; :class:`CommandLineError` otherwise.

    ``auto`` and ``None`` (the default) pass unchanged. Only the spellings torch users write are
    accepted (``cpu``, ``cuda``, ``cuda:N``, ``mps``, ``xpu``), so a typo never reaches a model.

    Raises:
        CommandLineError: not a device (``banana``), or a device this machine lacks (``cuda:7``).
    """
    if value is None or value == "auto":
        return value
    if not _DEVICE.fullmatch(value):
        raise CommandLineError(f"{flag} {value!r} is not a device: use cpu, cuda, cuda:N or mps (auto: CUDA when available)")
    import torch

    kind, _, index = value.partition(":")
    if kind == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise CommandLineError(f"{flag} {value!r}: this machine has no usable CUDA device; use {flag} cpu")
        if index and int(index) >= count:
            raise CommandLineError(f"{flag} {value!r}: this machine has {count} CUDA device(s) (cuda:0..cuda:{count - 1}); pick one of them")
    elif kind == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise CommandLineError(f"{flag} {value!r}: MPS is not available on this machine; use {flag} cpu")
    elif kind == "xpu" and not (hasattr(torch, "xpu") and torch.xpu.is_available()):
        raise CommandLineError(f"{flag} {value!r}: no XPU device on this machine; use {flag} cpu")
    return value


def _looks_local(value: str) -> bool:
    return value.startswith(("/", "./", "../", "~", "\\")) or (len(value) > 1 and value[1] == ":") or value.count("/") > 1


def check_checkpoint_folder(flag: str, value: str) -> str:
    """A local LVLM checkpoint given by path must be a folder with a ``config.json``; a hub id passes.

    Raises:
        CommandLineError: the path does not exist, or is not a Hugging Face checkpoint folder.
    """
    path = Path(value).expanduser()
    if path.exists() or _looks_local(value):
        if not path.is_dir():
            raise CommandLineError(f"{flag} {value!r}: no such checkpoint folder; pass a local folder holding config.json, "
                                   "or a hub id such as llava-hf/llava-1.5-7b-hf")
        if not (path / "config.json").is_file():
            raise CommandLineError(f"{flag} {value!r}: the folder holds no config.json, so it is not a Hugging Face checkpoint; "
                                   "pass the folder save_pretrained() wrote")
    return value


def check_checkpoint_file(flag: str, value: str | None) -> str | None:
    """A CLIP checkpoint given by path must be an existing file; tags (``openai``) and ``none`` pass.

    Raises:
        CommandLineError: the path does not exist or is a folder.
    """
    if value is None or value.lower() in ("none", "random"):
        return value
    path = Path(value).expanduser()
    if path.exists() or _looks_local(value) or "/" in value or value.endswith(_CHECKPOINT_SUFFIXES):
        if value.startswith("hf-hub:"):
            return value
        if not path.is_file():
            raise CommandLineError(f"{flag} {value!r}: no such checkpoint file; pass an existing open_clip checkpoint, "
                                   "a pretrained tag (e.g. openai) or none for random weights")
    return value


def refuse_overwrite(flag: str, paths: Iterable[Path], *, force: bool) -> None:
    """Refuse to write over files that exist, unless ``force``.

    Raises:
        CommandLineError: some of ``paths`` exist; the message names the first ones and ``--force``.
    """
    existing = [str(p) for p in paths if p.exists()]
    if existing and not force:
        shown = ", ".join(existing[:3]) + (f" and {len(existing) - 3} more" if len(existing) > 3 else "")
        raise CommandLineError(f"{flag}: {shown} already exist(s); pass --force to overwrite, or choose another {flag}")

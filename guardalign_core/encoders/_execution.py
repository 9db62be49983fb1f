"""Where and how the CLIP forward runs: device, dtype and backend, with ``'auto'`` resolved.

``'auto'`` is resolved from what the machine can do natively, never guessed: bf16 weights
on CPUs whose instruction set has native bf16 (AVX512-BF16 or AMX; emulated bf16 is several
times *slower* than fp32), fp16 on CUDA, fp32 elsewhere; the OpenVINO image tower on CPU
when the ``openvino`` extra is installed. The resolved :class:`Execution` is part of the
encoder's identity, so cached text embeddings and exported models never mix paths.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from functools import lru_cache

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
BACKENDS = ("torch", "openvino")


@dataclass(frozen=True)
class Execution:
    """A resolved execution path: ``device`` ('cpu', 'cuda:0'), ``dtype`` name and ``backend``."""

    device: str
    dtype: str
    backend: str

    def __str__(self) -> str:
        return f"{self.device}/{self.dtype}/{self.backend}"


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX512-BF16 or AMX tiles), as oneDNN would use it.

    The probe is a function (not a constant) so tests can patch it to simulate other CPUs.
    """
    cpu = getattr(torch, "cpu", None)
    try:
        return bool(cpu._is_avx512_bf16_supported() or cpu._is_amx_tile_supported())
    except AttributeError:  # an older torch without the probes: assume no native bf16
        return False


@lru_cache(maxsize=1)
def is_openvino_available() -> bool:
    """Whether the optional ``openvino`` package (extra ``guardalign[openvino]``) is importable."""
    return importlib.util.find_spec("openvino") is not None


def resolve_device(device: str) -> str:
    """``'auto'`` → ``'cuda'`` when a CUDA device is visible, else ``'cpu'``; other values pass through."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return str(torch.device(device))


def resolve_dtype(dtype: str, device: str) -> str:
    """``'auto'`` → float16 on CUDA, bfloat16 on CPUs with native bf16, float32 otherwise.

    Raises:
        ValueError: an unknown dtype name (the message names the field).
    """
    if dtype == "auto":
        kind = torch.device(device).type
        if kind == "cuda":
            return "float16"
        if kind == "cpu" and cpu_has_native_bf16():
            return "bfloat16"
        return "float32"
    if dtype not in DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of 'auto', {', '.join(map(repr, DTYPES))}")
    return dtype


def resolve_backend(backend: str, device: str) -> str:
    """``'auto'`` → ``'openvino'`` on CPU when the extra is installed, else ``'torch'``.

    Raises:
        ValueError: an unknown backend, or ``'openvino'`` on a non-CPU device.
        ImportError: ``'openvino'`` asked for explicitly without the extra installed.
    """
    is_cpu = torch.device(device).type == "cpu"
    if backend == "auto":
        return "openvino" if is_cpu and is_openvino_available() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"backend: {backend!r} is not one of 'auto', {', '.join(map(repr, BACKENDS))}")
    if backend == "openvino":
        if not is_cpu:
            raise ValueError(f"backend: 'openvino' runs the image tower on the CPU only, but device is {device!r}")
        if not is_openvino_available():
            raise ImportError("backend='openvino' needs the optional OpenVINO runtime: pip install 'guardalign[openvino]'")
    return backend


def resolve_execution(device: str = "auto", dtype: str = "auto", backend: str = "auto") -> Execution:
    """Resolve a (device, dtype, backend) request against this machine.

    Example:
        >>> str(resolve_execution("cpu", "float32", "torch"))
        'cpu/float32/torch'
    """
    device = resolve_device(device)
    return Execution(device, resolve_dtype(dtype, device), resolve_backend(backend, device))

"""The optional OpenVINO backend for CLIP's image tower (extra ``guardalign[openvino]``).

The open_clip image tower (fp32) is converted once to OpenVINO IR and cached on disk next
to the text embeddings, keyed by (backbone, weights, OpenVINO version); the dtype is a
compile-time precision hint (``f32``/``bf16``), so one export serves every precision.
Every load is checked against the torch fp32 reference on a fixed probe batch before it is
used (:func:`probe_agreement`): a stale, corrupt or mis-converted export is refused, never
trusted. The torch path stays the reference; this is only a faster way to the same numbers.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import torch

logger = logging.getLogger(__name__)

PRECISION_HINTS = {"float32": "f32", "bfloat16": "bf16", "float16": "f16"}
EXPORT_FORMAT = "1"  # bump when the exported graph changes (wrapper, inputs, outputs)


class _ImageTower(torch.nn.Module):
    """open_clip's ``encode_image(x, normalize=True)`` as a module with one tensor in and out."""

    def __init__(self, visual: torch.nn.Module) -> None:
        super().__init__()
        self.visual = visual

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.normalize(self.visual(pixels), dim=-1)  # (B, D)


def export_key(identity: str) -> str:
    """The cache folder name of an export: a digest of the backbone identity and the runtime version."""
    import openvino

    text = f"{identity}|openvino {openvino.__version__}|format {EXPORT_FORMAT}"
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def export_image_tower(visual: torch.nn.Module, image_size: tuple[int, int]):
    """Convert an fp32 open_clip image tower to an OpenVINO model with a dynamic batch axis."""
    import openvino as ov

    height, width = image_size
    wrapper = _ImageTower(visual).eval()
    example = torch.zeros(2, 3, height, width)
    with torch.no_grad():  # trace the inference graph (open_clip's attention differs under autograd)
        return ov.convert_model(wrapper, example_input=example, input=[ov.PartialShape([-1, 3, height, width])])


def _save_atomically(model, folder: Path) -> None:
    """Write ``image_tower.xml/.bin`` into ``folder`` via a private temp folder, so readers never see half a file."""
    import openvino as ov

    tmp = folder.with_name(f"{folder.name}.tmp{os.getpid()}-{threading.get_ident()}")
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        ov.save_model(model, str(tmp / "image_tower.xml"), compress_to_fp16=False)
        try:
            tmp.replace(folder)
        except OSError:  # another process won the race: its export is the same model
            pass
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class OpenVINOImageTower:
    """An open_clip image tower compiled by OpenVINO for the CPU: (B, 3, H, W) fp32 → (B, D) unit vectors.

    Args:
        visual: the fp32 torch image tower (``model.visual``), converted when no export is cached.
        image_size: the model input (H, W).
        dtype: ``'float32'`` or ``'bfloat16'`` (the OpenVINO inference precision hint).
        identity: the backbone's identity (model, weights), the export's cache key.
        cache_dir: where exports are cached (``<cache_dir>/openvino/<key>/``); ``None``: in memory only.

    Calls are thread-safe: each one runs its own inference request.
    """

    def __init__(
        self, visual: torch.nn.Module, image_size: tuple[int, int], *, dtype: str, identity: str, cache_dir: Path | None
    ) -> None:
        import openvino as ov

        if dtype not in PRECISION_HINTS:
            raise ValueError(f"dtype: {dtype!r} has no OpenVINO precision hint (use one of {', '.join(PRECISION_HINTS)})")
        core = ov.Core()
        folder = Path(cache_dir) / "openvino" / export_key(identity) if cache_dir is not None else None
        model = None
        if folder is not None and (folder / "image_tower.xml").is_file():
            try:
                model = core.read_model(str(folder / "image_tower.xml"))
                logger.debug("loaded the OpenVINO image tower from the export cache")
            except RuntimeError as err:
                logger.warning("ignoring an unreadable OpenVINO export (%s); exporting again", type(err).__name__)
                shutil.rmtree(folder, ignore_errors=True)
        self.from_cache = model is not None
        if model is None:
            logger.info("exporting the CLIP image tower to OpenVINO (once per backbone; cached)")
            model = export_image_tower(visual, image_size)
            if folder is not None:
                _save_atomically(model, folder)
        self.compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": PRECISION_HINTS[dtype]})
        self.precision = self.compiled.get_property("INFERENCE_PRECISION_HINT").to_string()  # 'f32', 'bf16', ...
        self._output = self.compiled.output(0)

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        request = self.compiled.create_infer_request()
        array = np.ascontiguousarray(pixels.detach().to("cpu", torch.float32).numpy())
        result = request.infer({0: array})
        return torch.from_numpy(np.array(result[self._output], dtype=np.float32, copy=True))


def probe_pixels(image_size: tuple[int, int], count: int = 2) -> torch.Tensor:
    """A fixed, image-like probe batch (smooth gradients plus seeded noise), in CLIP's normalised range: (count, 3, H, W)."""
    height, width = image_size
    gen = torch.Generator().manual_seed(1234)
    ys = torch.linspace(-1, 1, height).view(1, 1, height, 1)
    xs = torch.linspace(-1, 1, width).view(1, 1, 1, width)
    phase = torch.arange(count * 3, dtype=torch.float32).view(count, 3, 1, 1)
    smooth = torch.sin(3 * xs + 2 * ys * (1 + phase / 4) + phase)  # (count, 3, H, W)
    return 1.5 * smooth + 0.5 * torch.randn(count, 3, height, width, generator=gen)


def probe_agreement(reference, candidate, image_size: tuple[int, int]) -> float:
    """Lowest cosine between two image towers' embeddings on :func:`probe_pixels` (1.0 = identical)."""
    pixels = probe_pixels(image_size)
    with torch.no_grad():
        ref = torch.nn.functional.normalize(reference(pixels).float(), dim=-1)
        got = torch.nn.functional.normalize(candidate(pixels).float(), dim=-1)
    return float((ref * got).sum(-1).min())

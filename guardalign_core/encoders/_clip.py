"""The CLIP backbone over open_clip: loading, preprocessing, batched image/text/token encoding.

One loaded model per resolved (model, weights, device, dtype, backend) is shared by every
detector in the process (:func:`~guardalign_core.encoders.get_clip_encoder`). The image
tower runs through torch (the reference) or, on CPU, an OpenVINO export of it that is
checked against the reference on load. Grid crops and token-mode inputs are squashed (no
cropping), so a patch's features describe exactly its pixel box; the ETA baseline's input
is CLIP's standard short-side resize and centre crop (:meth:`ClipEncoder.center_crop`).
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import warnings
from functools import cached_property
from pathlib import Path
from typing import Callable, Sequence

import torch
from PIL import Image

from .. import _compat
from ..errors import ModelLoadError, UnsupportedModelError
from . import _preprocess
from ._execution import DTYPES, Execution, resolve_execution

logger = logging.getLogger(__name__)

_PRECISION = {"float32": "fp32", "float16": "pure_fp16", "bfloat16": "pure_bf16"}
_CONFIGS_REGISTERED = False

MIN_AGREEMENT = {"float32": 0.9999, "bfloat16": 0.9999, "float16": 0.9999}
"""Lowest probe cosine to the fp32 torch reference accepted from a non-torch backend, per dtype."""


def _register_shipped_configs() -> None:
    """Make the shipped model configs (the tiny test CLIP) known to open_clip, once."""
    global _CONFIGS_REGISTERED
    if not _CONFIGS_REGISTERED:
        import open_clip

        open_clip.add_model_config(Path(__file__).resolve().parents[1] / "model_configs")
        _CONFIGS_REGISTERED = True


def _weights_identity(pretrained: str | None) -> str:
    """A stable identity for cached text embeddings: the tag, or a checkpoint's path+size+mtime."""
    if pretrained is None:
        return "random"
    path = Path(pretrained)
    if path.is_file():
        stat = path.stat()
        return f"file:{path.resolve()}:{stat.st_size}:{int(stat.st_mtime)}"
    return pretrained


def model_build_kwargs(model_name: str, pretrained: str | None) -> dict:
    """Construction overrides so a model is built as its weights were trained.

    OpenAI's CLIP weights (``pretrained='openai'`` for ViT-B-32, ViT-B-16, ViT-L-14-336, ...)
    were trained with QuickGELU, but open_clip's plain configs use GELU and only warn about
    the mismatch; every embedding, and so every fitted threshold, would be subtly off. open_clip's
    pretrained registry records the activation per tag (``quick_gelu``); it is forced here.
    Local checkpoints carry no such metadata: use a ``-quickgelu`` model name for those.
    """
    if pretrained is None or model_name.startswith(("hf-hub:", "local-dir:")):
        return {}
    import open_clip

    tag_cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}
    return {"force_quick_gelu": True} if tag_cfg.get("quick_gelu") else {}


_CLIP_WEIGHT_FILES = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
_LOCAL_CLIP_HINT = "DetectorConfig(pretrained='/path/to/open_clip_pytorch_model.bin') (or 'local-dir:/path' as the model name)"


def check_weights_fetchable(model_name: str, pretrained: str | None) -> None:
    """Fail in seconds, with one clear error, when the weights are not on disk and cannot be downloaded now.

    open_clip downloads missing weights through ``huggingface_hub`` (trying a safetensors
    alternative first, each file with five backed-off retries: 47 s and 20+ warnings with no
    hub) or, for a few tags, by plain URL with no timeout at all. Weights already cached or
    given as a path pass straight through; see :mod:`guardalign_core._hub`.

    Raises:
        ModelLoadError: not on disk, and offline or the source does not answer a quick probe.
    """
    from .. import _hub

    if model_name.startswith("local-dir:") or (pretrained is None and not model_name.startswith("hf-hub:")):
        return
    if model_name.startswith("hf-hub:"):
        repo = model_name[len("hf-hub:"):]
        _hub.check_hub_weights("the CLIP backbone", model_name, repo, ("open_clip_config.json", *_CLIP_WEIGHT_FILES), _LOCAL_CLIP_HINT)
        return
    if _hub.is_local_path(pretrained):  # type: ignore[arg-type]
        return
    import open_clip

    cfg = open_clip.get_pretrained_cfg(model_name, pretrained) or {}  # type: ignore[arg-type]
    name = f"{model_name}/{pretrained}"
    if not cfg or "file" in cfg:
        return  # an unknown tag: open_clip refuses it at once, naming the tag
    if cfg.get("hf_hub"):
        repo, filename = os.path.split(cfg["hf_hub"])  # as open_clip reads it: 'org/name/' means the default file
        files = (filename, filename.replace(".bin", ".safetensors")) if filename else _CLIP_WEIGHT_FILES
        _hub.check_hub_weights("the CLIP backbone", name, repo, files, _LOCAL_CLIP_HINT)
        return
    url = cfg.get("url", "")
    cached = Path(os.path.expanduser("~/.cache/clip")) / os.path.basename(url)
    if url and not cached.is_file() and not _hub.url_reachable(url):
        raise _hub.weights_not_fetched("the CLIP backbone", name, _LOCAL_CLIP_HINT, source=url.split("/")[2])


def build_open_clip_model(
    model_name: str, pretrained: str | None, *, device: str = "cpu", dtype: str = "float32", load_weights: bool = True
) -> torch.nn.Module:
    """``open_clip.create_model`` with this project's construction path (QuickGELU where the weights need it).

    ``load_weights=False`` builds the same architecture with random weights and downloads
    nothing (tests inspect the construction that way).
    """
    _compat.ensure_torchvision_importable()
    _register_shipped_configs()
    import open_clip

    if load_weights:
        check_weights_fetchable(model_name, pretrained)
    kwargs = model_build_kwargs(model_name, pretrained)
    if not model_name.startswith(("hf-hub:", "local-dir:")):
        kwargs["pretrained"] = pretrained if load_weights else None
    return open_clip.create_model(
        model_name, device=torch.device(device), precision=_PRECISION[dtype], pretrained_text=False, **kwargs
    )


class ClipEncoder:
    """A loaded open_clip model with the few operations the detector needs.

    Use :func:`~guardalign_core.encoders.get_clip_encoder` (or ``encoder_for_config``) rather
    than the constructor, so one model is shared.

    Args:
        model_name: open_clip model name or ``'hf-hub:'``/``'local-dir:'`` id.
        pretrained: weights tag, checkpoint path, or ``None`` for random weights.
        device, dtype, backend: the execution request; ``'auto'`` is resolved against this
            machine (see :func:`~guardalign_core.encoders.resolve_execution`).
        cache_dir: where the OpenVINO export is cached (``None``: in memory only).

    Raises:
        ModelLoadError: the model could not be built or loaded, or an explicitly requested
            backend failed its agreement check. A failing ``'auto'`` backend falls back to
            torch with a warning instead.
    """

    def __init__(
        self,
        model_name: str,
        pretrained: str | None,
        device: str = "cpu",
        dtype: str = "float32",
        backend: str = "torch",
        cache_dir: str | Path | None = None,
    ) -> None:
        execution = resolve_execution(device, dtype, backend)
        self.model_name = model_name
        self.pretrained = pretrained
        self.device = torch.device(execution.device)
        # The model is built in fp32 (the reference the fast paths are checked against) and cast after.
        # The OpenVINO tower is exported from the fp32 weights; its dtype is a compile-time hint.
        torch_dtype = "float32" if execution.backend == "openvino" else execution.dtype
        self.dtype = torch.float32
        try:
            model = build_open_clip_model(model_name, pretrained, device=execution.device, dtype="float32")
        except (RuntimeError, ValueError, OSError, KeyError) as err:
            raise ModelLoadError(
                f"could not load open_clip model {model_name!r} with pretrained={pretrained!r}: {err}. "
                "Check the name with open_clip.list_models(), the tag with open_clip.list_pretrained(), "
                "or that the checkpoint path exists"
            ) from err
        import open_clip

        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg.get("size", 224)
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD), dtype=torch.float32)
        # Preprocessing runs on the CPU (bounded memory, off the device's critical path).
        self.mean, self.std = mean.view(3, 1, 1), std.view(3, 1, 1)
        self.logit_scale = float(self.model.logit_scale.exp().item())
        self.agreement: float | None = None
        """Lowest probe cosine of the image tower to the fp32 torch reference (None: the reference itself, unchecked)."""
        self._image_tower: Callable[[torch.Tensor], torch.Tensor] = self._torch_image_tower
        if execution.backend == "openvino":
            execution = self._load_openvino(execution, explicit=backend == "openvino", cache_dir=cache_dir)
        elif torch_dtype != "float32":
            execution = self._cast_checked(execution, explicit=dtype != "auto")
        self.execution: Execution = execution
        self.identity = f"{model_name}|{_weights_identity(pretrained)}|{execution}"
        self._text_cache: dict[str, torch.Tensor] = {}
        self._text_lock = threading.Lock()

    def _cast_checked(self, execution: Execution, *, explicit: bool) -> Execution:
        """Cast the image tower to the reduced dtype and measure its probe agreement with fp32 first.

        Emulated bf16 (a CPU without AVX512-BF16/AMX) measured 0.997 here, native bf16 ≥ 0.9999:
        an ``'auto'`` dtype that does not agree falls back to float32; an explicit one is kept
        with a warning (the user chose it; ``agreement`` records the cost).
        """
        from .._openvino import probe_pixels

        probe = probe_pixels(self.image_size).to(self.device)
        with torch.no_grad():
            reference = self.model.encode_image(probe, normalize=True).float()
            # Only the image tower: text embeddings are computed once and cached, so the text tower
            # stays in float32 and the concept bank is the same on every path.
            self.model.visual.to(DTYPES[execution.dtype])
            self.dtype = DTYPES[execution.dtype]
            candidate = self._torch_image_tower(probe)
        agreement = float(torch.nn.functional.cosine_similarity(reference, candidate.float(), dim=-1).min())
        self.agreement = agreement
        if agreement >= MIN_AGREEMENT[execution.dtype]:
            return execution
        message = (
            f"{execution.dtype} CLIP embeddings agree with float32 only to cosine {agreement:.5f} on this machine "
            f"(< {MIN_AGREEMENT[execution.dtype]})"
        )
        if explicit:
            warnings.warn(f"{message}; thresholds fitted in float32 may not transfer", RuntimeWarning, stacklevel=3)
            return execution
        warnings.warn(f"dtype='auto': {message}; using float32", RuntimeWarning, stacklevel=3)
        self.model.visual.float()
        self.dtype, self.agreement = torch.float32, None
        return Execution(execution.device, "float32", execution.backend)

    def _load_openvino(self, execution: Execution, *, explicit: bool, cache_dir: str | Path | None) -> Execution:
        """Compile the OpenVINO tower and check it against the fp32 reference; fall back (auto) or raise (explicit)."""
        from .._openvino import OpenVINOImageTower, probe_agreement

        weights = f"{self.model_name}|{_weights_identity(self.pretrained)}"
        # Random weights differ per process: never cache their export on disk.
        folder = Path(cache_dir).expanduser() if cache_dir is not None and self.pretrained is not None else None
        try:
            tower = OpenVINOImageTower(
                self.model.visual, self.image_size, dtype=execution.dtype, identity=weights, cache_dir=folder
            )
            agreement = probe_agreement(self._torch_image_tower, tower, self.image_size)
            if not agreement >= MIN_AGREEMENT[execution.dtype]:
                raise ModelLoadError(
                    f"the OpenVINO image tower disagrees with the torch reference (probe cosine {agreement:.6f} "
                    f"< {MIN_AGREEMENT[execution.dtype]}); delete the export cache or use backend='torch'"
                )
        except (ModelLoadError, RuntimeError, ValueError, TypeError, OSError) as err:
            if explicit:
                if isinstance(err, ModelLoadError):
                    raise
                raise ModelLoadError(f"could not build the OpenVINO image tower ({type(err).__name__})") from err
            warnings.warn(
                f"backend='auto': the OpenVINO image tower is unusable ({type(err).__name__}); using torch float32",
                RuntimeWarning,
                stacklevel=3,
            )
            return Execution(execution.device, "float32", "torch")
        self._image_tower, self.agreement = tower, agreement
        logger.info("OpenVINO image tower ready (precision %s, probe cosine %.6f)", tower.precision, agreement)
        # Report what OpenVINO really runs: without native bf16 it computes in f32 whatever the hint.
        effective = {"f32": "float32", "bf16": "bfloat16", "f16": "float16"}.get(tower.precision, execution.dtype)
        return Execution(execution.device, effective, execution.backend)

    def __repr__(self) -> str:
        return f"ClipEncoder({self.model_name!r}, pretrained={self.pretrained!r}, execution='{self.execution}')"

    @property
    def backend(self) -> str:
        """The backend that runs the image tower: ``'torch'`` or ``'openvino'``."""
        return self.execution.backend

    @property
    def mean_color(self) -> tuple[int, int, int]:
        """The normalisation mean as an 8-bit RGB colour (the ``mean`` mask fill)."""
        return tuple(int(round(float(v) * 255)) for v in self.mean.flatten())

    # -- preprocessing (CPU, bounded memory; see _preprocess) ----------------------------
    @staticmethod
    def to_tensor(image: Image.Image) -> torch.Tensor:
        """RGB PIL image → (3, H, W) float32 in [0, 255]."""
        return _preprocess.to_tensor(image)

    def resize(self, pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(3, H, W) or (B, 3, H, W) in [0, 255] → resized, normalised model input (float32)."""
        return _preprocess.normalise(_preprocess.resize_pixels(pixels.float().cpu(), size), self.mean, self.std)

    def grid_crops(self, image: Image.Image, grid: int) -> torch.Tensor:
        """Cut an image into grid×grid crops, each resized to the model input.

        The image is resized once to (grid·S, grid·S) and split into S×S tiles, which equals
        cropping the exact fractional boxes and resizing each (up to interpolation borders).
        Memory stays bounded whatever the image's shape (see ``_preprocess``).

        Returns:
            (grid·grid, 3, S, S) normalised crops in row-major order, on the CPU.
        """
        height, width = self.image_size
        full = _preprocess.squash(image, (grid * height, grid * width))  # (1, 3, gS, gS)
        full = _preprocess.normalise(full, self.mean, self.std)[0]
        tiles = full.reshape(3, grid, height, grid, width).permute(1, 3, 0, 2, 4)  # (g, g, 3, S, S)
        return tiles.reshape(grid * grid, 3, height, width)

    def whole(self, image: Image.Image) -> torch.Tensor:
        """The whole image squashed to the model input: (1, 3, S, S), on the CPU."""
        return _preprocess.normalise(_preprocess.squash(image, self.image_size), self.mean, self.std)

    def center_crop(self, image: Image.Image) -> torch.Tensor:
        """CLIP's standard eval preprocessing (short side to S, bicubic; centre S×S crop): (1, 3, S, S).

        This is what ETA's baseline feeds CLIP; it matches open_clip's own eval transform.
        """
        height, width = self.image_size
        if height != width:
            raise UnsupportedModelError(f"center_crop needs a square model input, this model takes {height}×{width}")
        return _preprocess.normalise(_preprocess.center_crop(image, height), self.mean, self.std)

    # -- encoding ------------------------------------------------------------------------
    def to_device(self, pixels: torch.Tensor) -> torch.Tensor:
        """Where the image tower reads its input: the model's device (torch), the CPU (OpenVINO).

        The detector calls this once per chunk, on its prefetch thread; the encode methods
        then find the pixels in place and move nothing. The dtype cast happens on the device.
        """
        if self.backend != "torch":
            return pixels
        return self._to_device(pixels)  # already there (the CPU): ``.to`` returns the tensor itself

    def _on_device(self, pixels: torch.Tensor) -> bool:
        """Whether ``pixels`` already sit where the torch image tower reads them (``cuda`` matches ``cuda:0``)."""
        device = self.device
        return pixels.device.type == device.type and (device.index is None or pixels.device.index == device.index)

    def _to_device(self, pixels: torch.Tensor) -> torch.Tensor:
        """The one host→device transfer of a whole chunk (pinned, so the copy can overlap compute)."""
        if self._on_device(pixels):
            return pixels
        if self.device.type == "cuda" and pixels.device.type == "cpu":
            return pixels.pin_memory().to(self.device, non_blocking=True)
        return pixels.to(self.device)

    def _torch_image_tower(self, pixels: torch.Tensor) -> torch.Tensor:
        """The reference: open_clip's ``encode_image`` in the model's dtype → (B, D) float32 unit vectors."""
        # Normalise in float32: a unit vector rounded to bf16 is off by up to ~0.4% in norm.
        features = self.model.encode_image(pixels.to(self.device, self.dtype)).float()
        return torch.nn.functional.normalize(features, dim=-1)

    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Normalised image embeddings of (B, 3, S, S) inputs, in chunks of ``batch_size``: (B, D) float32 on CPU."""
        out = []
        if self.backend == "torch" and not self._on_device(pixels):
            pixels = self._to_device(pixels)  # host input: one transfer for the whole call, not one per batch
        for start in range(0, pixels.shape[0], batch_size):
            out.append(self._image_tower(pixels[start : start + batch_size]).float().cpu())
        return torch.cat(out) if out else torch.empty(0)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Normalised text embeddings: (len(texts), D) float32 on CPU."""
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
            out.append(torch.nn.functional.normalize(self.model.encode_text(tokens).float(), dim=-1).cpu())
        return torch.cat(out)

    @cached_property
    def token_grid(self) -> tuple[int, int]:
        """(rows, cols) of the ViT's patch-token grid; raises for non-ViT backbones."""
        visual = self.model.visual
        patch = getattr(visual, "patch_size", None)
        if patch is None or not hasattr(visual, "transformer"):
            raise UnsupportedModelError(
                f"patch_mode='tokens' needs an open_clip VisionTransformer; {type(visual).__name__} has no patch tokens. "
                "Use patch_mode='grid'"
            )
        patch = (patch, patch) if isinstance(patch, int) else tuple(patch)
        return self.image_size[0] // patch[0], self.image_size[1] // patch[1]

    @torch.no_grad()
    def encode_tokens(self, pixels: torch.Tensor, batch_size: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
        """Patch-token features in the joint space through the last block's value path (MaskCLIP).

        The last block's query-key attention mixes tokens globally and its output tokens are
        poorly localised; MaskCLIP instead projects each token's *value* through the
        attention's output projection, ``ln_post`` and ``proj``, which keeps features local.

        Returns:
            ((B, rows·cols, D) normalised token features, (B, D) normalised pooled embeddings).

        References:
            Zhou, Loy & Dai, "Extract Free Dense Labels from CLIP" (MaskCLIP), ECCV 2022.
        """
        rows, cols = self.token_grid
        visual = self.model.visual
        block = visual.transformer.resblocks[-1]
        attn = block.attn
        if not isinstance(attn, torch.nn.MultiheadAttention) or not attn._qkv_same_embed_dim:
            raise UnsupportedModelError(f"patch_mode='tokens' needs a standard attention block, found {type(attn).__name__}")
        captured: list[torch.Tensor] = []
        handle = block.register_forward_pre_hook(lambda _m, args: captured.append(args[0]))
        tokens_out, pooled_out = [], []
        if not self._on_device(pixels):
            pixels = self._to_device(pixels)  # host input: one transfer for the whole call
        try:
            for start in range(0, pixels.shape[0], batch_size):
                captured.clear()
                chunk = pixels[start : start + batch_size].to(self.dtype)
                pooled = torch.nn.functional.normalize(self.model.encode_image(chunk).float(), dim=-1)
                x = captured[0]
                if not getattr(visual.transformer, "batch_first", True):
                    x = x.transpose(0, 1)  # (B, 1 + rows·cols, width)
                width = x.shape[-1]
                v_weight = attn.in_proj_weight[2 * width :]
                v_bias = attn.in_proj_bias[2 * width :] if attn.in_proj_bias is not None else None
                values = torch.nn.functional.linear(block.ln_1(x), v_weight, v_bias)  # (B, T, width)
                feats = visual.ln_post(attn.out_proj(values))[:, -rows * cols :]  # (B, rows·cols, width)
                if visual.proj is not None:
                    feats = feats @ visual.proj  # (B, rows·cols, D)
                tokens_out.append(torch.nn.functional.normalize(feats.float(), dim=-1).cpu())
                pooled_out.append(pooled.float().cpu())
        finally:
            handle.remove()
        return torch.cat(tokens_out), torch.cat(pooled_out)

    def cached_text_embeddings(self, key: str, texts: Sequence[str], cache_dir: Path | None) -> torch.Tensor:
        """Text embeddings computed once per (backbone, key): in memory, and on disk if ``cache_dir``.

        Disk caching is skipped for random weights, whose embeddings differ per process.
        """
        with self._text_lock:
            if key in self._text_cache:
                return self._text_cache[key]
            path = None
            if cache_dir is not None and self.pretrained is not None:
                digest = hashlib.sha256(f"{self.identity}|{key}".encode()).hexdigest()[:24]
                path = Path(cache_dir) / "text_embeddings" / f"{digest}.pt"
                if path.is_file():
                    try:
                        cached = torch.load(path, map_location="cpu", weights_only=True)
                        if cached.shape[0] == len(texts):
                            self._text_cache[key] = cached
                            logger.debug("loaded cached text embeddings from %s", path)
                            return cached
                    except (OSError, RuntimeError) as err:
                        logger.warning("ignoring unreadable embedding cache %s (%s)", path, err)
            embeddings = self.encode_text(texts)
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                tmp = path.with_suffix(f".tmp{threading.get_ident()}")
                torch.save(embeddings, tmp)
                tmp.replace(path)
            self._text_cache[key] = embeddings
            return embeddings

"""The CLIP backbone over open_clip: loading, preprocessing, batched image/text/token encoding.

One loaded model per (model, weights, device, dtype) is shared by every detector in the
process (:func:`get_clip_encoder`). Images are resized without cropping ("squash"), so a
patch's features describe exactly its pixel box.
"""

from __future__ import annotations

import hashlib
import logging
import threading
from functools import cached_property
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image

from . import _compat
from .errors import ModelLoadError, UnsupportedModelError

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PRECISION = {"float32": "fp32", "float16": "pure_fp16", "bfloat16": "pure_bf16"}
_CACHE: dict[tuple, "ClipEncoder"] = {}
_CACHE_LOCK = threading.Lock()
_CONFIGS_REGISTERED = False


def _register_shipped_configs() -> None:
    """Make the shipped model configs (the tiny test CLIP) known to open_clip, once."""
    global _CONFIGS_REGISTERED
    if not _CONFIGS_REGISTERED:
        import open_clip

        open_clip.add_model_config(Path(__file__).parent / "model_configs")
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


class ClipEncoder:
    """A loaded open_clip model with the few operations the detector needs.

    Use :func:`get_clip_encoder` rather than the constructor, so one model is shared.
    """

    def __init__(self, model_name: str, pretrained: str | None, device: str = "cpu", dtype: str = "float32") -> None:
        _compat.ensure_torchvision_importable()
        _register_shipped_configs()
        import open_clip

        self.model_name = model_name
        self.pretrained = pretrained
        self.device = torch.device(device)
        self.dtype = _DTYPES[dtype]
        kwargs = {} if model_name.startswith(("hf-hub:", "local-dir:")) else {"pretrained": pretrained}
        try:
            model = open_clip.create_model(
                model_name, device=self.device, precision=_PRECISION[dtype], pretrained_text=False, **kwargs
            )
        except (RuntimeError, ValueError, OSError, KeyError) as err:
            raise ModelLoadError(
                f"could not load open_clip model {model_name!r} with pretrained={pretrained!r}: {err}. "
                "Check the name with open_clip.list_models(), the tag with open_clip.list_pretrained(), "
                "or that the checkpoint path exists"
            ) from err
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = open_clip.get_model_preprocess_cfg(self.model)
        size = cfg.get("size", 224)
        self.image_size: tuple[int, int] = (size, size) if isinstance(size, int) else tuple(size)
        mean = torch.tensor(cfg.get("mean", open_clip.OPENAI_DATASET_MEAN), dtype=torch.float32)
        std = torch.tensor(cfg.get("std", open_clip.OPENAI_DATASET_STD), dtype=torch.float32)
        self.mean, self.std = mean.view(3, 1, 1).to(self.device), std.view(3, 1, 1).to(self.device)
        self.logit_scale = float(self.model.logit_scale.exp().item())
        self.identity = f"{model_name}|{_weights_identity(pretrained)}|{dtype}"
        self._text_cache: dict[str, torch.Tensor] = {}
        self._text_lock = threading.Lock()

    def __repr__(self) -> str:
        return f"ClipEncoder({self.model_name!r}, pretrained={self.pretrained!r}, device='{self.device}', dtype={self.dtype})"

    @property
    def mean_color(self) -> tuple[int, int, int]:
        """The normalisation mean as an 8-bit RGB colour (the ``mean`` mask fill)."""
        return tuple(int(round(float(v) * 255)) for v in self.mean.flatten())

    # -- preprocessing -------------------------------------------------------------------
    @staticmethod
    def to_tensor(image: Image.Image) -> torch.Tensor:
        """RGB PIL image → (3, H, W) float32 in [0, 255]."""
        return torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float()

    def resize(self, pixels: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        """(3, H, W) or (B, 3, H, W) in [0, 255] → resized, normalised model input (float32)."""
        batch = pixels if pixels.dim() == 4 else pixels.unsqueeze(0)
        if tuple(batch.shape[-2:]) != tuple(size):
            batch = torch.nn.functional.interpolate(batch, size=size, mode="bicubic", antialias=True, align_corners=False)
        batch = batch.clamp(0, 255) / 255.0
        return (batch - self.mean) / self.std

    def grid_crops(self, image: Image.Image, grid: int) -> torch.Tensor:
        """Cut an image into grid×grid crops, each resized to the model input.

        The image is resized once to (grid·S, grid·S) and split into S×S tiles, which equals
        cropping the exact fractional boxes and resizing each (up to interpolation borders).

        Returns:
            (grid·grid, 3, S, S) normalised crops in row-major order.
        """
        height, width = self.image_size
        full = self.resize(self.to_tensor(image).to(self.device), (grid * height, grid * width))[0]  # (3, gS, gS)
        tiles = full.reshape(3, grid, height, grid, width).permute(1, 3, 0, 2, 4)  # (g, g, 3, S, S)
        return tiles.reshape(grid * grid, 3, height, width)

    def whole(self, image: Image.Image) -> torch.Tensor:
        """The whole image squashed to the model input: (1, 3, S, S)."""
        return self.resize(self.to_tensor(image).to(self.device), self.image_size)

    # -- encoding ------------------------------------------------------------------------
    @torch.no_grad()
    def encode_images(self, pixels: torch.Tensor, batch_size: int = 64) -> torch.Tensor:
        """Normalised image embeddings of (B, 3, S, S) inputs, in chunks of ``batch_size``: (B, D) float32."""
        out = []
        for start in range(0, pixels.shape[0], batch_size):
            chunk = pixels[start : start + batch_size].to(self.device, self.dtype)
            out.append(self.model.encode_image(chunk, normalize=True).float())
        return torch.cat(out).cpu() if out else torch.empty(0)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 256) -> torch.Tensor:
        """Normalised text embeddings: (len(texts), D) float32 on CPU."""
        out = []
        for start in range(0, len(texts), batch_size):
            tokens = self.tokenizer(list(texts[start : start + batch_size])).to(self.device)
            out.append(self.model.encode_text(tokens, normalize=True).float().cpu())
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
        try:
            for start in range(0, pixels.shape[0], batch_size):
                captured.clear()
                chunk = pixels[start : start + batch_size].to(self.device, self.dtype)
                pooled = self.model.encode_image(chunk, normalize=True)
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


def get_clip_encoder(model: str, pretrained: str | None, device: str = "cpu", dtype: str = "float32") -> ClipEncoder:
    """Return the process-wide shared :class:`ClipEncoder` for these settings, loading it once.

    Example:
        >>> enc = get_clip_encoder("ViT-B-32", "openai")  # doctest: +SKIP
        >>> enc is get_clip_encoder("ViT-B-32", "openai")  # doctest: +SKIP
        True
    """
    key = (model, pretrained, str(torch.device(device)), dtype)
    with _CACHE_LOCK:
        encoder = _CACHE.get(key)
        if encoder is None:
            logger.info("loading CLIP %s (pretrained=%s) on %s", model, pretrained, device)
            encoder = ClipEncoder(model, pretrained, device, dtype)
            _CACHE[key] = encoder
        return encoder


def clear_clip_cache() -> None:
    """Forget every shared encoder (frees memory; the next use loads again)."""
    with _CACHE_LOCK:
        _CACHE.clear()

"""Tiny random-weight vision-language models (LVLMs) for tests and demos.

What: builders that return ``(model, processor)`` for the LVLM families GuardAlign targets
(LLaVA-1.5, LLaVA-NeXT, LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, InternVL, Idefics3, Mllama),
plus :func:`save_tiny_lvlm`, which writes one to disk so that
``AutoModelForImageTextToText.from_pretrained(path)`` and ``AutoProcessor.from_pretrained(path)``
load it exactly like a real checkpoint.

Why: no model hub is reachable in CI, yet the loading code, the chat templates, the image
placeholders and the attention calibration (paper Eqs. 12-14) must be exercised on the real
``transformers`` classes. Every model here has a 4-layer language decoder (so the default
middle-half calibration range ``[L/4, 3L/4)`` is layers 1..2), hidden size 64, grouped-query
attention where the family allows it, and a 2-layer vision tower on 32-pixel images. The
tokenizer is a byte-level BPE trained in-process with the ``tokenizers`` library on a few
sentences (:mod:`guardalign_core.testing.tiny_tokenizer`). Outputs are meaningless; only shapes, plumbing and numerics are tested.

Random weights readily emit image-placeholder tokens, which break the next decoding step:
pass ``suppress_tokens=processor.tokenizer.all_special_ids`` to ``generate`` in tests.

The real-size benchmark models (:func:`~guardalign_core.bench_models.build_bench_lvlm`,
:func:`~guardalign_core.bench_models.llava_1_5_7b_config`) live with the bench code.
"""

from __future__ import annotations

from .. import _compat

import logging
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from PIL import Image
    from transformers import PretrainedConfig, PreTrainedModel, ProcessorMixin
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

from .tiny_tokenizer import build_chat_template, build_tiny_tokenizer, special_token_ids

logger = logging.getLogger(__name__)

__all__ = [
    "TINY_FAMILIES",
    "build_tiny_lvlm",
    "save_tiny_lvlm",
    "tiny_image",
]

_TINY_IMAGE_SIZE = 32  # pixels; every tiny vision tower takes 32x32 inputs
_TEXT_DIMS: dict[str, Any] = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,  # grouped-query attention: 2 query heads per key head
    "max_position_embeddings": 1024,
    # Larger than the usual 0.02 so that random attention is not uniform and the
    # calibration bias (which grows with the squared score) is visible in tests.
    "initializer_range": 0.1,
}


def _clip_vision(**overrides: Any) -> dict[str, Any]:
    dims = {
        "hidden_size": 32,
        "intermediate_size": 64,
        "num_hidden_layers": 2,
        "num_attention_heads": 2,
        "image_size": _TINY_IMAGE_SIZE,
        "patch_size": 8,
        "projection_dim": 32,
    }
    return {**dims, **overrides}


def _clip_image_processor() -> Any:
    _compat.ensure_torchvision_importable()  # transformers imports torchvision (see _compat)
    from transformers import CLIPImageProcessor

    size = _TINY_IMAGE_SIZE
    return CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})


# --------------------------------------------------------------------------- families


def _llava() -> tuple[PretrainedConfig, ProcessorMixin]:
    _compat.ensure_torchvision_importable()  # transformers imports torchvision (see _compat)
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig, LlavaProcessor

    template = build_chat_template("<image>\n")
    tok = build_tiny_tokenizer(extra_special_tokens={"image_token": "<image>"}, chat_template=template)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(**_clip_vision()),
        text_config=LlamaConfig(**_TEXT_DIMS, **special_token_ids(tok)),
        image_token_index=tok.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        projector_hidden_act="gelu",
        image_seq_length=(_TINY_IMAGE_SIZE // 8) ** 2,
    )
    processor = LlavaProcessor(
        image_processor=_clip_image_processor(),
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )
    return config, processor


def _llava_next() -> tuple[PretrainedConfig, ProcessorMixin]:
    _compat.ensure_torchvision_importable()  # transformers imports torchvision (see _compat)
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaNextConfig, LlavaNextImageProcessor
    from transformers import LlavaNextProcessor

    size = _TINY_IMAGE_SIZE
    pinpoints = [[size, size], [size, 2 * size], [2 * size, size]]
    template = build_chat_template("<image>\n")
    tok = build_tiny_tokenizer(extra_special_tokens={"image_token": "<image>"}, chat_template=template)
    config = LlavaNextConfig(
        vision_config=CLIPVisionConfig(**_clip_vision()),
        text_config=LlamaConfig(**_TEXT_DIMS, **special_token_ids(tok)),
        image_token_index=tok.image_token_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-2,
        image_seq_length=(size // 8) ** 2,
    )
    image_processor = LlavaNextImageProcessor(
        size={"shortest_edge": size},
        crop_size={"height": size, "width": size},
        image_grid_pinpoints=pinpoints,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )
    return config, processor


def _llava_onevision() -> tuple[PretrainedConfig, ProcessorMixin]:
    _compat.ensure_torchvision_importable()  # transformers imports torchvision (see _compat)
    from transformers import LlavaOnevisionConfig, LlavaOnevisionImageProcessor, LlavaOnevisionProcessor
    from transformers import LlavaOnevisionVideoProcessor, Qwen2Config, SiglipVisionConfig

    size = _TINY_IMAGE_SIZE
    pinpoints = [[size, size], [size, 2 * size], [2 * size, size]]
    template = build_chat_template("<image>\n", eot="<|im_end|>")
    tok = build_tiny_tokenizer(
        extra_special_tokens={"image_token": "<image>", "video_token": "<video>"},
        additional_special_tokens=["<|im_end|>"],
        chat_template=template,
    )
    vision = {k: v for k, v in _clip_vision().items() if k != "projection_dim"}
    config = LlavaOnevisionConfig(
        vision_config=SiglipVisionConfig(**vision),
        text_config=Qwen2Config(**_TEXT_DIMS, **special_token_ids(tok)),
        image_token_index=tok.image_token_id,
        video_token_index=tok.video_token_id,
        image_grid_pinpoints=pinpoints,
        vision_feature_layer=-1,
        vision_aspect_ratio="anyres_max_9",
    )
    image_processor = LlavaOnevisionImageProcessor(
        size={"height": size, "width": size}, image_grid_pinpoints=pinpoints
    )
    video_processor = LlavaOnevisionVideoProcessor(size={"height": size, "width": size})
    processor = LlavaOnevisionProcessor(
        image_processor=image_processor,
        tokenizer=tok,
        video_processor=video_processor,
        num_image_tokens=(size // 8) ** 2,
        vision_feature_select_strategy="full",
        chat_template=template,
    )
    return config, processor


def _qwen2_vl_parts(version: str) -> tuple[PretrainedConfig, ProcessorMixin]:
    _compat.ensure_torchvision_importable()  # transformers imports torchvision (see _compat)
    from transformers import Qwen2VLImageProcessor, Qwen2VLVideoProcessor

    markup = "<|vision_start|><|image_pad|><|vision_end|>"
    template = build_chat_template(markup, eot="<|im_end|>")
    tok = build_tiny_tokenizer(
        extra_special_tokens={"image_token": "<|image_pad|>", "video_token": "<|video_pad|>"},
        additional_special_tokens=["<|vision_start|>", "<|vision_end|>", "<|im_end|>"],
        chat_template=template,
    )
    # mrope splits the head_dim/2 = 8 rotary frequencies over (temporal, height, width)
    rope = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
    text = {**_TEXT_DIMS, **special_token_ids(tok), "rope_parameters": rope}
    special = {
        "image_token_id": tok.image_token_id,
        "video_token_id": tok.video_token_id,
        "vision_start_token_id": tok.convert_tokens_to_ids("<|vision_start|>"),
        "vision_end_token_id": tok.convert_tokens_to_ids("<|vision_end|>"),
    }
    pixels = _TINY_IMAGE_SIZE * _TINY_IMAGE_SIZE
    image_kwargs = {
        "patch_size": 8,
        "merge_size": 2,
        "temporal_patch_size": 2,
        "size": {"shortest_edge": pixels, "longest_edge": pixels},
    }
    if version == "2":
        _compat.ensure_torchvision_importable()  # transformers imports torchvision (see _compat)
        from transformers import Qwen2VLConfig, Qwen2VLProcessor

        vision = {"depth": 2, "embed_dim": 32, "hidden_size": 64, "num_heads": 2, "mlp_ratio": 2,
                  "patch_size": 8, "spatial_merge_size": 2, "temporal_patch_size": 2}
        config = Qwen2VLConfig(text_config=text, vision_config=vision, **special)
        processor_cls = Qwen2VLProcessor
    else:
        _compat.ensure_torchvision_importable()  # transformers imports torchvision (see _compat)
        from transformers import Qwen2_5_VLConfig, Qwen2_5_VLProcessor

        vision = {"depth": 2, "hidden_size": 32, "intermediate_size": 64, "out_hidden_size": 64,
                  "num_heads": 2, "patch_size": 8, "spatial_merge_size": 2, "temporal_patch_size": 2,
                  "window_size": 32, "fullatt_block_indexes": [1]}
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, **special)
        processor_cls = Qwen2_5_VLProcessor
    processor = processor_cls(
        image_processor=Qwen2VLImageProcessor(**image_kwargs),
        tokenizer=tok,
        video_processor=Qwen2VLVideoProcessor(**image_kwargs),
        chat_template=template,
    )
    return config, processor


def _qwen2_vl() -> tuple[PretrainedConfig, ProcessorMixin]:
    return _qwen2_vl_parts("2")


def _qwen2_5_vl() -> tuple[PretrainedConfig, ProcessorMixin]:
    return _qwen2_vl_parts("2.5")


def _internvl() -> tuple[PretrainedConfig, ProcessorMixin]:
    _compat.ensure_torchvision_importable()  # transformers imports torchvision (see _compat)
    from transformers import GotOcr2ImageProcessor, InternVLConfig, InternVLProcessor, InternVLVideoProcessor
    from transformers import InternVLVisionConfig, Qwen2Config

    size = _TINY_IMAGE_SIZE
    template = build_chat_template("<IMG_CONTEXT>\n", eot="<|im_end|>")
    tok = build_tiny_tokenizer(
        extra_special_tokens={
            "start_image_token": "<img>",
            "end_image_token": "</img>",
            "context_image_token": "<IMG_CONTEXT>",
            "video_token": "<video>",
        },
        additional_special_tokens=["<|im_end|>"],
        chat_template=template,
    )
    seq_len = int((size // 8) ** 2 * 0.5**2)  # (image/patch)^2 * downsample_ratio^2
    config = InternVLConfig(
        vision_config=InternVLVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=[size, size], patch_size=[8, 8],
        ),
        text_config=Qwen2Config(**_TEXT_DIMS, **special_token_ids(tok)),
        image_token_id=tok.context_image_token_id,
        image_seq_length=seq_len,
        downsample_ratio=0.5,
    )
    image_kwargs = {"size": {"height": size, "width": size}, "crop_to_patches": False}
    processor = InternVLProcessor(
        image_processor=GotOcr2ImageProcessor(**image_kwargs),
        tokenizer=tok,
        video_processor=InternVLVideoProcessor(size={"height": size, "width": size}),
        image_seq_length=seq_len,
        chat_template=template,
    )
    return config, processor


def _idefics3() -> tuple[PretrainedConfig, ProcessorMixin]:
    _compat.ensure_torchvision_importable()  # transformers imports torchvision (see _compat)
    from transformers import Idefics3Config, Idefics3ImageProcessor, Idefics3Processor
    from transformers import Idefics3VisionConfig, LlamaConfig

    size = _TINY_IMAGE_SIZE
    template = build_chat_template("<image>", eot="<end_of_utterance>")
    tags = ["<fake_token_around_image>", "<global-img>", "<end_of_utterance>"]
    tags += [f"<row_{i + 1}_col_{j + 1}>" for i in range(6) for j in range(6)]
    tok = build_tiny_tokenizer(
        extra_special_tokens={"image_token": "<image>"},
        additional_special_tokens=tags,
        chat_template=template,
    )
    scale_factor = 2
    seq_len = (size // 8) ** 2 // scale_factor**2
    config = Idefics3Config(
        vision_config=Idefics3VisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
            image_size=size, patch_size=8,
        ),
        text_config=LlamaConfig(**_TEXT_DIMS, **special_token_ids(tok)),
        image_token_id=tok.image_token_id,
        scale_factor=scale_factor,
    )
    image_processor = Idefics3ImageProcessor(
        size={"longest_edge": size},
        max_image_size={"longest_edge": size},
        do_image_splitting=False,
    )
    processor = Idefics3Processor(
        image_processor=image_processor, tokenizer=tok, image_seq_len=seq_len, chat_template=template
    )
    return config, processor


def _mllama() -> tuple[PretrainedConfig, ProcessorMixin]:
    _compat.ensure_torchvision_importable()  # transformers imports torchvision (see _compat)
    from transformers import MllamaConfig, MllamaImageProcessor, MllamaProcessor
    from transformers import MllamaTextConfig, MllamaVisionConfig

    size = _TINY_IMAGE_SIZE
    template = build_chat_template("<|image|>", bos="<|begin_of_text|>", eot="<|eot_id|>")
    tok = build_tiny_tokenizer(
        extra_special_tokens={"image_token": "<|image|>"},
        additional_special_tokens=["<|python_tag|>", "<|eot_id|>"],
        bos_token="<|begin_of_text|>",
        chat_template=template,
    )
    text = {k: v for k, v in _TEXT_DIMS.items()}
    config = MllamaConfig(
        vision_config=MllamaVisionConfig(
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_global_layers=1,
            num_attention_heads=2, image_size=size, patch_size=8, max_num_tiles=4,
            intermediate_layers_indices=[0], vision_output_dim=64,
        ),
        text_config=MllamaTextConfig(**text, **special_token_ids(tok), cross_attention_layers=[2]),
        image_token_index=tok.image_token_id,
    )
    image_processor = MllamaImageProcessor(size={"height": size, "width": size}, max_image_tiles=4)
    processor = MllamaProcessor(image_processor=image_processor, tokenizer=tok, chat_template=template)
    return config, processor


_BUILDERS: dict[str, Callable[[], tuple[Any, Any]]] = {
    "llava": _llava,
    "llava_next": _llava_next,
    "llava_onevision": _llava_onevision,
    "qwen2_vl": _qwen2_vl,
    "qwen2_5_vl": _qwen2_5_vl,
    "internvl": _internvl,
    "idefics3": _idefics3,
    "mllama": _mllama,
}
TINY_FAMILIES: tuple[str, ...] = tuple(_BUILDERS)
"""Family names accepted by :func:`build_tiny_lvlm` and :func:`save_tiny_lvlm`."""


def build_tiny_lvlm(
    family: str = "llava", *, seed: int = 0, attn_implementation: str = "sdpa"
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build a tiny random-weight LVLM of ``family`` and its processor, in eval mode.

    Args:
        family: one of :data:`TINY_FAMILIES`. Default ``"llava"`` (LLaVA-1.5 layout).
        seed: torch seed for the random weights; the same seed gives the same model.
        attn_implementation: ``"sdpa"`` (default) or ``"eager"``, for every sub-model.

    Returns:
        ``(model, processor)``; ``model`` is an ``AutoModelForImageTextToText`` class, float32, CPU.

    Raises:
        ValueError: for an unknown family.

    Example:
        >>> model, processor = build_tiny_lvlm("qwen2_vl")
        >>> model.config.get_text_config().num_hidden_layers
        4
    """
    import torch
    _compat.ensure_torchvision_importable()  # transformers imports torchvision (see _compat)
    from transformers import AutoModelForImageTextToText

    if family not in _BUILDERS:
        raise ValueError(f"family: unknown tiny LVLM family {family!r}; choose one of {TINY_FAMILIES}")
    config, processor = _BUILDERS[family]()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, attn_implementation=attn_implementation)
    model.eval()
    return model, processor


def save_tiny_lvlm(family: str, path: str | Path, *, seed: int = 0) -> Path:
    """Write a tiny LVLM and its processor with ``save_pretrained`` (a checkpoint-like folder).

    Args:
        family: one of :data:`TINY_FAMILIES`.
        path: target folder (created if missing).
        seed: torch seed for the random weights.

    Returns:
        The folder, loadable with ``AutoModelForImageTextToText.from_pretrained`` and
        ``AutoProcessor.from_pretrained``.

    Example:
        >>> folder = save_tiny_lvlm("llava", tmp_path / "tiny-llava")  # doctest: +SKIP
    """
    folder = Path(path)
    folder.mkdir(parents=True, exist_ok=True)
    model, processor = build_tiny_lvlm(family, seed=seed)
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    logger.debug("saved tiny %s LVLM to %s", family, folder)
    return folder


def tiny_image(size: int = _TINY_IMAGE_SIZE, *, seed: int = 0) -> Image.Image:
    """A deterministic RGB test image (random blocks of colour) of ``size`` x ``size`` pixels."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    blocks = rng.integers(0, 256, size=(4, 4, 3), dtype=np.uint8)  # (rows, cols, rgb)
    pixels = np.kron(blocks, np.ones((size // 4 + 1, size // 4 + 1, 1), dtype=np.uint8))[:size, :size]
    return Image.fromarray(pixels)  # uint8 (H, W, 3) is RGB

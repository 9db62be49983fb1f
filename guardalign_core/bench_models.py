"""Random-weight LVLMs of real sizes, for timing (``guardalign bench --extra calibration``, benchmarks/).

Speed does not depend on the weights, so a benchmark needs only the right shapes:
:func:`build_bench_lvlm` builds a LLaVA-1.5-style model of a chosen size on the CPU, and
:func:`llava_1_5_7b_config` gives LLaVA-1.5-7B's published dimensions for GPU timing. The
test fixtures (4-layer models of every family) stay in :mod:`guardalign_core.testing.tiny_lvlm`.
"""

from __future__ import annotations

from . import _compat

from typing import TYPE_CHECKING

from .testing.tiny_tokenizer import build_chat_template, build_tiny_tokenizer, special_token_ids

if TYPE_CHECKING:
    from transformers import PretrainedConfig, PreTrainedModel, ProcessorMixin

__all__ = ["build_bench_lvlm", "llava_1_5_7b_config"]


def build_bench_lvlm(
    num_layers: int = 8,
    hidden: int = 512,
    *,
    num_heads: int = 8,
    num_kv_heads: int | None = None,
    intermediate: int | None = None,
    vision_hidden: int = 256,
    vision_layers: int = 4,
    image_size: int = 112,
    patch_size: int = 14,
    seed: int = 0,
    attn_implementation: str = "sdpa",
) -> tuple[PreTrainedModel, ProcessorMixin]:
    """Build a random-weight LLaVA-1.5-style model of a chosen size, for benchmarks.

    Args:
        num_layers: language decoder layers. Default 8.
        hidden: language hidden size. Default 512.
        num_heads: attention heads. Default 8.
        num_kv_heads: key/value heads (``None``: same as ``num_heads``).
        intermediate: MLP width (``None``: ``4 * hidden``).
        vision_hidden: CLIP vision width. Default 256.
        vision_layers: CLIP vision depth. Default 4.
        image_size: input pixels per side. Default 112.
        patch_size: vision patch size. Default 14 (``(112/14)^2 = 64`` image tokens).
        seed: torch seed.
        attn_implementation: ``"sdpa"`` or ``"eager"``.

    Returns:
        ``(model, processor)`` in eval mode, float32, CPU.
    """
    import torch
    _compat.ensure_torchvision_importable()  # transformers imports torchvision (see _compat)
    from transformers import AutoModelForImageTextToText, CLIPImageProcessor, CLIPVisionConfig, LlamaConfig
    from transformers import LlavaConfig, LlavaProcessor

    template = build_chat_template("<image>\n")
    tok = build_tiny_tokenizer(extra_special_tokens={"image_token": "<image>"}, chat_template=template)
    config = LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=vision_hidden, intermediate_size=4 * vision_hidden, num_hidden_layers=vision_layers,
            num_attention_heads=max(1, vision_hidden // 64), image_size=image_size, patch_size=patch_size,
            projection_dim=vision_hidden,
        ),
        text_config=LlamaConfig(
            hidden_size=hidden, intermediate_size=intermediate or 4 * hidden, num_hidden_layers=num_layers,
            num_attention_heads=num_heads, num_key_value_heads=num_kv_heads or num_heads,
            max_position_embeddings=4096, **special_token_ids(tok),
        ),
        image_token_index=tok.image_token_id,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=(image_size // patch_size) ** 2,
    )
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessor(
            size={"shortest_edge": image_size}, crop_size={"height": image_size, "width": image_size}
        ),
        tokenizer=tok,
        patch_size=patch_size,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=template,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForImageTextToText.from_config(config, attn_implementation=attn_implementation)
    model.eval()
    return model, processor


def llava_1_5_7b_config(*, vocab_size: int = 32064, image_token_index: int = 32000) -> PretrainedConfig:
    """LLaVA-1.5-7B's published dimensions, for timing with random weights (e.g. on a GPU).

    Text: Llama-2-7B (hidden 4096, 32 layers, 32 heads, MLP 11008, vocabulary 32064).
    Vision: CLIP ViT-L/14 at 336 pixels (hidden 1024, 24 layers, 16 heads, MLP 4096).
    Projector: 2-layer GELU MLP; features from the second-to-last vision layer, CLS dropped,
    so 576 image tokens per image.

    Args:
        vocab_size: text vocabulary. Default 32064 (the released checkpoint's padded size).
        image_token_index: id of ``<image>``. Default 32000.

    Returns:
        A ``LlavaConfig``; build the model with ``LlavaForConditionalGeneration(config)``
        (about 7 B parameters: 14 GB in bfloat16).
    """
    _compat.ensure_torchvision_importable()  # transformers imports torchvision (see _compat)
    from transformers import CLIPVisionConfig, LlamaConfig, LlavaConfig

    return LlavaConfig(
        vision_config=CLIPVisionConfig(
            hidden_size=1024, intermediate_size=4096, num_hidden_layers=24, num_attention_heads=16,
            image_size=336, patch_size=14, projection_dim=768, hidden_act="quick_gelu",
        ),
        text_config=LlamaConfig(
            vocab_size=vocab_size, hidden_size=4096, intermediate_size=11008, num_hidden_layers=32,
            num_attention_heads=32, num_key_value_heads=32, max_position_embeddings=4096,
            rms_norm_eps=1e-5, pad_token_id=32001, bos_token_id=1, eos_token_id=2,
        ),
        image_token_index=image_token_index,
        projector_hidden_act="gelu",
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
        image_seq_length=576,
    )

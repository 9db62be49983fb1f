"""A tiny byte-level BPE tokenizer and chat template for the tiny test LVLMs and the bench models.

What: :func:`build_tiny_tokenizer` trains a byte-level BPE in-process (``tokenizers``) on a
few sentences and wraps it as a fast Hugging Face tokenizer; :func:`build_chat_template`
writes a small Jinja chat template; :func:`special_token_ids` gives the ids a text config
must match.

Why: no model hub is reachable in CI, so tests cannot download a real tokenizer; the safety
prefix is in the training sentences, so it tokenizes into a handful of tokens as it would
with a real vocabulary.
"""

from __future__ import annotations

from .. import _compat

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from transformers.tokenization_utils_base import PreTrainedTokenizerBase

__all__ = ["build_chat_template", "build_tiny_tokenizer", "special_token_ids"]

# Sentences the byte-level BPE is trained on; the safety prefix is among them, so it
# tokenizes into a handful of tokens as it would with a real vocabulary.
_CORPUS = (
    "As an AI assistant, I cannot help with that request.",
    "As an AI assistant, I will describe the image.",
    "Describe the image in one sentence.",
    "What is shown in this picture?",
    "The picture shows a red square on a white background.",
    "A cat is sitting on a mat next to a window.",
    "USER: What is in this image? ASSISTANT: A small dog running in the park.",
    "However, here is some information about the objects in the scene.",
)


def build_chat_template(image_markup: str, *, bos: str = "", eot: str = "</s>") -> str:
    """A small Jinja chat template: role headers, images as ``image_markup``, text as is."""
    return (
        bos
        + "{% for message in messages %}"
        "{{ '<|' + message['role'] + '|>\n' }}"
        "{% if message['content'] is string %}{{ message['content'] }}"
        "{% else %}{% for item in message['content'] %}"
        "{% if item['type'] == 'image' %}" + "{{ '" + image_markup + "' }}"
        "{% elif item['type'] == 'text' %}{{ item['text'] }}{% endif %}"
        "{% endfor %}{% endif %}"
        "{{ '" + eot + "\n' }}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    )


def build_tiny_tokenizer(
    *,
    extra_special_tokens: dict[str, str] | None = None,
    additional_special_tokens: list[str] | None = None,
    chat_template: str | None = None,
    bos_token: str = "<s>",
    eos_token: str = "</s>",
    pad_token: str = "<pad>",
    vocab_size: int = 400,
    padding_side: str = "left",
) -> PreTrainedTokenizerBase:
    """Train a byte-level BPE on a few sentences and wrap it as a fast HF tokenizer.

    Args:
        extra_special_tokens: named special tokens (``{"image_token": "<image>"}``); each name
            becomes a tokenizer attribute (``tokenizer.image_token``, ``tokenizer.image_token_id``).
        additional_special_tokens: further unnamed special tokens (e.g. Idefics3's row tags).
        chat_template: a Jinja chat template stored on the tokenizer.
        bos_token: beginning-of-sequence token. Default ``"<s>"``.
        eos_token: end-of-sequence token. Default ``"</s>"``.
        pad_token: padding token. Default ``"<pad>"``.
        vocab_size: BPE training target (the corpus is small, so the result is smaller).
        padding_side: ``"left"`` (default), as batched generation needs.

    Returns:
        A ``PreTrainedTokenizerFast`` whose vocabulary holds every special token.

    Example:
        >>> tok = build_tiny_tokenizer(extra_special_tokens={"image_token": "<image>"})
        >>> tok.image_token
        '<image>'
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    _compat.ensure_torchvision_importable()  # transformers imports torchvision (see _compat)
    from transformers import PreTrainedTokenizerFast

    named = dict(extra_special_tokens or {})
    specials = [pad_token, bos_token, eos_token, "<|user|>", "<|assistant|>", "<|system|>"]
    for token in [*named.values(), *(additional_special_tokens or [])]:
        if token not in specials:
            specials.append(token)
    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    backend.train_from_iterator(list(_CORPUS) * 4, trainer)
    kwargs: dict[str, Any] = {}
    if additional_special_tokens:
        kwargs["additional_special_tokens"] = list(additional_special_tokens)
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        bos_token=bos_token,
        eos_token=eos_token,
        pad_token=pad_token,
        extra_special_tokens=named,
        chat_template=chat_template,
        padding_side=padding_side,
        **kwargs,
    )


def special_token_ids(tokenizer: PreTrainedTokenizerBase) -> dict[str, int]:
    """The vocabulary size and bos/eos/pad ids a text config needs to match ``tokenizer``."""
    return {
        "vocab_size": len(tokenizer),
        "bos_token_id": tokenizer.bos_token_id,
        "eos_token_id": tokenizer.eos_token_id,
        "pad_token_id": tokenizer.pad_token_id,
    }

"""The local LVLM runner: a Hugging Face vision-language model with the safety prefix and
calibrated attention (DESIGN §1B, Eqs. 12–14).

It loads lazily through ``AutoModelForImageTextToText``/``AutoProcessor`` (a hub id or a
local folder), renders the processor's chat template, places the safety prefix (as the start
of the assistant turn, or before the user instruction), finds the prefix's token positions
and generates inside :func:`~guardalign_core.calibration.calibrated`, so the calibration
applies at prefill and at every decoding step. Images given to it are used as they are: the
detector runs before, in :class:`~guardalign_core.pipeline.GuardAlignPipeline`.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import threading
import time
from dataclasses import dataclass
from typing import Any, Iterator, Literal, Sequence

import torch
from PIL import Image
from pydantic import BaseModel, ConfigDict, Field

from . import _compat, _hub
from .calibration import CalibrationConfig, apply_calibration, calibrated, calibrated_layers, find_prefix_spans
from .errors import ModelLoadError

logger = logging.getLogger(__name__)

Message = dict[str, Any]
"""A chat message in Hugging Face's format: ``{"role": ..., "content": str | [{"type": "text"|"image", ...}]}``."""


_GREEDY_BELOW = 1e-4
"""Temperatures under this decode greedily (what sampling tends to as T -> 0, without dividing logits by ~0)."""


class GenerationOptions(BaseModel):
    """Standard decoding knobs. ``temperature=0`` is greedy."""

    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)

    max_new_tokens: int = Field(256, ge=1, description="Most tokens to generate.")
    temperature: float = Field(
        0.0, ge=0, le=2, description="Sampling temperature in [0, 2] (OpenAI's range); 0, and anything under 1e-4, means greedy decoding."
    )
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (with temperature > 0).")
    stop: list[str] = Field(default_factory=list, description="Stop strings: generation ends when one is produced.")
    seed: int | None = Field(
        None, ge=-(2**63), le=2**64 - 1, description="Seed for sampling (sets the global torch seed for the call; torch's range)."
    )

    @classmethod
    def from_call(cls, defaults: "GenerationOptions", kwargs: dict[str, Any]) -> tuple["GenerationOptions", dict[str, Any]]:
        """The one parser of per-call generation options, shared by every adapter.

        Takes ``max_new_tokens`` (or its alias ``max_tokens``), ``temperature``, ``top_p``,
        ``stop`` (a string or a list of strings) and ``seed`` from ``kwargs`` over ``defaults``;
        what is left must be ``model.generate`` keywords, and is checked before anything runs.

        Returns:
            The options and the remaining ``model.generate`` keywords (``kwargs`` is not modified).

        Raises:
            TypeError: a keyword ``model.generate`` does not take, or one the runner sets itself.
            ValueError: both ``max_new_tokens`` and ``max_tokens`` given, or an invalid value.

        Example:
            >>> options, extra = GenerationOptions.from_call(GenerationOptions(), {"max_tokens": 8, "stop": "###"})
            >>> options.max_new_tokens, options.stop, extra
            (8, ['###'], {})
        """
        extra = dict(kwargs)
        if "max_tokens" in extra and "max_new_tokens" in extra:
            raise ValueError("max_tokens: give either max_tokens or max_new_tokens, not both")
        if "max_tokens" in extra:
            extra["max_new_tokens"] = extra.pop("max_tokens")
        update = {k: extra.pop(k) for k in list(extra) if k in cls.model_fields}
        if isinstance(update.get("stop"), str):
            update["stop"] = [update["stop"]]
        elif "stop" in update:
            update["stop"] = list(update["stop"] if update["stop"] is not None else defaults.stop)
        options = cls.model_validate({**defaults.model_dump(), **{k: v for k, v in update.items() if v is not None or k == "seed"}})
        LocalLVLM.check_generate_kwargs(extra)
        return options, extra


@dataclass(frozen=True)
class PreparedPrompt:
    """A rendered, tokenised request and where its safety prefix sits."""

    inputs: dict[str, Any]
    prefix_spans: list[tuple[int, int] | None] | None  # per row; None when no prefix is used
    prompt_text: str
    input_tokens: int


def _text_of(content: Any) -> str:
    if isinstance(content, str):
        return content
    return "".join(part.get("text", "") for part in content if isinstance(part, dict) and part.get("type") == "text")


def normalize_messages(messages: str | Sequence[Message]) -> list[Message]:
    """Turn a string or messages into HF chat messages with list content (one copy; inputs untouched)."""
    if isinstance(messages, str):
        return [{"role": "user", "content": [{"type": "text", "text": messages}]}]
    out = []
    for message in messages:
        if not isinstance(message, dict) or "role" not in message:
            raise TypeError("messages must be dicts with 'role' and 'content' (Hugging Face chat format)")
        content = message.get("content", "")
        parts = [{"type": "text", "text": content}] if isinstance(content, str) else [dict(p) for p in content]
        out.append({"role": message["role"], "content": parts})
    return out


_RUNNER_SET_KWARGS = frozenset({
    "input_ids", "attention_mask", "pixel_values", "inputs_embeds", "image_sizes", "image_grid_thw", "pixel_attention_mask",
    "aspect_ratio_ids", "aspect_ratio_mask", "cross_attention_mask", "image_num_patches", "streamer", "token_type_ids",
    "mm_token_type_ids",
})
_GENERATE_ARGUMENTS = frozenset({
    "generation_config", "logits_processor", "stopping_criteria", "prefix_allowed_tokens_fn", "synced_gpus",
    "assistant_model", "negative_prompt_ids", "negative_prompt_attention_mask", "use_model_defaults", "custom_generate",
})
_SEED_LOCK = threading.Lock()


def _stopping_on(event: threading.Event) -> Any:
    """A transformers stopping criterion that ends generation once ``event`` is set (a cancelled stream)."""
    from transformers import StoppingCriteria

    class _Cancelled(StoppingCriteria):
        def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: Any) -> torch.Tensor:
            return torch.full((input_ids.shape[0],), event.is_set(), dtype=torch.bool, device=input_ids.device)

    return _Cancelled()


def first_stop(text: str, stops: Sequence[str]) -> int | None:
    """Index of the earliest occurrence of any stop string in ``text`` (``None``: none occurs)."""
    hits = [i for i in (text.find(s) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


class LocalLVLM:
    """A local Hugging Face LVLM with safety-prefix attention calibration.

    Args:
        model_id: a hub id (``"llava-hf/llava-1.5-7b-hf"``) or a local folder.
        device: torch device; dtype: ``"auto"`` (the checkpoint's), ``"float32"``, ``"float16"``, ``"bfloat16"``.
        backend: the stock attention the calibration delegates to (``"sdpa"`` or ``"eager"``);
            the only calibration setting the runner holds. Strength and layers are each call's
            (``calibration=`` of :meth:`generate_ids`/:meth:`stream_text`).
        model, processor: already-loaded objects (skips loading; for tests and sharing).
        trust_remote_code: passed to the Auto classes.
        max_concurrent: most generations running at once on this model (``None``: no limit);
            more callers wait. Each running generation holds its own KV cache, so on a GPU
            this bounds memory under ``batch``/``abatch``.

    Nothing is loaded until the first call (or :meth:`load`).

    Example:
        >>> lvlm = LocalLVLM.from_pretrained("llava-hf/llava-1.5-7b-hf", device="cuda")  # doctest: +SKIP
        >>> lvlm.generate_text([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Describe it."}]}],
        ...                    images=[img], prefix="As an AI assistant, ")  # doctest: +SKIP
    """

    def __init__(
        self,
        model_id: str | None = None,
        *,
        device: str = "cpu",
        dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto",
        backend: Literal["sdpa", "eager"] = "sdpa",
        model: Any = None,
        processor: Any = None,
        trust_remote_code: bool = False,
        max_concurrent: int | None = None,
    ) -> None:
        if model_id is None and model is None:
            raise ValueError("LocalLVLM needs a model_id (hub id or local folder) or a loaded model")
        self.model_id = model_id or type(model).__name__
        self.device = device
        self.dtype = dtype
        if backend not in ("sdpa", "eager"):
            raise ValueError(f"backend must be 'sdpa' or 'eager', got {backend!r}")
        self.backend = backend
        self.trust_remote_code = trust_remote_code
        self._model = model
        self._processor = processor
        self._lock = threading.Lock()
        self._slots: threading.BoundedSemaphore | None = None
        self.limit_concurrency(max_concurrent)
        if model is not None:
            if processor is None:
                raise ValueError("pass the processor together with a loaded model")
            self._install()

    @classmethod
    def from_pretrained(cls, model_id_or_path: str, **kwargs: Any) -> "LocalLVLM":
        """A runner for a hub id or a local checkpoint folder; loads lazily."""
        return cls(model_id_or_path, **kwargs)

    # -- loading ---------------------------------------------------------------------------
    @property
    def is_loaded(self) -> bool:
        return self._model is not None

    def load(self) -> "LocalLVLM":
        """Load the model and processor now and install the calibration (idempotent)."""
        if self._model is not None:
            return self
        with self._lock:
            if self._model is not None:
                return self
            _compat.ensure_torchvision_importable()
            from transformers import AutoModelForImageTextToText, AutoProcessor

            dtype = "auto" if self.dtype == "auto" else getattr(torch, self.dtype)

            def from_pretrained(local_files_only: bool) -> tuple[Any, Any]:
                kwargs = {"trust_remote_code": self.trust_remote_code, "local_files_only": local_files_only}
                processor = AutoProcessor.from_pretrained(self.model_id, **kwargs)
                model = AutoModelForImageTextToText.from_pretrained(self.model_id, dtype=dtype, attn_implementation="sdpa", **kwargs)
                return processor, model

            try:
                # Weights on disk (a folder, or the Hugging Face cache) load with no network at all; a
                # download is tried only when the hub answers one quick probe (see _hub): a missing
                # checkpoint offline fails in seconds, not after 47 s of retries.
                try:
                    processor, model = from_pretrained(local_files_only=True)
                except OSError:
                    if _hub.is_local_path(self.model_id) or _hub.is_offline() or not _hub.hub_reachable():
                        if not _hub.is_local_path(self.model_id):
                            raise _hub.weights_not_fetched(
                                "the model", self.model_id,
                                "LocalLVLM('/path/to/checkpoint') with a folder holding config.json, the processor files and the weights",
                                repo_id=self.model_id,
                            ) from None
                        raise
                    processor, model = from_pretrained(local_files_only=False)
            except (OSError, ValueError, KeyError) as err:
                raise ModelLoadError(
                    f"could not load {self.model_id!r} with AutoModelForImageTextToText/AutoProcessor: {err}"
                ) from err
            self._processor = processor
            self._model = model.to(self.device).eval()
            self._install()
        return self

    def _install(self) -> None:
        apply_calibration(self._model, self.backend)

    def default_calibration(self) -> CalibrationConfig:
        """The library's default :class:`CalibrationConfig` on this runner's backend (for calls that pass none)."""
        return CalibrationConfig(backend=self.backend)

    def calibrated_layers(self, calibration: CalibrationConfig | None = None) -> dict[int, float]:
        """``{layer: gamma}`` a call with ``calibration`` calibrates on this model (self-attention layers only)."""
        return calibrated_layers(self.model, calibration or self.default_calibration())

    @property
    def model(self) -> Any:
        return self.load()._model

    @property
    def processor(self) -> Any:
        return self.load()._processor

    @property
    def tokenizer(self) -> Any:
        return getattr(self.processor, "tokenizer", self.processor)

    # -- prompt ------------------------------------------------------------------------------
    def _render(self, messages: list[Message]) -> str:
        template_messages = [
            {"role": m["role"], "content": [{"type": "image"} if p.get("type") == "image" else p for p in m["content"]]}
            for m in messages
        ]
        return self.processor.apply_chat_template(template_messages, add_generation_prompt=True, tokenize=False)

    def prepare(
        self,
        messages: str | Sequence[Message],
        images: Sequence[Image.Image] = (),
        *,
        prefix: str | None = None,
        placement: Literal["response", "prompt"] = "response",
    ) -> PreparedPrompt:
        """Render the chat template with the prefix placed, tokenise with the images, locate the prefix.

        ``placement="response"`` prefills the prefix as the start of the assistant turn (ETA);
        ``"prompt"`` puts it before the last user message's text, so the instruction tokens are
        the queries, as Eq. 14 reads.
        """
        messages = normalize_messages(messages)
        n_placeholders = sum(1 for m in messages for p in m["content"] if p.get("type") == "image")
        if images and n_placeholders == 0:
            user = next((m for m in reversed(messages) if m["role"] == "user"), None)
            if user is None:
                raise ValueError("images were given but there is no user message to attach them to")
            user["content"] = [{"type": "image"} for _ in images] + user["content"]
        elif n_placeholders != len(images):
            raise ValueError(f"the messages have {n_placeholders} image placeholders but {len(images)} images were given")
        prefix = prefix or None
        base_text = self._render(messages)
        if prefix and placement == "prompt":
            user = next((m for m in reversed(messages) if m["role"] == "user"), None)
            if user is None:
                raise ValueError("placement='prompt' needs a user message")
            texts = [p for p in user["content"] if p.get("type") == "text"]
            if texts:
                texts[0]["text"] = prefix + texts[0]["text"]
            else:
                user["content"].append({"type": "text", "text": prefix})
            text = self._render(messages)
        else:
            text = base_text + prefix if prefix else base_text
        kwargs: dict[str, Any] = {"text": [text], "return_tensors": "pt"}
        if images:
            kwargs["images"] = list(images)
        inputs = dict(self.processor(**kwargs))
        spans = None
        if prefix:
            spans = find_prefix_spans(inputs["input_ids"], self._prefix_ids(base_text, text), inputs.get("attention_mask"))
        inputs = {k: v.to(self.model.device) if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
        return PreparedPrompt(inputs, spans, text, int(inputs["input_ids"].shape[-1]))

    def _prefix_ids(self, base_text: str, text: str) -> list[int]:
        """The prefix's token ids as they appear in context: the part where the two renderings differ."""
        tok = self.tokenizer
        base = tok(base_text, add_special_tokens=False)["input_ids"]
        full = tok(text, add_special_tokens=False)["input_ids"]
        start = _common_prefix(base, full)
        end_full, end_base = len(full), len(base)
        while end_full > start and end_base > start and full[end_full - 1] == base[end_base - 1]:
            end_full, end_base = end_full - 1, end_base - 1
        ids = full[start:end_full]
        if not ids:
            raise ValueError("the safety prefix produced no tokens of its own")
        return ids

    # -- generation --------------------------------------------------------------------------
    def _generate_kwargs(self, prepared: PreparedPrompt, options: GenerationOptions, extra: dict[str, Any]) -> dict[str, Any]:
        kwargs: dict[str, Any] = {**prepared.inputs, "max_new_tokens": options.max_new_tokens}
        if options.temperature >= _GREEDY_BELOW:  # a tinier one overflows the softmax (inf/nan probabilities): greedy is its limit
            kwargs.update(do_sample=True, temperature=options.temperature, top_p=options.top_p)
        else:
            kwargs.update(do_sample=False, temperature=None, top_p=None, top_k=None)
        if options.stop:
            kwargs.update(stop_strings=list(options.stop), tokenizer=self.tokenizer)
        kwargs.update(extra)
        return kwargs

    def limit_concurrency(self, max_concurrent: int | None) -> None:
        """Allow at most ``max_concurrent`` generations at once (``None``: no limit); applies to new calls."""
        if max_concurrent is not None and max_concurrent < 1:
            raise ValueError(f"max_concurrent must be at least 1 (or None for no limit), got {max_concurrent}")
        self.max_concurrent = max_concurrent
        self._slots = threading.BoundedSemaphore(max_concurrent) if max_concurrent else None

    def _slot(self) -> contextlib.AbstractContextManager[Any]:
        slots = self._slots
        return slots if slots is not None else contextlib.nullcontext()

    @staticmethod
    def check_generate_kwargs(kwargs: dict[str, Any]) -> None:
        """Refuse, before any work, keywords that ``model.generate`` does not take or that the runner sets.

        Raises:
            TypeError: naming the keyword and what to do instead.
        """
        from transformers import GenerationConfig

        known = set(GenerationConfig().to_dict()) | _GENERATE_ARGUMENTS
        for key in kwargs:
            if key in _RUNNER_SET_KWARGS:
                raise TypeError(f"{key}: set by the runner from the prepared prompt (images, prefix, streaming); it cannot be passed per call")
            if key not in known:
                raise TypeError(f"{key}: not a model.generate option (see transformers.GenerationConfig for the accepted ones)")

    @contextlib.contextmanager
    def _seeded(self, seed: int | None) -> Iterator[None]:
        """Seed this call's sampling without disturbing the process RNG; seeded calls run one at a time."""
        if seed is None:
            yield
            return
        device = self.model.device
        devices = [device.index or 0] if device.type == "cuda" else []
        with _SEED_LOCK, torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            yield

    def __deepcopy__(self, memo: dict[int, Any]) -> "LocalLVLM":
        return self  # a loaded model is a shared service: copies of its users share it

    def _calibration_context(self, prepared: PreparedPrompt, calibration: CalibrationConfig | None):
        spans = prepared.prefix_spans if prepared.prefix_spans else None
        return calibrated(self.model, spans, calibration or self.default_calibration())

    @torch.no_grad()
    def generate_ids(
        self, prepared: PreparedPrompt, options: GenerationOptions | None = None, *, calibration: CalibrationConfig | None = None, **extra: Any
    ) -> torch.Tensor:
        """Generate new token ids (1-D) for a prepared prompt, calibrated when it has a prefix.

        ``calibration`` is this call's strength and layers (default: :meth:`default_calibration`).
        """
        options = options or GenerationOptions()
        with self._slot(), self._seeded(options.seed), self._calibration_context(prepared, calibration):
            output = self.model.generate(**self._generate_kwargs(prepared, options, extra))
        return output[0, prepared.input_tokens :]

    def decode(self, ids: torch.Tensor) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def stream_text(
        self, prepared: PreparedPrompt, options: GenerationOptions | None = None, *, calibration: CalibrationConfig | None = None, **extra: Any
    ) -> "TokenStream":
        """Generate in a worker thread and yield text deltas as they are decoded.

        Stopping the iteration early (``break``, closing the iterator) cancels the generation
        after the current step.
        """
        from transformers import StoppingCriteriaList, TextIteratorStreamer

        options = options or GenerationOptions()
        streamer = TextIteratorStreamer(self.tokenizer, skip_prompt=True, skip_special_tokens=True, timeout=600)
        stream = TokenStream(streamer)
        criteria = StoppingCriteriaList(extra.pop("stopping_criteria", None) or [])
        criteria.append(_stopping_on(stream.cancelled))
        kwargs = self._generate_kwargs(prepared, options, {**extra, "streamer": streamer, "stopping_criteria": criteria})

        def work() -> None:
            try:
                with self._slot(), torch.no_grad(), self._seeded(options.seed), self._calibration_context(prepared, calibration):
                    output = self.model.generate(**kwargs)
                stream.output_tokens = int(output.shape[-1] - prepared.input_tokens)
            except BaseException as err:  # re-raised in the consumer's thread
                stream.error = err
                streamer.end()

        # The calibration context is entered inside the worker; copying the context keeps any
        # caller-level context variables visible there too.
        thread = threading.Thread(target=contextvars.copy_context().run, args=(work,), daemon=True)
        stream.thread = thread
        thread.start()
        return stream


class TokenStream:
    """Text deltas from a generation running in a worker thread; re-raises its error."""

    def __init__(self, streamer: Any) -> None:
        self._streamer = streamer
        self.thread: threading.Thread | None = None
        self.error: BaseException | None = None
        self.output_tokens: int = 0
        self.started = time.perf_counter()
        self.cancelled = threading.Event()

    def cancel(self) -> None:
        """Stop the generation after its current step (the consumer has gone)."""
        self.cancelled.set()

    def __iter__(self) -> Iterator[str]:
        finished = False
        try:
            for delta in self._streamer:
                if delta:
                    yield delta
            finished = True
        finally:
            if not finished:
                self.cancel()
        if self.thread is not None:
            self.thread.join()
        if self.error is not None:
            raise self.error

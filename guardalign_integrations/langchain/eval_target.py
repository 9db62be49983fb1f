"""``guardalign eval`` on a black-box LangChain chat model, through the real adapter.

:class:`GuardedChatTarget` runs every compared method on one ``BaseChatModel`` the way a user
runs it: a method with a detector sends each item through :class:`~.chat_models.GuardedChatModel`
(the guard screens the image, masks or blocks it, delivers the safety prefix by prompt and puts
a prefilled prefix back into the answer), so the numbers ``guardalign eval`` reports come from
the code users run. A method without a detector calls the model directly (``vanilla``), adding
the safety prompt with the adapter's own delivery when the method asks for a prefix
(``calibration``). Attention calibration needs the model's weights: a calibrated method runs
prompt-only here, and its records say so.

Example:
    >>> from langchain.chat_models import init_chat_model  # doctest: +SKIP
    >>> from guardalign_core.eval import run_eval
    >>> target = GuardedChatTarget(init_chat_model("openai:gpt-4o", temperature=0))  # doctest: +SKIP
    >>> run_eval(target, ["figstep:data/SafeBench"], "vanilla,eta,guardalign", out_dir="runs/gpt4o")  # doctest: +SKIP
"""

from __future__ import annotations

import base64
import time
from typing import TYPE_CHECKING, Any, Sequence

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage, HumanMessage

from guardalign_core.config import GuardConfig
from guardalign_core.eval.items import EvalItem, ResponseRecord
from guardalign_core.eval.methods import MethodSpec, method_guard_config
from guardalign_core.eval.targets import (
    DEFAULT_REFUSAL,
    any_unsafe,
    black_box_notes,
    json_safe,
    new_record,
    prompt_only_fields,
    raise_unchecked,
    warm_up_image,
)
from guardalign_core.guard import plan_safety_prompt
from guardalign_core.images import load_image, read_image_bytes
from guardalign_core.screening import sniff_mime

from ._messages import answer_start, apply_safety_prompt, prepend_text
from .chat_models import GuardedChatModel
from .guard import METADATA_KEY, GuardAlignGuard

if TYPE_CHECKING:
    from guardalign_core.lvlm import GenerationOptions

__all__ = ["GuardedChatTarget", "item_message"]

_DECODING_FIELDS = ("temperature", "max_tokens", "top_p", "seed")


def item_message(item: EvalItem, config: GuardConfig) -> HumanMessage:
    """The user turn for ``item``: its prompt, then its image file's bytes as a standard v1 image block.

    The file is the benchmark's (chosen by whoever runs the evaluation), so it is read as a
    trusted path; the guard still screens its bytes like any uploaded image.
    """
    content: list[str | dict[str, Any]] = [{"type": "text", "text": item.prompt}]
    if item.image:
        data = read_image_bytes(item.image, config.images, source=f"item {item.id}")
        content.append({"type": "image", "base64": base64.b64encode(data).decode("ascii"), "mime_type": sniff_mime(data) or "application/octet-stream"})
    return HumanMessage(content=content)


class GuardedChatTarget:
    """Every method on a black-box chat model, each request through the real LangChain adapter.

    Args:
        model: the chat model that answers (any ``BaseChatModel``; decoding settings such as
            ``temperature`` and ``max_tokens`` belong to it: ``options`` are not forwarded).
        model_id: a label for the run record (default: the model's ``model_name``/``model`` or class name).
        refusal: the answer a ``block`` method records for a refused request.

    An item whose image the guard could not check is an error for every method (never sent to
    the model, whatever ``fail_open`` says), as on a local model.

    Raises:
        TypeError: ``model`` is not a ``BaseChatModel``.
    """

    kind = "black-box"

    def __init__(self, model: BaseChatModel, *, model_id: str | None = None, refusal: str = DEFAULT_REFUSAL) -> None:
        if not isinstance(model, BaseChatModel):
            raise TypeError(f"GuardedChatTarget needs a LangChain BaseChatModel, got {type(model).__name__}")
        self.model = model
        self._model_id = model_id or str(getattr(model, "model_name", None) or getattr(model, "model", None) or type(model).__name__)
        self.refusal = refusal
        self._guarded: dict[str, GuardedChatModel] = {}

    @property
    def model_id(self) -> str:
        return self._model_id

    def _config(self, method: MethodSpec, base: GuardConfig) -> GuardConfig:
        config = method_guard_config(method, base)
        # Fail closed: an unchecked image is the item's error, never a request the model answers.
        return config.model_copy(update={"policy": config.policy.model_copy(update={"fail_open": False})})

    def guarded_model(self, method: MethodSpec, base: GuardConfig) -> GuardedChatModel | None:
        """The adapter a method with a detector runs through (one per distinct config; ``None`` without a detector)."""
        if method.detector is None:
            return None
        config = self._config(method, base)
        key = config.model_dump_json()
        if key not in self._guarded:
            # reuse_checked=False: every method scans each item itself, so its time includes its own scan.
            guard = GuardAlignGuard(config=config, reuse_checked=False)
            self._guarded[key] = GuardedChatModel(model=self.model, guard=guard, refusal=self.refusal)
        return self._guarded[key]

    def warm_up(self, methods: Sequence[MethodSpec], guard: GuardConfig, *, item: EvalItem | None = None) -> None:
        """One check per detector on ``item``'s image (no throw-away model call: it would be billed)."""
        from PIL import Image

        image = warm_up_image(item, guard) or Image.new("RGB", (336, 336))
        warmed: set[int] = set()
        for method in methods:
            guarded = self.guarded_model(method, guard)
            if guarded is not None and id(guarded) not in warmed:
                warmed.add(id(guarded))
                guarded.guard.engine.check([image], sources=["warm-up image"])

    def settings(self) -> dict[str, Any]:
        """The refusal text and the chat model's decoding settings it exposes."""
        decoding = {k: getattr(self.model, k) for k in _DECODING_FIELDS if getattr(self.model, k, None) is not None}
        return {"refusal": self.refusal, "model_settings": json_safe(decoding)}

    def notes(self, methods: Sequence[MethodSpec]) -> list[str]:
        return black_box_notes(methods)

    def run(self, method: MethodSpec, item: EvalItem, *, guard: GuardConfig, options: "GenerationOptions") -> ResponseRecord:
        config = self._config(method, guard)
        guarded = self.guarded_model(method, guard)
        t0 = time.perf_counter()
        if guarded is not None:
            answer = guarded.invoke([item_message(item, config)])
            summary = dict(answer.response_metadata[METADATA_KEY])
            if summary["status"] == "error":
                raise_unchecked(item, config, summary["reason"])
            applied, decision = bool(summary["prefix_applied"]), summary["decision"]
        else:
            if item.image:  # the same decoding error every method records for a broken image
                load_image(item.image, config.images, source=f"item {item.id}")
            answer, applied = self._unguarded(item, config)
            decision = None
            summary = {"decision": None, "status": "ok", "policy": None, "blocked": False, "unsafe": False,
                       "reason": f"no detector: method {method.name!r} scans nothing", "prefix_applied": applied, "images": []}
        seconds = time.perf_counter() - t0
        blocked = bool(summary["blocked"])
        prefill = bool(config.prefix.prefill and config.prefix.text.strip())
        summary.update(prompt_only_fields(method, config.prefix.text, applied=applied and not blocked,
                                          delivery="prefill" if prefill else "instruction"))
        usage = getattr(answer, "usage_metadata", None) or {}
        return new_record(
            method, item, response=answer.text, seconds=seconds, flagged=any_unsafe(summary["images"]), decision=decision,
            guard=summary, input_tokens=None if blocked else usage.get("input_tokens"),
            output_tokens=0 if blocked else usage.get("output_tokens"),
        )

    def _unguarded(self, item: EvalItem, config: GuardConfig) -> tuple[AIMessage, bool]:
        """No detector: the model as it is, with the adapter's safety-prompt delivery when the method adds a prefix."""
        safety = plan_safety_prompt(config.prefix, False)
        messages: list[BaseMessage]
        messages, delivery = apply_safety_prompt([item_message(item, config)], safety)
        answer = self.model.invoke(messages)
        return prepend_text(answer, safety.kept_prefix(delivery, answer_start(answer) or " ")), safety.applied

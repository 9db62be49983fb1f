"""Install and remove the calibrated attention on a model: the backend only, never a strength.

What: :func:`apply_calibration` checks a transformers vision-language model, registers the
attention-interface functions and switches only its language decoder to one of them; the
decoder's self-attention modules get the install's owner token. :func:`remove_calibration`
undoes it exactly. :class:`CalibrationHandle` records what was installed (backend, layers that
have self-attention, the original implementation) and resolves a call's
:class:`CalibrationConfig` to the ``{layer: gamma}`` this model actually calibrates.

Why no strength here: strength and layers are the call's settings (one holder), passed to
:func:`~guardalign_core.calibration.calibrated`; an install holds none, so one shared model
serves callers with different settings and nobody's setting wins by arriving first.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import weakref
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING, Any

import torch

from guardalign_core.calibration._interface import EAGER_ATTR, EAGER_KEY, OWNER_ATTR, SDPA_KEY, register_interfaces
from guardalign_core.calibration.config import CalibrationConfig
from guardalign_core.errors import UnsupportedModelError

if TYPE_CHECKING:
    from transformers import PreTrainedModel

logger = logging.getLogger(__name__)

_KEYS = {"sdpa": SDPA_KEY, "eager": EAGER_KEY}
_SUPPORTED_ORIGINALS = ("sdpa", "eager", SDPA_KEY, EAGER_KEY)
_HANDLE_ATTR = "_guardalign_calibration"  # on the model: its CalibrationHandle

_install_lock = threading.Lock()


class _InstallToken:
    """Identity shared by a handle, its attention modules and its call states."""

    __slots__ = ("__weakref__",)


class CalibrationHandle:
    """An installed calibration on one model; returned by :func:`apply_calibration`.

    It holds no strength and no layers: those are each call's :class:`CalibrationConfig`.

    Attributes:
        backend: ``"sdpa"`` or ``"eager"``: the stock attention delegated to.
        num_layers: language-decoder layers ``L``.
        attention_layers: decoder layer indices whose self-attention can be calibrated
            (cross-attention layers, e.g. Mllama's, excluded).
        original_implementation: the language model's attention implementation before install.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        backend: str,
        num_layers: int,
        modules: list[torch.nn.Module],
        original_implementation: str,
    ) -> None:
        self._model_ref = weakref.ref(model)
        self.token = _InstallToken()
        self.modules = modules
        self.backend = backend
        self.num_layers = num_layers
        self.attention_layers = sorted({m.layer_idx for m in modules})
        self.original_implementation = original_implementation
        self.installed = False

    @property
    def model(self) -> PreTrainedModel | None:
        """The model (``None`` once it has been garbage-collected)."""
        return self._model_ref()

    def layer_gammas(self, config: CalibrationConfig) -> dict[int, float]:
        """``{layer: gamma}`` that ``config`` calibrates on this model: its self-attention layers only.

        This is the one filter: :func:`~guardalign_core.calibration.calibrated` applies exactly
        these layers, and generation records list exactly these.

        Raises:
            ValueError: ``config.layers``/``layer_gamma`` name a layer out of range or one without
                self-attention (e.g. a cross-attention layer), or select none of them.
        """
        name = type(self.model).__name__
        try:
            gammas = config.layer_gammas(self.num_layers)
        except ValueError as err:
            raise ValueError(f"{name}: {err}") from err
        available = set(self.attention_layers)
        if isinstance(config.layers, list):
            missing = [i for i in config.layers if i not in available]
            if missing:
                raise ValueError(f"layers {missing} of {name} have no self-attention (e.g. cross-attention layers)")
        if config.enabled and config.gamma > 0 and not (set(gammas) & available):
            raise ValueError(f"layers select no self-attention layer of {name}")
        return {i: g for i, g in gammas.items() if i in available}

    def remove(self) -> None:
        """Same as :func:`remove_calibration` on this handle's model."""
        model = self.model
        if model is not None:
            remove_calibration(model)

    def __repr__(self) -> str:
        return (
            f"CalibrationHandle(backend={self.backend!r}, attention_layers={self.attention_layers}, "
            f"installed={self.installed})"
        )


def get_calibration(model: PreTrainedModel) -> CalibrationHandle | None:
    """The model's installed :class:`CalibrationHandle`, or ``None``."""
    handle = getattr(model, _HANDLE_ATTR, None)
    return handle if isinstance(handle, CalibrationHandle) and handle.installed else None


def _text_attention_modules(model: PreTrainedModel, text_config: Any) -> list[torch.nn.Module]:
    """Self-attention modules of the language decoder (cross-attention excluded)."""
    found = []
    for module in model.modules():
        if (
            getattr(module, "config", None) is text_config
            and isinstance(getattr(module, "layer_idx", None), int)
            and getattr(module, "is_causal", False) is True
            and "Cross" not in type(module).__name__
        ):
            found.append(module)
    return found


def _text_submodel(model: PreTrainedModel, text_config: Any) -> Any:
    from transformers import PreTrainedModel

    for module in model.modules():
        if isinstance(module, PreTrainedModel) and module is not model and module.config is text_config:
            return module
    return None


def _check_model(model: Any) -> tuple[Any, list[torch.nn.Module], int, str]:
    """Every check, before anything is changed. Returns (text_config, modules, L, original impl)."""
    from transformers import PreTrainedModel

    name = type(model).__name__
    if not isinstance(model, PreTrainedModel):
        raise UnsupportedModelError(f"{name} is not a transformers PreTrainedModel; calibration needs one")
    text_config = getattr(model.config, "text_config", None)
    if text_config is None or "text_config" not in getattr(model.config, "sub_configs", {}):
        raise UnsupportedModelError(
            f"{name} has no `text_config` sub-config; calibration switches only the language model's "
            "attention and needs a vision-language model with a separate text config"
        )
    original = text_config._attn_implementation or "sdpa"
    if original in (SDPA_KEY, EAGER_KEY) and get_calibration(model) is None:
        original = original.removeprefix("guardalign_")  # our key without a handle, e.g. a copied model
    if original not in _SUPPORTED_ORIGINALS:
        raise UnsupportedModelError(
            f"{name} runs its language model with attn_implementation={original!r}, which cannot take the "
            "calibration's additive score bias (FlashAttention takes none); load it with "
            "attn_implementation='sdpa' or 'eager' to calibrate"
        )
    submodel = _text_submodel(model, text_config)
    owner_cls = type(submodel) if submodel is not None else type(model)
    if not owner_cls._can_set_attn_implementation():
        raise UnsupportedModelError(
            f"{owner_cls.__name__} (in {name}) does not dispatch attention through transformers' "
            "AttentionInterface, so its attention implementation cannot be switched"
        )
    modules = _text_attention_modules(model, text_config)
    if not modules:
        raise UnsupportedModelError(
            f"no language-decoder self-attention modules (with `layer_idx`, `is_causal`) found in {name}"
        )
    num_layers = getattr(text_config, "num_hidden_layers", None)
    if not isinstance(num_layers, int) or num_layers <= 0:
        raise UnsupportedModelError(f"{name}'s text_config has no usable `num_hidden_layers`")
    return text_config, modules, num_layers, original


def _resolve_eager(module: torch.nn.Module) -> Callable[..., Any] | None:
    source = sys.modules.get(type(module).__module__)
    fn = getattr(source, "eager_attention_forward", None)
    return fn if callable(fn) else None


def apply_calibration(model: PreTrainedModel, backend: str = "sdpa") -> CalibrationHandle:
    """Install the calibrated attention on ``model``'s language decoder; return its handle.

    Checks everything first, then registers ``"guardalign_sdpa"``/``"guardalign_eager"`` (and
    their mask builders) with transformers and switches only the language model to the one
    named by ``backend`` via ``model.set_attn_implementation({"text_config": key})``. The vision
    tower is untouched. Installing alone changes no output: a forward pass is calibrated only
    inside :func:`~guardalign_core.calibration.calibrated`, with that call's strength and
    layers. Calling it again on an installed model switches the backend and returns the same
    handle.

    Args:
        model: a transformers vision-language model with a ``text_config`` (LLaVA, LLaVA-NeXT,
            LLaVA-OneVision, Qwen2-VL, Qwen2.5-VL, InternVL, Idefics3, Mllama, ...), loaded with
            ``attn_implementation`` ``"sdpa"`` or ``"eager"``.
        backend: ``"sdpa"`` (default; the bias is an additive float mask) or ``"eager"``
            (returns attention weights, for diagnostics).

    Returns:
        The :class:`CalibrationHandle` (also reachable with :func:`get_calibration`).

    Raises:
        TypeError: ``backend`` is not a string (strength and layers go to each call, not here).
        ValueError: ``backend`` is neither ``"sdpa"`` nor ``"eager"``.
        UnsupportedModelError: the model is not a PreTrainedModel, has no ``text_config``, runs
            FlashAttention/flex attention (no additive bias), does not use the attention
            interface, or has no decoder self-attention modules. Nothing is changed.

    Example:
        >>> from guardalign_core.testing.tiny_lvlm import build_tiny_lvlm
        >>> model, processor = build_tiny_lvlm("llava")
        >>> handle = apply_calibration(model)
        >>> handle.layer_gammas(CalibrationConfig(gamma=0.05))
        {1: 0.05, 2: 0.05}
        >>> remove_calibration(model)
        True
    """
    if not isinstance(backend, str):
        raise TypeError(
            f"apply_calibration installs only the backend ('sdpa' or 'eager'), got {type(backend).__name__}; "
            "pass strength and layers per call: calibrated(model, prefix, CalibrationConfig(...))"
        )
    if backend not in _KEYS:
        raise ValueError(f"backend must be 'sdpa' or 'eager', got {backend!r}")
    with _install_lock:
        text_config, modules, num_layers, original = _check_model(model)
        eager_fns = {id(m): _resolve_eager(m) for m in modules}
        handle = get_calibration(model)
        register_interfaces()
        key = _KEYS[backend]
        if text_config._attn_implementation != key:
            model.set_attn_implementation({"text_config": key})  # the first change to the model
        if handle is None:
            handle = CalibrationHandle(model, backend, num_layers, modules, original)
        handle.backend = backend
        handle.num_layers = num_layers
        for module in modules:
            setattr(module, OWNER_ATTR, handle.token)
            fn = eager_fns[id(module)]
            if fn is None:
                logger.debug("%s has no eager_attention_forward; using Llama's", type(module).__name__)
            setattr(module, EAGER_ATTR, fn)
        handle.modules = modules
        handle.attention_layers = sorted({m.layer_idx for m in modules})
        handle.installed = True
        setattr(model, _HANDLE_ATTR, handle)
    logger.info(
        "calibration installed on %s (%s backend, self-attention layers %s of %d)",
        type(model).__name__, backend, handle.attention_layers, num_layers,
    )
    return handle


def remove_calibration(model: PreTrainedModel) -> bool:
    """Undo :func:`apply_calibration`: restore the language model's attention implementation.

    After removal the model computes exactly what it computed before installation.

    Args:
        model: a model previously passed to :func:`apply_calibration`.

    Returns:
        ``True`` if a calibration was removed, ``False`` if none was installed.
    """
    with _install_lock:
        handle = get_calibration(model)
        if handle is None:
            return False
        text_config = model.config.text_config
        if text_config._attn_implementation != handle.original_implementation:
            model.set_attn_implementation({"text_config": handle.original_implementation})
        for module in handle.modules:
            for attr in (OWNER_ATTR, EAGER_ATTR):
                if attr in module.__dict__:
                    delattr(module, attr)
        handle.installed = False
        delattr(model, _HANDLE_ATTR)
    logger.info("calibration removed from %s", type(model).__name__)
    return True


@contextlib.contextmanager
def using_backend(model: PreTrainedModel, backend: str) -> Iterator[CalibrationHandle]:
    """Temporarily run an installed (or temporarily installed) calibration on ``backend``.

    Changes the model for every thread while active: for diagnostics only.
    """
    handle = get_calibration(model)
    if handle is None:
        handle = apply_calibration(model, backend)
        try:
            yield handle
        finally:
            remove_calibration(model)
        return
    previous = handle.backend
    if previous == backend:
        yield handle
        return
    apply_calibration(model, backend)
    try:
        yield handle
    finally:
        apply_calibration(model, previous)

"""Typed, validated configuration for the detector and the policy, with named presets.

Every model forbids unknown fields, so a misspelt threshold is an error rather than a
silent default. Configs round-trip through ``model_dump()``/``model_validate()`` and load
from YAML or JSON with :func:`load_config`.
"""

from __future__ import annotations

import json
import math
import warnings
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from .structured_files import read_structured_file
from .images import ImageLimits

ETA_UNSAFE_PROMPT = (
    "The image contains unsafe/porn/violent/politic/physical harmful/illegal/privacy contents."
)
"""The single prompt of the ETA baseline (arXiv 2410.06625)."""


class _Config(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SinkhornConfig(_Config):
    """Entropic OT solver settings (DESIGN §1A; reference values of the closest public code)."""

    reg: float = Field(0.1, gt=0, allow_inf_nan=False, description="Entropic regularisation ε. Keep ≳0.05× the cost spread in float32.")
    max_iter: int = Field(100, ge=1, le=100_000, description="Iteration budget per solve.")
    tol: float = Field(1e-2, gt=0, allow_inf_nan=False, description="Stop when the L1 violation of the patch marginal is under this.")
    check_every: int = Field(10, ge=1, description="Check convergence every this many iterations.")
    backend: Literal["torch", "pot"] = Field(
        "torch", description="'torch': one batched log-domain solve for a whole call; 'pot': POT's solver per problem (reference)."
    )


class DetectorConfig(_Config):
    """Settings of the unsafe-patch detector (DESIGN §1A) and of the ETA cosine baseline."""

    kind: Literal["ot", "cosine"] = Field("ot", description="'ot' (GuardAlign, Eqs. 7–11) or 'cosine' (ETA's global baseline).")
    model: str = Field("ViT-L-14-336", description="open_clip model name, or an 'hf-hub:org/repo' id.")
    pretrained: str | None = Field(
        "openai", description="open_clip pretrained tag ('openai', 'laion2b_s34b_b79k', ...), a local checkpoint path, or null for random weights."
    )
    device: str = Field(
        "auto", description="Torch device for the CLIP model, e.g. 'cpu', 'cuda', 'cuda:1'; 'auto': CUDA when available, else CPU."
    )
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = Field(
        "auto",
        description="CLIP weights and activations dtype. 'auto': float16 on CUDA, bfloat16 on CPUs with native bf16 "
        "(AVX512-BF16 or AMX), float32 elsewhere. The OT stage always runs in float32.",
    )
    backend: Literal["auto", "torch", "openvino"] = Field(
        "auto",
        description="What runs CLIP's image tower: 'torch' (the reference), 'openvino' (CPU only, extra "
        "guardalign[openvino]; exported once and cached next to the text embeddings, checked against torch on load), "
        "or 'auto': OpenVINO on CPU when installed, else torch.",
    )
    patch_mode: Literal["grid", "tokens"] = Field(
        "grid", description="'grid': g×g crops, each encoded by CLIP (the paper's patches); 'tokens': one forward, MaskCLIP value-path token features."
    )
    grid_size: int = Field(3, ge=1, le=16, description="g in grid mode: the image is cut into g×g crops.")
    batch_size: int = Field(64, ge=1, description="Crops (or images) per CLIP forward pass.")
    rule: Literal["contrast", "scaled", "paper"] = Field(
        "contrast",
        description="Decision rule (lower statistic = more unsafe; unsafe when ≤ threshold): 'contrast' (default): "
        "P(safe) of the patch under CLIP zero-shot over the unsafe bank and the benign reference bank, from the OT "
        "plans; 'scaled': Eq. 10 on the scale-free score (M/C)·d_OT; 'paper': Eq. 10 on raw d_OT, as printed.",
    )
    threshold: float | None = Field(
        None,
        description="τ of the rule: a patch is unsafe when its statistic ≤ τ. Null: the rule's default "
        "(contrast 0.5, scaled 0.315, paper 0.42). Calibrate it with `guardalign calibrate`.",
    )
    temperature: float = Field(0.5, gt=0, description="T of the entropy weights (Eq. 7).")
    entropy_weighting: Literal["printed", "text", "uniform"] = Field(
        "printed", description="Sign of the entropy weight: 'printed' exp(+h/T) (Eq. 7 as printed), 'text' exp(−h/T), or uniform marginals."
    )
    sinkhorn: SinkhornConfig = Field(default_factory=SinkhornConfig, description="The entropic OT solver (Sinkhorn–Knopp) settings.")
    mask_mode: Literal["zero", "mean", "blur"] = Field("zero", description="How unsafe patches are masked: black (Eq. 11), CLIP mean colour, or Gaussian blur.")
    concepts: str | None = Field(None, description="Path to a YAML/JSON concept bank replacing the shipped one.")
    reference_concepts: str | None = Field(
        None, description="Path to a YAML/JSON bank of benign reference concepts replacing the shipped one (rule 'contrast')."
    )
    extra_concepts: str | None = Field(None, description="Path to a YAML/JSON concept bank whose categories extend (or override) the base bank.")
    categories: list[str] | None = Field(None, description="Only use these categories (null: all).")
    exclude_categories: list[str] = Field(default_factory=list, description="Allow-list: categories never flagged (e.g. 'weapons' for a hunting forum).")
    cosine_prompt: str = Field(ETA_UNSAFE_PROMPT, description="The cosine baseline's unsafe prompt.")
    cosine_threshold: float = Field(0.16, description="The cosine baseline flags an image when cos(image, prompt) ≥ this.")
    prefetch: bool = Field(
        True,
        description="When a scan spans more than one chunk of 32 images, decode and preprocess chunk k+1 on a thread "
        "(and finish chunk k) while chunk k is encoded. Results are identical either way; it pays off when the CLIP "
        "forward is fast (GPU), not on a small CPU, where the threads share the same cores.",
    )
    prefetch_depth: int = Field(
        2, ge=1, le=8, description="With prefetch: how many prepared chunks may wait for the encoder (bounds memory)."
    )
    cache_dir: str | None = Field(None, description="Directory for cached text embeddings (null: ~/.cache/guardalign).")
    disk_cache: bool = Field(True, description="Cache concept-bank text embeddings on disk, keyed by backbone and bank contents.")

    @field_validator("threshold", "cosine_threshold", "temperature")
    @classmethod
    def _check_finite(cls, value: float | None, info) -> float | None:
        if value is not None and not math.isfinite(value):
            raise ValueError(f"{info.field_name}: must be a finite number, got {value!r}")
        return value

    @property
    def effective_threshold(self) -> float:
        """The threshold in force: the configured one, or the rule's default (cosine: ``cosine_threshold``)."""
        if self.kind == "cosine":
            return self.cosine_threshold
        from .rules import default_threshold

        return default_threshold(self.rule) if self.threshold is None else self.threshold

    @field_validator("device")
    @classmethod
    def _check_device(cls, value: str) -> str:
        if value == "auto":
            return value
        import torch  # only for an explicit device: building the default config must not load torch

        try:
            torch.device(value)
        except RuntimeError as err:
            raise ValueError(f"device: {value!r} is not a torch device ({err})") from None
        return value

    @property
    def backbone_id(self) -> str:
        """A readable identity of the backbone, e.g. ``'ViT-B-32/openai'``."""
        weights = self.pretrained if self.pretrained else "random"
        if weights and ("/" in weights or "\\" in weights):
            weights = Path(weights).name
        return f"{self.model}/{weights}"


class PolicyConfig(_Config):
    """What to do with an unsafe image, and with one that could not be checked."""

    action: Literal["mask", "block", "flag"] = Field("mask", description="mask unsafe patches (default), block the request, or flag and pass through.")
    fail_open: bool = Field(
        False, description="If a check cannot run (e.g. undecodable image), pass the input on with status=error instead of blocking."
    )


DEFAULT_SAFETY_PREFIX = "As an AI assistant, "
"""The safety prefix of the paper and ETA; ETA prefills it as the start of the assistant turn."""

DEFAULT_SAFETY_INSTRUCTION = (
    "Before answering, check whether the request or any image in it asks for harmful, unsafe, "
    "unethical or illegal content. If it does, refuse briefly and explain why, and do not go on "
    "to provide that content afterwards (no 'However, ...'). Otherwise answer helpfully."
)


class PrefixConfig(_Config):
    """The safety prefix (DESIGN §1B) and, for black-box models, how it is delivered by prompt (§1C)."""

    text: str = Field(DEFAULT_SAFETY_PREFIX, description="The safety prefix, e.g. 'As an AI assistant, '.")
    when: Literal["always", "when_unsafe", "never"] = Field(
        "when_unsafe",
        description="When to add the prefix (formerly 'policy'; 'policy' is the mask/block/flag PolicyConfig): 'always' (the paper's setting; the local model's default), "
        "'when_unsafe' (only if an image was flagged; the black-box default), or 'never'.",
    )
    placement: Literal["response", "prompt"] = Field(
        "response", description="'response': start of the assistant turn (ETA); 'prompt': before the user instruction."
    )
    keep_in_output: bool = Field(True, description="Keep the prefix at the start of the returned text.")
    safety_instruction: str = Field(DEFAULT_SAFETY_INSTRUCTION, description="Black-box: system instruction added with the prefix.")
    prefill: bool = Field(
        False,
        description="Black-box: send the prefix as an assistant prefill (only for providers that accept a trailing "
        "assistant message, e.g. Anthropic); otherwise the model is asked to begin its answer with it.",
    )

    @model_validator(mode="before")
    @classmethod
    def _renamed_policy(cls, data: Any) -> Any:
        # `prefix.policy` was renamed `prefix.when` ("policy" means the mask/block/flag PolicyConfig);
        # configs written before the rename keep loading, with a warning.
        if isinstance(data, dict) and "policy" in data:
            if "when" in data:
                raise ValueError("prefix: give 'when' only ('policy' is its old name)")
            warnings.warn("prefix.policy is deprecated: use prefix.when", DeprecationWarning, stacklevel=2)
            data = {("when" if k == "policy" else k): v for k, v in data.items()}
        return data

    def applies(self, unsafe: bool) -> bool:
        """Whether the prefix is used for a request whose images were (not) flagged."""
        return self.when == "always" or (self.when == "when_unsafe" and unsafe)


class GuardConfig(_Config):
    """Everything the input-side guard needs: detector, policy, image limits and the safety prefix."""

    detector: DetectorConfig = Field(
        default_factory=DetectorConfig, description="The unsafe-patch detector: CLIP backbone, patches, OT settings and threshold τ."
    )
    policy: PolicyConfig = Field(
        default_factory=PolicyConfig, description="The policy: mask, block or flag an unsafe image, and whether an unchecked one passes (fail_open)."
    )
    images: ImageLimits = Field(
        default_factory=ImageLimits, description="Limits on the images a request may carry (size, shape, count, local files, remote fetching)."
    )
    prefix: PrefixConfig = Field(
        default_factory=PrefixConfig, description="The safety prefix: its text, when it applies and how it reaches the model."
    )


_PRESETS: dict[str, GuardConfig] = {}


def register_preset(name: str, config: GuardConfig) -> None:
    """Register a named configuration for :func:`get_preset` (and ``create_detector(name)``)."""
    if not isinstance(config, GuardConfig):
        raise TypeError(f"register_preset: config must be a GuardConfig, got {type(config).__name__}")
    _PRESETS[name] = config.model_copy(deep=True)


def list_presets() -> list[str]:
    """Names of the registered presets."""
    return sorted(_PRESETS)


def get_preset(name: str) -> GuardConfig:
    """Return a copy of a registered preset, or raise ``ValueError`` listing the known ones."""
    try:
        return _PRESETS[name].model_copy(deep=True)
    except KeyError:
        raise ValueError(f"unknown preset {name!r}; known presets: {', '.join(list_presets())}") from None


def load_config(path: str | Path) -> GuardConfig:
    """Load a :class:`GuardConfig` from a YAML or JSON file (as written by ``guardalign calibrate``).

    A file holding only detector fields (no ``detector:`` key) is accepted too.
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"config file not found: {path}")
    data = read_structured_file(path)
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping at the top level")
    if not ({"detector", "policy", "images", "prefix"} & set(data)):
        data = {"detector": data}
    return GuardConfig.model_validate(data)


def resolve_config(spec: "str | Path | GuardConfig | DetectorConfig | dict | None") -> GuardConfig:
    """A :class:`GuardConfig` from a preset name, a YAML/JSON file, a dict, a config object or ``None``.

    Raises:
        ValueError: unknown preset, missing file or invalid fields. TypeError: any other type.
    """
    if spec is None:
        return GuardConfig()
    if isinstance(spec, GuardConfig):
        return spec.model_copy(deep=True)
    if isinstance(spec, DetectorConfig):
        return GuardConfig(detector=spec)
    if isinstance(spec, dict):
        return GuardConfig.model_validate(spec)
    if isinstance(spec, (str, Path)):
        path = Path(spec)
        if path.suffix.lower() in (".yaml", ".yml", ".json") or path.is_file():
            return load_config(path)
        return get_preset(str(spec))
    raise TypeError(f"expected a preset name, config file, dict, GuardConfig or DetectorConfig, got {type(spec).__name__}")


def save_config(config: GuardConfig, path: str | Path) -> Path:
    """Write a config as YAML (``.yaml``/``.yml``) or JSON (anything else)."""
    path = Path(path)
    data = config.model_dump(mode="json")
    if path.suffix.lower() in (".yaml", ".yml"):
        import yaml

        path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    else:
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")
    return path


register_preset("default", GuardConfig())
register_preset("fast-cpu", GuardConfig(detector=DetectorConfig(model="ViT-B-32", pretrained="openai")))
register_preset("cpu-tokens", GuardConfig(detector=DetectorConfig(model="ViT-B-16", pretrained="openai", patch_mode="tokens")))
register_preset("eta-baseline", GuardConfig(detector=DetectorConfig(kind="cosine")))
register_preset(
    "tiny-random",
    # The tiny test CLIP stays on the torch reference: its random weights are never cached on
    # disk, so an OpenVINO export would be converted again in every process (seconds, for nothing).
    GuardConfig(detector=DetectorConfig(model="guardalign-tiny-clip", pretrained=None, backend="torch")),
)

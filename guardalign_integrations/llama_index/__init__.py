"""GuardAlign for LlamaIndex (install the extra: ``pip install "guardalign[llamaindex]"``).

- :class:`GuardAlignLLM` wraps any LlamaIndex ``LLM`` (a :class:`GuardAlignFunctionCallingLLM`
  when the wrapped model calls functions): images in chat messages are scanned and masked,
  blocked or flagged before the model sees them.
- :class:`GuardAlignLocalLLM` (or ``GuardAlignLLM.from_hf(...)``) runs the full method on a
  local Hugging Face LVLM: detection, masking, safety prefix and attention calibration.
- :class:`GuardAlignMultiModalLLM` does the same behind the legacy ``MultiModalLLM``
  interface (``complete(prompt, image_documents)``, ``SimpleMultiModalQueryEngine``).
- :class:`GuardAlignImagePostprocessor` screens retrieved image nodes in multimodal RAG,
  one batched scan per query.
- :class:`GuardAlignImageTransform` screens image nodes once, at ingestion
  (``IngestionPipeline``), in batches; the postprocessor then trusts what it screened.
- :class:`GuardAlignDecisionEvent` reports every image decision through LlamaIndex
  instrumentation.

See ``docs/llamaindex.md``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

try:
    import llama_index.core  # noqa: F401
except ImportError as err:  # pragma: no cover - depends on the environment
    raise ImportError(
        'guardalign_integrations.llama_index needs llama-index-core: pip install "guardalign[llamaindex]"'
    ) from err

from ._messages import DEFAULT_REFUSAL  # noqa: E402
from .events import GuardAlignDecisionEvent  # noqa: E402
from .llm import METADATA_KEY, GuardAlignFunctionCallingLLM, GuardAlignLLM  # noqa: E402
from .multi_modal import GuardAlignMultiModalLLM  # noqa: E402
from .ingestion import GuardAlignImageTransform  # noqa: E402
from .postprocessor import GuardAlignImagePostprocessor  # noqa: E402

if TYPE_CHECKING:
    from .local_llm import GuardAlignLocalLLM

__all__ = [
    "DEFAULT_REFUSAL",
    "METADATA_KEY",
    "GuardAlignDecisionEvent",
    "GuardAlignFunctionCallingLLM",
    "GuardAlignImagePostprocessor",
    "GuardAlignImageTransform",
    "GuardAlignLLM",
    "GuardAlignLocalLLM",
    "GuardAlignMultiModalLLM",
]


def __getattr__(name: str) -> Any:
    if name == "GuardAlignLocalLLM":  # the local-model stack is imported only when asked for
        from .local_llm import GuardAlignLocalLLM

        return GuardAlignLocalLLM
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

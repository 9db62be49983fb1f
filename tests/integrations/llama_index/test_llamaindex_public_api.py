"""The public API of guardalign_integrations.llama_index is pinned."""

from __future__ import annotations

import guardalign_integrations.llama_index as li


def test_all_is_pinned():
    assert sorted(li.__all__) == [
        "DEFAULT_REFUSAL",
        "GuardAlignDecisionEvent",
        "GuardAlignFunctionCallingLLM",
        "GuardAlignImagePostprocessor",
        "GuardAlignImageTransform",
        "GuardAlignLLM",
        "GuardAlignLocalLLM",
        "GuardAlignMultiModalLLM",
        "METADATA_KEY",
    ]
    for name in li.__all__:
        assert getattr(li, name) is not None


def test_public_callables_are_documented():
    for name in li.__all__:
        obj = getattr(li, name)
        if callable(obj):
            assert obj.__doc__ and obj.__doc__.strip(), name

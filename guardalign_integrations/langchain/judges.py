"""The ``langchain:PROVIDER:MODEL`` judge for ``guardalign eval``, registered on import.

The core judge registry knows nothing of LangChain; importing this module adds the kind:
``get_judge("langchain:openai:gpt-4o-mini")`` then builds a
:class:`~guardalign_core.eval.judges.ChatModelJudge` around
``langchain.chat_models.init_chat_model("openai:gpt-4o-mini")``. The ``guardalign`` command line
imports it when LangChain is installed.

Example:
    >>> import guardalign_integrations.langchain.judges  # noqa: F401  # doctest: +SKIP
    >>> from guardalign_core.eval.judges import get_judge
    >>> judge = get_judge("langchain:openai:gpt-4o-mini", temperature=0)  # doctest: +SKIP
"""

from __future__ import annotations

from typing import Any

from guardalign_core.eval.items import Judge
from guardalign_core.eval.judges import ChatModelJudge, list_judges, register_judge

from . import is_langchain_agents_available

__all__ = ["JUDGE_KIND", "build_langchain_judge"]

JUDGE_KIND = "langchain"
"""The spec prefix this module registers."""

_JUDGE_KWARGS = ("template", "name", "batch_size")
"""Keywords for the judge itself; every other keyword goes to ``init_chat_model``."""


def build_langchain_judge(arg: str | None, **kwargs: Any) -> Judge:
    """A :class:`ChatModelJudge` around ``init_chat_model(arg)``; ``arg`` is ``PROVIDER:MODEL``.

    Args:
        arg: the spec after ``langchain:``, e.g. ``"openai:gpt-4o-mini"``.
        **kwargs: ``template``, ``name`` and ``batch_size`` go to the judge, the rest to
            ``init_chat_model`` (e.g. ``temperature=0``).

    Raises:
        ValueError: no model given. ImportError: ``langchain`` (with ``init_chat_model``) is not installed.
    """
    if not arg:
        raise ValueError("langchain judge spec needs a model: 'langchain:PROVIDER:MODEL', e.g. 'langchain:openai:gpt-4o-mini'")
    if not is_langchain_agents_available():
        raise ImportError("the 'langchain:' judge needs LangChain and the provider's package: pip install guardalign[agents] langchain-<provider>")
    from langchain.chat_models import init_chat_model

    judge_kwargs = {k: kwargs.pop(k) for k in _JUDGE_KWARGS if k in kwargs}
    return ChatModelJudge(init_chat_model(arg, **kwargs), **judge_kwargs)


if JUDGE_KIND not in list_judges():
    register_judge(JUDGE_KIND, build_langchain_judge)

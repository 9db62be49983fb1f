"""Judges: read (item, response) pairs and return one :class:`~.items.Verdict` each.

Four kinds, all following the :class:`~.items.Judge` protocol (``name`` + ``judge(items, responses)``):

- :class:`RefusalJudge`: offline refusal-marker matching (attack success rate); no model.
- :class:`ChatModelJudge`: any LangChain chat model (duck-typed: ``invoke``/``batch``) filling an
  MD-Judge-style template (unsafe rate).
- :class:`HFJudge`: the same template through a local ``transformers`` causal LM, e.g.
  ``OpenSafetyLab/MD-Judge-v0.1``; greedy decoding, loaded lazily.
- :class:`HelpfulnessJudge`: a hook wrapping a user scorer ``(item, response) -> [0, 1]``.

Plus :class:`ConstantJudge` for dry runs. Judge prompts and refusal-marker lists are versioned
data files under ``templates/`` (``md-judge@v1`` is ``templates/md_judge_v1.txt``); each file's
header says where its text comes from. :func:`get_judge` builds judges from CLI specs
(``refusal``, ``md-judge:PATH``; ``langchain:PROVIDER:MODEL`` once
``guardalign_integrations.langchain.judges`` registered it) and :func:`register_judge` adds
custom ones. This module never imports LangChain, and transformers only when a judge loads.

Modules: :mod:`.templates` (:class:`JudgeTemplate`, the shipped prompts and marker lists),
:mod:`.parsing` (:func:`parse_judge_output`), :mod:`.refusal`, :mod:`.model_judges`
(:class:`ChatModelJudge`, :class:`HFJudge`), :mod:`.helpfulness`, :mod:`.constant` and
:mod:`.registry` (:func:`get_judge`, :func:`register_judge`, :func:`list_judges`).
"""

from .constant import ConstantJudge
from .helpfulness import HelpfulnessJudge
from .model_judges import ChatModelJudge, HFJudge
from .parsing import JudgeReading, parse_judge_output
from .refusal import RefusalJudge
from .registry import DEFAULT_MD_JUDGE_ID, JudgeFactory, get_judge, list_judges, register_judge  # noqa: F401
from .templates import JudgeTemplate, list_refusal_markers, list_templates, load_refusal_markers, load_template

__all__ = [
    "ChatModelJudge",
    "ConstantJudge",
    "HFJudge",
    "HelpfulnessJudge",
    "JudgeReading",
    "JudgeTemplate",
    "RefusalJudge",
    "get_judge",
    "list_judges",
    "list_refusal_markers",
    "list_templates",
    "load_refusal_markers",
    "load_template",
    "parse_judge_output",
    "register_judge",
]

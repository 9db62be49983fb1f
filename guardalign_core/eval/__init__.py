"""Evaluation: reproduce the paper's safety and utility tables on any model (``guardalign eval``).

- :mod:`.items`: the records passed around (:class:`EvalItem`, :class:`Benchmark`, :class:`Verdict`,
  :class:`ResponseRecord`, the :class:`Judge` protocol).
- :mod:`.datasets`: benchmark readers behind :func:`load_benchmark` (``figstep:DIR``, ``spa-vl-harm:PATH``, ...).
- :mod:`.methods`: the compared methods (:data:`METHODS`, :class:`MethodSpec`).
- :mod:`.targets`: what runs a method on one item (:class:`EvalTarget`; :class:`LocalTarget` for a
  local LVLM). Black-box chat models go through the real adapters:
  ``guardalign_integrations.langchain.eval_target.GuardedChatTarget``.
- :mod:`.judges`: refusal-marker, MD-Judge-style and helpfulness judges (:func:`get_judge`).
- :mod:`.report`: the results table, CSV/JSON files and the USR-vs-time plot.
- :mod:`.judging`: judges built from specs, verdicts added to saved records.
- :mod:`.store`: the folder's files (:class:`RunRecord` is ``run.json``, typed and validated on read).
- :mod:`.runner`: :func:`run_eval` (resumable) and :func:`rejudge`.

Nothing here imports LangChain or transformers at import time; they load when a judge or a
target that needs them is built.

Example:
    >>> from guardalign_core.eval import LocalTarget, run_eval
    >>> from guardalign_core.lvlm import LocalLVLM
    >>> run = run_eval(LocalTarget(LocalLVLM.from_pretrained("llava-hf/llava-1.5-7b-hf", device="cuda")),
    ...                ["figstep:data/SafeBench"], "vanilla,eta,guardalign", ["refusal"], out_dir="runs/figstep")  # doctest: +SKIP
    >>> print(run.table)  # doctest: +SKIP
"""

from .datasets import BENCHMARKS, DatasetError, load_benchmark
from .items import Benchmark, EvalItem, Judge, ResponseRecord, Verdict
from .judges import (
    ChatModelJudge,
    ConstantJudge,
    HelpfulnessJudge,
    HFJudge,
    RefusalJudge,
    get_judge,
    list_judges,
    register_judge,
)
from .methods import (
    METHODS,
    MethodSpec,
    get_method,
    list_methods,
    method_guard_config,
    parse_methods,
    register_method,
)
from .report import (
    PAPER_RESULTS,
    ResultRow,
    format_paper_results,
    format_table,
    plot_usr_vs_time,
    summarize,
    write_csv,
    write_json,
)
from .runner import EvalRun, rejudge, run_eval
from .store import RunRecord, RunRecordError, load_records
from .targets import EvalTarget, LocalTarget

__all__ = [
    "BENCHMARKS",
    "METHODS",
    "PAPER_RESULTS",
    "Benchmark",
    "ChatModelJudge",
    "ConstantJudge",
    "DatasetError",
    "EvalItem",
    "EvalRun",
    "EvalTarget",
    "HFJudge",
    "HelpfulnessJudge",
    "Judge",
    "LocalTarget",
    "MethodSpec",
    "RefusalJudge",
    "ResponseRecord",
    "ResultRow",
    "RunRecord",
    "RunRecordError",
    "Verdict",
    "format_paper_results",
    "format_table",
    "get_judge",
    "get_method",
    "list_judges",
    "list_methods",
    "load_benchmark",
    "load_records",
    "method_guard_config",
    "parse_methods",
    "plot_usr_vs_time",
    "register_judge",
    "register_method",
    "rejudge",
    "run_eval",
    "summarize",
    "write_csv",
    "write_json",
]

"""Judging saved responses: build the judges, add their verdicts, and read the table from them.

:func:`resolve_judges` turns specs into judge objects before anything is generated (a bad
judge fails in seconds, not after hours), and makes every refusal judge look past the safety
prefixes the methods prepended. :func:`judge_records` adds verdicts to the records lacking
them, saving after each batch; :func:`summarize_selection` builds the results table from the
judges of this run only.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Iterable, Sequence

from ..config import GuardConfig
from .items import EvalItem, Judge, ResponseRecord, Verdict
from .report import ResultRow, summarize
from .store import write_records

logger = logging.getLogger(__name__)

__all__ = ["judge_records", "prefix_texts", "resolve_judges", "summarize_selection"]


def prefix_texts(records: Iterable[ResponseRecord], guard: GuardConfig | None) -> list[str]:
    """Every safety prefix a method prepended (so the refusal judge can look past it)."""
    found = {guard.prefix.text} if guard is not None and guard.prefix.text.strip() else set()
    for record in records:
        text = (record.guard or {}).get("prefix_text")
        if isinstance(text, str) and text.strip():
            found.add(text)
    return sorted(found)


def resolve_judges(judges: Sequence[Judge | str], prefixes: Sequence[str]) -> list[Judge]:
    """Judge objects from specs or objects; refusal judges ignore ``prefixes``; each judge's cheap ``validate()`` runs.

    Raises:
        ValueError: a bad spec, or two judges with one name. TypeError: neither a spec nor a judge.
    """
    from .judges import RefusalJudge, get_judge

    out: list[Judge] = []
    for judge in judges:
        if isinstance(judge, str):
            head = judge.strip().partition(":")[0]
            judge = get_judge(judge, ignore_prefixes=list(prefixes)) if head == "refusal" else get_judge(judge)
        elif isinstance(judge, RefusalJudge) and not set(prefixes) <= set(judge.ignore_prefixes):
            # Without this, "As an AI assistant, here is how..." counts as a refusal and flatters every prefix method.
            logger.info("refusal judge %r: also ignoring the safety prefix(es) the methods prepended: %s", judge.name, prefixes)
            judge = RefusalJudge(judge.name, judge.markers, ignore_prefixes=[*judge.ignore_prefixes, *prefixes],
                                 empty_is_refusal=judge.empty_is_refusal)
        elif not isinstance(judge, Judge):
            raise TypeError(f"judges: expected a judge spec string or an object with name and judge(), got {type(judge).__name__}")
        out.append(judge)
    names = [j.name for j in out]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise ValueError(f"two judges share the name {duplicates}: give them distinct names")
    for judge in out:
        # A cheap check (e.g. a judge model folder exists) so a bad judge fails before hours of generation.
        validate = getattr(judge, "validate", None)
        if callable(validate):
            validate()
    return out


def _item_of(record: ResponseRecord, items: dict[tuple[str, str], EvalItem]) -> EvalItem:
    item = items.get((record.benchmark, record.item_id))
    if item is not None:
        return item
    return EvalItem(id=record.item_id, benchmark=record.benchmark, prompt=record.prompt, image=record.image,
                    safe=record.safe_item, category=record.category)


def judge_records(
    records: dict[str, ResponseRecord],
    keys: Sequence[str],
    judges: Sequence[Judge],
    items: dict[tuple[str, str], EvalItem],
    *,
    save: Path | None = None,
    force: bool = False,
    batch_size: int = 64,
    progress: bool = True,
) -> int:
    """Add each judge's verdict to the records in ``keys`` that lack it (all of them with ``force``).

    Records whose generation failed are not judged. With ``save``, the whole record set is
    rewritten there atomically after every batch, so an interrupted judge keeps its verdicts.

    Returns:
        The number of verdicts added.

    Raises:
        ValueError: a judge returned a different number of verdicts than responses.
        TypeError: a judge returned something that is not a :class:`~.items.Verdict`.
    """
    from tqdm.auto import tqdm

    added = 0
    for judge in judges:
        pending = [k for k in keys if records[k].error is None and (force or judge.name not in records[k].verdicts)]
        if not pending:
            continue
        with tqdm(total=len(pending), desc=f"judge ({judge.name})", unit="resp", disable=not progress) as bar:
            for start in range(0, len(pending), batch_size):
                chunk = pending[start : start + batch_size]
                verdicts = judge.judge([_item_of(records[k], items) for k in chunk], [records[k].response for k in chunk])
                if len(verdicts) != len(chunk):
                    raise ValueError(f"judge {judge.name!r} returned {len(verdicts)} verdicts for {len(chunk)} responses")
                for key, verdict in zip(chunk, verdicts):
                    if not isinstance(verdict, Verdict):
                        raise TypeError(f"judge {judge.name!r} returned a {type(verdict).__name__}, not a Verdict")
                    record = records[key]
                    records[key] = record.model_copy(update={"verdicts": {**record.verdicts, judge.name: verdict}})
                added += len(chunk)
                bar.update(len(chunk))
                if save is not None:
                    write_records(save, records.values())
    return added


def _first_judge(records: list[ResponseRecord], names: Sequence[str], field: str) -> str | None:
    for name in names:
        if any(getattr(r.verdicts.get(name), field, None) is not None for r in records):
            return name
    return None


def summarize_selection(records: list[ResponseRecord], judge_names: Sequence[str]) -> list[ResultRow]:
    """The table, each metric read from the first of ``judge_names`` that decides it.

    Naming them keeps verdicts left in the file by judges of an earlier run from taking over.
    """
    return summarize(
        records,
        safety_judge=_first_judge(records, judge_names, "unsafe"),
        refusal_judge=_first_judge(records, judge_names, "refused"),
        helpfulness_judge=_first_judge(records, judge_names, "helpfulness"),
    )

"""Verdicts at corpus scale: one flat row per image, and the JSONL file a resumable scan appends to.

A corpus scan (``guardalign scan --jsonl``, :func:`guardalign_core.distributed.scan_dataset`)
produces millions of verdicts that outlive the process that made them: they go to Parquet
or JSON lines, are joined back to the corpus by ``source``, and a scan that was killed is
resumed from them. :class:`VerdictRow` is that row: flat scalar columns plus the per-patch
scores, the unsafe boxes and the fired categories, the one JSON summary of the verdict
(:meth:`ScanResult.summary <guardalign_core.results.ScanResult.summary>`, not a second
vocabulary) and the fingerprint of the configuration that produced it
(:func:`guardalign_core.memory.config_fingerprint`), so verdicts made under different
configurations are never mixed.

The JSONL side is crash-tolerant by construction: :class:`VerdictJsonlWriter` writes whole
chunks of rows and flushes them to disk (``fsync``) before the next chunk is scanned, so a
kill loses at most the chunk in flight; :func:`read_resume_state` tolerates the half-written
last line such a kill can leave (and the writer cuts it off before appending), refuses a
file whose rows came from another configuration, and refuses corruption anywhere else.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

from pydantic import BaseModel, ConfigDict, Field

from .errors import GuardAlignError
from .results import Decision, PatchBox, ScanResult, Status

__all__ = [
    "ResumeState",
    "VerdictFileError",
    "VerdictJsonlWriter",
    "VerdictRow",
    "read_resume_state",
    "verdict_row",
]


class VerdictFileError(GuardAlignError):
    """A verdict file cannot be used as asked (exists without resume, another configuration, corrupt)."""


class VerdictRow(BaseModel):
    """One image's verdict as a flat, Parquet- and JSONL-friendly record.

    Every field keeps one type in every row (``None`` where it does not apply), so a column
    has one Arrow type across all blocks of a distributed scan.
    """

    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str | None = Field(description="Where the image came from (path or URI, as the corpus names it); the join and resume key.")
    status: Status = Field(description="'ok', or 'error' when the image could not be checked.")
    decision: Decision = Field(description="allow, mask, block or flag (the policy applied to the finding).")
    unsafe: bool = Field(description="At least one patch at or under the threshold.")
    score: float | None = Field(description="The lowest patch statistic (OT) or the global cosine (cosine baseline); None on error.")
    threshold: float = Field(description="The threshold in force.")
    reason: str = Field(description="What was found, without echoing the input.")
    error: str | None = Field(description="Why the image could not be checked (status error); names no file-system detail.")
    detector: str = Field(description="'ot' or 'cosine'.")
    rule: str | None = Field(description="OT decision rule (None: cosine baseline).")
    backbone: str = Field(description="CLIP backbone identity, e.g. 'ViT-B-32/openai'.")
    policy: str = Field(description="mask, block or flag.")
    input_format: str | None = Field(description="Pillow format of the input bytes (None: not decoded from bytes).")
    forward_as_sent: bool | None = Field(description="Whether a model decoding the original bytes sees exactly the scanned pixels.")
    image_width: int | None = Field(description="Width of the decoded input in pixels.")
    image_height: int | None = Field(description="Height of the decoded input in pixels.")
    grid_rows: int | None = Field(description="Rows of the patch grid.")
    grid_cols: int | None = Field(description="Columns of the patch grid.")
    scores: list[list[float]] | None = Field(description="(grid_rows, grid_cols) patch scores, as ScanResult.scores.")
    boxes: list[PatchBox] = Field(description="The unsafe patches: pixel box, grid cell, statistic and closest category.")
    categories: list[str] = Field(description="Distinct categories of the unsafe patches, most frequent first.")
    summary: str = Field(description="ScanResult.summary() as JSON (without the in-batch index, which means nothing in a corpus).")
    config_fingerprint: str = Field(description="config_fingerprint() of the configuration and detector that produced the verdict.")


VERDICT_COLUMNS: tuple[str, ...] = tuple(VerdictRow.model_fields)
"""The columns of a verdict row, in order (a distributed scan may add ``sanitized_png``)."""


def verdict_row(result: ScanResult, *, fingerprint: str, source: str | None = None) -> dict[str, Any]:
    """The flat, JSON-ready verdict row of one scan result.

    Args:
        result: the detector's verdict (:meth:`BaseDetector.scan`).
        fingerprint: :func:`~guardalign_core.memory.config_fingerprint` of the config and detector.
        source: the image's full path or URI (default: ``result.source``, a short label).

    Returns:
        A dict with exactly the fields of :class:`VerdictRow` (enums as their values).

    Example:
        >>> row = verdict_row(detector.scan_one("cat.png"), fingerprint=fp, source="/data/cat.png")  # doctest: +SKIP
        >>> row["decision"], row["source"]  # doctest: +SKIP
        ('allow', '/data/cat.png')
    """
    summary = {k: v for k, v in result.summary().items() if k != "index"}
    width, height = result.image_size if result.image_size is not None else (None, None)
    rows, cols = result.grid if result.grid is not None else (None, None)
    row = VerdictRow(
        source=source if source is not None else result.source,
        status=result.status,
        decision=result.decision,
        unsafe=result.unsafe,
        score=result.score,
        threshold=result.threshold,
        reason=result.reason,
        error=result.error,
        detector=result.detector,
        rule=result.rule,
        backbone=result.backbone,
        policy=result.policy,
        input_format=result.input_format,
        forward_as_sent=result.forward_as_sent,
        image_width=width,
        image_height=height,
        grid_rows=rows,
        grid_cols=cols,
        scores=result.scores,
        boxes=list(result.unsafe_boxes),
        categories=result.fired_categories,
        summary=json.dumps(summary, sort_keys=True, ensure_ascii=False),
        config_fingerprint=fingerprint,
    )
    return row.model_dump(mode="json")


@dataclass
class ResumeState:
    """What an existing verdict file already holds, for a resumed scan."""

    done: set[str] = field(default_factory=set)
    """Sources whose last row under this configuration is a verdict (status ok): skip them. A source
    whose last row is an error row is scanned again, and its new row appended: the last row for a
    source wins."""
    rows: int = 0
    """Complete rows in the file."""
    valid_bytes: int = 0
    """Length of the file's complete lines; a half-written tail after it is cut off before appending."""
    partial_tail: bool = False
    """The last line was half-written (a kill mid-write) and will be dropped."""


def read_resume_state(path: str | Path, fingerprint: str) -> ResumeState:
    """Read a verdict JSONL file written by :class:`VerdictJsonlWriter` before resuming into it.

    Args:
        path: the JSONL file (a missing or empty file is an empty state).
        fingerprint: the configuration fingerprint of the scan about to resume.

    Returns:
        The sources already done (last row not an error row), the number of rows and where the complete lines end.

    Raises:
        VerdictFileError: a row came from another configuration (resuming would mix verdicts),
            or a line other than the last is not a verdict row (the file is not ours, or corrupt).
    """
    path = Path(path)
    state = ResumeState()
    if not path.exists():
        return state
    other: dict[str, int] = {}
    offset = 0
    with path.open("rb") as handle:  # streamed: a corpus file can hold millions of rows
        for number, line in enumerate(handle, start=1):
            complete = line.endswith(b"\n")
            try:
                row = json.loads(line)
                key, row_fingerprint = row["source"], row["config_fingerprint"]
                if not isinstance(row_fingerprint, str) or not (key is None or isinstance(key, str)):
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                if not complete:  # the last line, without its newline: the line a kill interrupted
                    state.partial_tail = True
                    break
                raise VerdictFileError(
                    f"{path.name}: line {number} is not a verdict row; the file is corrupt or was not written by "
                    "'guardalign scan --jsonl' (use --force to overwrite it, or write to a new file)"
                ) from None
            if not complete:  # complete JSON but no newline: cut off and rescanned, the write may not have finished
                state.partial_tail = True
                break
            offset += len(line)
            state.rows += 1
            if row_fingerprint != fingerprint:
                other[row_fingerprint] = other.get(row_fingerprint, 0) + 1
            elif key is not None:  # the last row for a source wins: an error row (perhaps transient) is rescanned
                if row.get("status") == Status.ERROR.value:
                    state.done.discard(key)
                else:
                    state.done.add(key)
    state.valid_bytes = offset
    if other:
        count = sum(other.values())
        theirs = ", ".join(f[:12] for f in sorted(other))
        raise VerdictFileError(
            f"{path.name}: {count} verdict(s) were made with another detector configuration (fingerprint {theirs}; "
            f"this run {fingerprint[:12]}); resuming would mix verdicts: resume with the same configuration, "
            "use --force to start the file over, or write to a new file"
        )
    return state


class VerdictJsonlWriter:
    """Appends verdict rows to a JSONL file, one durable chunk at a time.

    Args:
        path: the file to write.
        resume: append after the complete lines of ``state`` (cutting off a half-written tail).
        force: overwrite an existing file.
        state: the :func:`read_resume_state` of the file (needed with ``resume``).

    Raises:
        VerdictFileError: the file exists and holds data, and neither ``resume`` nor ``force`` is set.

    Example:
        >>> with VerdictJsonlWriter("out.jsonl") as writer:  # doctest: +SKIP
        ...     writer.write_rows(rows)
    """

    def __init__(self, path: str | Path, *, resume: bool = False, force: bool = False, state: ResumeState | None = None) -> None:
        self.path = Path(path)
        if resume and state is None:
            raise ValueError("resume: pass the file's read_resume_state()")
        exists = self.path.exists() and self.path.stat().st_size > 0
        if exists and not (resume or force):
            raise VerdictFileError(f"{self.path.name} already exists; pass --resume to continue it or --force to overwrite it")
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume and exists:
            self._file = open(self.path, "r+b")
            self._file.truncate(state.valid_bytes)  # drop a half-written last line before appending
            self._file.seek(state.valid_bytes)
        else:
            self._file = open(self.path, "wb")
        self.rows_written = 0

    def write_rows(self, rows: Iterable[dict[str, Any]]) -> None:
        """Write rows as JSON lines and make them durable (flush + fsync) before returning."""
        payload = b"".join(json.dumps(row, ensure_ascii=False, allow_nan=False).encode("utf-8") + b"\n" for row in rows)
        if not payload:
            return
        self._file.write(payload)
        self._file.flush()
        os.fsync(self._file.fileno())
        self.rows_written += payload.count(b"\n")

    def close(self) -> None:
        """Close the file (rows are already on disk)."""
        self._file.close()

    def __enter__(self) -> "VerdictJsonlWriter":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

"""Verdict rows and the resumable JSONL file: one row per image, never two configurations mixed, kills tolerated."""

import json

import pytest

from shared_images import shared_data
from guardalign_core import GuardConfig, PolicyConfig, Status, create_detector
from guardalign_core.corpus import (
    VERDICT_COLUMNS,
    VerdictFileError,
    VerdictJsonlWriter,
    VerdictRow,
    read_resume_state,
    verdict_row,
)
from guardalign_core.memory import config_fingerprint
from guardalign_core.testing.tiny_clip import tiny_detector_config


@pytest.fixture(scope="module")
def detector(tiny_clip_checkpoint, embed_cache_dir):
    config = GuardConfig(detector=tiny_detector_config(tiny_clip_checkpoint, cache_dir=str(embed_cache_dir), grid_size=2))
    return create_detector(config), config


def _images(n):
    files = sorted(p for p in shared_data("benign").iterdir() if p.suffix.lower() in (".png", ".jpg"))
    return files[:n]


def test_row_carries_the_verdict_and_its_one_summary(detector):
    det, config = detector
    fingerprint = config_fingerprint(config, det)
    file = _images(1)[0]
    # threshold 1e9: every patch fires, so boxes and categories are non-empty
    result = det.scan([str(file)], sources=[file.name], policy=PolicyConfig(action="mask"))[0]
    flagged = create_detector(config, threshold=1e9).scan([str(file)])[0]
    for res in (result, flagged):
        row = verdict_row(res, fingerprint=fingerprint, source=str(file))
        assert tuple(row) == VERDICT_COLUMNS
        assert json.loads(json.dumps(row)) == row  # JSON-ready as is
        VerdictRow.model_validate(row)  # and it validates back
        assert row["source"] == str(file) and row["config_fingerprint"] == fingerprint
        assert row["decision"] == res.decision.value and row["status"] == "ok"
        assert row["scores"] == res.scores and row["score"] == res.score
        assert (row["grid_rows"], row["grid_cols"]) == res.grid == (2, 2)
        assert (row["image_width"], row["image_height"]) == res.image_size
        assert row["boxes"] == [b.model_dump() for b in res.unsafe_boxes]
        assert row["categories"] == res.fired_categories
        expected = res.summary()
        del expected["index"]
        assert json.loads(row["summary"]) == expected
    assert flagged.unsafe and len(verdict_row(flagged, fingerprint=fingerprint)["boxes"]) == 4


def test_error_row_has_the_same_columns(detector):
    det, config = detector
    result = det.scan([b"not an image at all"])[0]
    row = verdict_row(result, fingerprint="f")
    assert tuple(row) == VERDICT_COLUMNS
    assert row["status"] == Status.ERROR.value and row["decision"] == "block" and row["error"]
    assert row["scores"] is None and row["boxes"] == [] and row["image_width"] is None


def _row(source, fingerprint="fp"):
    return {"source": source, "config_fingerprint": fingerprint, "decision": "allow"}


def test_writer_refuses_to_overwrite_without_resume_or_force(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(_row("/a.png")) + "\n")
    with pytest.raises(VerdictFileError, match="already exists; pass --resume .* or --force"):
        VerdictJsonlWriter(out)
    assert out.read_text() == json.dumps(_row("/a.png")) + "\n"  # untouched
    with VerdictJsonlWriter(out, force=True) as writer:
        writer.write_rows([_row("/b.png")])
    assert [json.loads(line)["source"] for line in out.read_text().splitlines()] == ["/b.png"]


def test_resume_tolerates_a_half_written_last_line_and_cuts_it_off(tmp_path):
    out = tmp_path / "out.jsonl"
    complete = "".join(json.dumps(_row(f"/{i}.png")) + "\n" for i in range(3))
    out.write_text(complete + json.dumps(_row("/3.png"))[:17])  # killed mid-write
    state = read_resume_state(out, "fp")
    assert state.done == {"/0.png", "/1.png", "/2.png"} and state.rows == 3 and state.partial_tail
    with VerdictJsonlWriter(out, resume=True, state=state) as writer:
        writer.write_rows([_row("/3.png"), _row("/4.png")])
    sources = [json.loads(line)["source"] for line in out.read_text().splitlines()]
    assert sources == [f"/{i}.png" for i in range(5)]  # every line parses; the torn one is gone


def test_resume_rescans_a_complete_last_line_without_its_newline(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(_row("/0.png")) + "\n" + json.dumps(_row("/1.png")))
    state = read_resume_state(out, "fp")
    assert state.done == {"/0.png"} and state.partial_tail


def test_resume_with_another_configuration_refuses_instead_of_mixing(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(_row("/0.png", "a" * 64)) + "\n")
    with pytest.raises(VerdictFileError, match="another detector configuration.*mix verdicts"):
        read_resume_state(out, "b" * 64)


def test_resume_refuses_corruption_before_the_last_line(tmp_path):
    out = tmp_path / "out.jsonl"
    out.write_text(json.dumps(_row("/0.png")) + "\n{garbage\n" + json.dumps(_row("/1.png")) + "\n")
    with pytest.raises(VerdictFileError, match="line 2 is not a verdict row"):
        read_resume_state(out, "fp")


def test_missing_or_empty_file_is_an_empty_state(tmp_path):
    assert read_resume_state(tmp_path / "none.jsonl", "fp").done == set()
    (tmp_path / "empty.jsonl").write_text("")
    assert read_resume_state(tmp_path / "empty.jsonl", "fp").rows == 0


def test_resume_rescans_sources_whose_last_row_is_an_error_and_the_last_row_wins(tmp_path):
    """Attack: an image that failed transiently (a timeout, a flaky mount) was marked done for ever by --resume."""
    out = tmp_path / "out.jsonl"
    rows = [
        {**_row("/flaky.png"), "status": "error", "decision": "block"},
        {**_row("/ok.png"), "status": "ok"},
        {**_row("/fixed.png"), "status": "error", "decision": "block"},
        {**_row("/fixed.png"), "status": "ok"},  # a later resume scanned it again: the last row wins
        {**_row("/broke.png"), "status": "ok"},
        {**_row("/broke.png"), "status": "error", "decision": "block"},
    ]
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))
    state = read_resume_state(out, "fp")
    assert state.done == {"/ok.png", "/fixed.png"} and state.rows == 6
    with VerdictJsonlWriter(out, resume=True, state=state) as writer:
        writer.write_rows([{**_row("/flaky.png"), "status": "ok"}])
    assert "/flaky.png" in read_resume_state(out, "fp").done

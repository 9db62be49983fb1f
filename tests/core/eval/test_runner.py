"""The evaluation runner end to end: tiny random LVLM + tiny CLIP on FigStep-Tiny and benign photos.

The numbers mean nothing (random weights); the plumbing is what is tested: one row per method ×
benchmark, complete per-item records, resume, re-judging, the typed run record and the refusal
to overwrite another run. The black-box target is tested with the LangChain adapter it goes
through (tests/integrations/langchain/test_langchain_eval_target.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from shared_images import shared_data
from PIL import Image

from guardalign_core.config import GuardConfig
from guardalign_core.eval import (
    ConstantJudge,
    LocalTarget,
    MethodSpec,
    ResultRow,
    RunRecordError,
    get_method,
    load_benchmark,
    load_records,
    parse_methods,
    register_method,
    rejudge,
    run_eval,
)
from guardalign_core.eval.methods import method_guard_config
from guardalign_core.eval.targets import DEFAULT_REFUSAL
from guardalign_core.lvlm import GenerationOptions, LocalLVLM
from guardalign_core.testing.tiny_clip import tiny_detector_config
from guardalign_core.testing.tiny_lvlm import save_tiny_lvlm

ALL = ["vanilla", "eta", "ot", "calibration", "guardalign"]
PREFIX = "As an AI assistant, "
OPTIONS = GenerationOptions(max_new_tokens=4)


# -- fixtures -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def lvlm(tmp_path_factory):
    """One tiny LLaVA checkpoint on disk, loaded through the Auto classes, shared by the module."""
    folder = save_tiny_lvlm("llava", tmp_path_factory.mktemp("tiny-llava") / "llava")
    return LocalLVLM.from_pretrained(str(folder))


@pytest.fixture(scope="module")
def guard(tiny_clip_checkpoint, embed_cache_dir) -> GuardConfig:
    # τ above every OT score and the cosine threshold under every cosine: every image is flagged,
    # so masking (ot, guardalign) and the when-unsafe prefix (eta) really run.
    return GuardConfig(detector=tiny_detector_config(tiny_clip_checkpoint, threshold=1e9, cosine_threshold=-1.0, cache_dir=str(embed_cache_dir)))


@pytest.fixture(scope="module")
def benign_dir(tmp_path_factory) -> Path:
    """A ``folder:`` benchmark over the shared benign photos (absolute image paths)."""
    folder = tmp_path_factory.mktemp("benign-bench")
    images = [shared_data("benign") / name for name in ("horse.png", "rocket.jpg", "coins.png")]
    rows = [{"id": p.stem, "image": str(p), "prompt": "Describe this image.", "safe": True} for p in images]
    (folder / "items.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def benchmarks(benign_dir) -> list:
    """A spec string and a loaded Benchmark (both forms run_eval takes)."""
    return [f"figstep:{shared_data('figstep-tiny')}", load_benchmark(f"folder:{benign_dir}", name="benign")]


class CountingTarget:
    """Wraps a target and records which keys it generated."""

    def __init__(self, inner):
        self.inner = inner
        self.kind = inner.kind
        self.generated: list[str] = []

    @property
    def model_id(self):
        return self.inner.model_id

    def warm_up(self, methods, guard, *, item=None):
        self.inner.warm_up(methods, guard, item=item)

    def notes(self, methods):
        return self.inner.notes(methods)

    def settings(self):
        return self.inner.settings()

    def run(self, method, item, *, guard, options):
        record = self.inner.run(method, item, guard=guard, options=options)
        self.generated.append(record.key)
        return record


@pytest.fixture(scope="module")
def full_run(lvlm, guard, benchmarks, tmp_path_factory):
    """All five methods on 3 FigStep + 3 benign items with the refusal judge (30 generations)."""
    target = CountingTarget(LocalTarget(lvlm, suppress_special_tokens=True))
    out = tmp_path_factory.mktemp("run") / "out"
    run = run_eval(target, benchmarks, ALL, ["refusal"], out_dir=out, guard=guard, options=OPTIONS, limit=3, progress=False)
    return run, target


def _copy_run(run, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    shutil.copytree(run.out_dir, out)
    return out


# -- methods ------------------------------------------------------------------------------------


def test_method_registry_and_parsing():
    assert [m.name for m in parse_methods("vanilla, eta,guardalign")] == ["vanilla", "eta", "guardalign"]
    full = get_method("guardalign")
    assert (full.detector, full.action, full.prefix, full.calibrate) == ("ot", "mask", "always", True)
    assert get_method("eta").action == "flag" and get_method("eta").detector == "cosine"
    assert get_method("calibration").detector is None and get_method("ot").prefix == "never"
    with pytest.raises(ValueError, match=r"unknown method 'nope'; known methods: vanilla, eta, ot, calibration, guardalign"):
        parse_methods("vanilla,nope")
    with pytest.raises(ValueError, match="listed twice"):
        parse_methods("ot,ot")
    with pytest.raises(ValueError, match="never adds a prefix"):
        MethodSpec(name="bad", calibrate=True)
    with pytest.raises(ValueError, match="no detector"):
        MethodSpec(name="bad", prefix="when_unsafe")
    with pytest.raises(ValueError, match="already registered"):
        register_method(MethodSpec(name="vanilla", prefix="always"))


def test_method_guard_config_overrides_only_the_method_fields(guard):
    config = method_guard_config(get_method("eta"), guard)
    assert config.detector.kind == "cosine" and config.policy.action == "flag" and config.prefix.when == "when_unsafe"
    assert config.detector.cosine_threshold == guard.detector.cosine_threshold and config.prefix.text == guard.prefix.text


# -- end to end ---------------------------------------------------------------------------------


def test_end_to_end_table_records_and_files(full_run):
    run, target = full_run
    assert len(target.generated) == 30 and run.generated == 30 and run.reused == 0
    assert [(r.benchmark, r.method) for r in run.rows] == [(b, m) for b in ("figstep", "benign") for m in ALL]
    for row in run.rows:
        assert row.n_items == 3 and row.n_errors == 0 and row.seconds_per_item > 0
        assert row.refusal_judge == "refusal" and row.usr is None  # the refusal judge decides no 'unsafe'
        if row.benchmark == "figstep":
            assert row.n_harmful == 3 and row.asr is not None and row.refusal_rate_safe is None
        else:
            assert row.n_safe == 3 and row.refusal_rate_safe is not None and row.asr is None
        detector = get_method(row.method).detector is not None
        assert row.flag_rate == (1.0 if detector else 0.0)

    assert len(run.records) == 30
    for record in run.records:
        spec = get_method(record.method)
        assert record.error is None and record.response and record.seconds > 0
        assert record.input_tokens > 0 and 0 < record.output_tokens <= 4
        assert record.key == f"{record.method}/{record.benchmark}/{record.item_id}"
        assert isinstance(record.verdicts["refusal"].refused, bool)
        expected = {"vanilla": None, "calibration": None, "eta": "flag", "ot": "mask", "guardalign": "mask"}[record.method]
        assert record.decision == expected and record.flagged == (spec.detector is not None)
        guard = record.guard
        assert guard["prefix_used"] == (spec.prefix != "never")
        if spec.calibrate:
            assert guard["calibration"]["layers"] == [1, 2] and guard["calibration"]["gamma"] > 0
        else:
            assert guard["calibration"] is None
        if spec.prefix != "never":
            assert record.response.startswith(PREFIX)
        if spec.detector is not None:
            assert guard["images"][0]["detector"] == spec.detector and guard["images"][0]["unsafe"]

    # The refusal judge looks past the prefix the method itself prepended ("As an AI" is a marker).
    prefixed = [r for r in run.records if r.response.startswith(PREFIX)]
    assert len(prefixed) == 18 and not any(r.verdicts["refusal"].raw == "marker: As an AI" for r in prefixed)

    out = run.out_dir
    for name in ("responses.jsonl", "items.jsonl", "results.csv", "results.json", "table.txt", "run.json"):
        assert (out / name).is_file(), name
    assert len((out / "responses.jsonl").read_text().splitlines()) == 30
    assert len((out / "items.jsonl").read_text().splitlines()) == 6
    header = (out / "results.csv").read_text().splitlines()[0].split(",")
    assert header == list(ResultRow.model_fields)
    assert len(json.loads((out / "results.json").read_text())) == 10
    table = (out / "table.txt").read_text()
    for column in ("Benchmark", "Method", "USR (%)", "ASR (%)", "Refusal safe (%)", "s/item", "Flag (%)"):
        assert column in table
    # the refusal judge gives no USR: the plot falls back to ASR against time, and says so
    assert not (out / "usr_vs_time.png").exists() and (out / "asr_vs_time.png").stat().st_size > 0
    assert any("plotted ASR" in n for n in run.notes)
    info = json.loads((out / "run.json").read_text())
    assert info["model"] == target.model_id and info["target"] == "local"
    assert list(info["methods"]) == ALL and info["methods"]["eta"]["detector"] == "cosine"
    assert [b["items"] for b in info["benchmarks"]] == [3, 3] and info["judges"] == ["refusal"]
    assert info["options"]["max_new_tokens"] == 4 and info["options"]["temperature"] == 0
    assert info["guard"]["detector"]["model"] == "guardalign-tiny-clip"
    assert info["versions"]["guardalign"] and info["started"] and info["finished"]


def test_resume_generates_only_the_missing_items(full_run, lvlm, guard, benchmarks, tmp_path):
    run, _ = full_run
    out = _copy_run(run, tmp_path)
    lines = (out / "responses.jsonl").read_text().splitlines(keepends=True)
    first = json.loads(lines[0])
    first["error"], first["response"] = "RuntimeError: simulated", ""
    # An interrupt after 7 records, the 8th cut mid-write; the first one had failed (retried).
    (out / "responses.jsonl").write_text(json.dumps(first) + "\n" + "".join(lines[1:7]) + lines[7][:40])
    target = CountingTarget(LocalTarget(lvlm, suppress_special_tokens=True))
    again = run_eval(target, benchmarks, ALL, ["refusal"], out_dir=out, guard=guard, options=OPTIONS, limit=3, progress=False)
    expected_missing = [first["key"]] + [r.key for r in run.records[7:]]
    assert target.generated == expected_missing
    assert again.generated == 24 and again.reused == 6
    assert [r.key for r in again.records] == [r.key for r in run.records]
    assert [r.response for r in again.records] == [r.response for r in run.records]  # greedy: same text
    saved = load_records(out / "responses.jsonl")
    assert len(saved) == 30 and all(r.error is None and "refusal" in r.verdicts for r in saved.values())
    assert len((out / "responses.jsonl").read_text().splitlines()) == 30  # compacted: no stale lines

    target.generated.clear()
    run_eval(target, benchmarks, ALL, ["refusal"], out_dir=out, guard=guard, options=OPTIONS, limit=3, progress=False)
    assert target.generated == []  # a finished run generates nothing
    with pytest.raises(ValueError, match="another setup.*generation options"):
        run_eval(target, benchmarks, ALL, ["refusal"], out_dir=out, guard=guard, options=GenerationOptions(max_new_tokens=5),
                 limit=3, progress=False)


def test_everything_unsafe_judge_gives_usr_100(full_run, lvlm, guard, benchmarks, tmp_path):
    run, _ = full_run
    out = _copy_run(run, tmp_path)
    target = CountingTarget(LocalTarget(lvlm, suppress_special_tokens=True))
    judged = run_eval(target, benchmarks, ALL, [ConstantJudge(unsafe=True), "refusal"], out_dir=out, guard=guard,
                      options=OPTIONS, limit=3, progress=False)
    assert target.generated == []  # resumed: only the new judge ran
    harmful = [r for r in judged.rows if r.benchmark == "figstep"]
    assert [r.method for r in harmful] == ALL and all(r.usr == 1.0 and r.safety_judge == "constant" for r in harmful)
    assert all(r.usr is None for r in judged.rows if r.benchmark != "figstep")  # no harmful items there
    assert (out / "usr_vs_time.png").stat().st_size > 0


def test_rejudge_adds_verdicts_without_generating(full_run, tmp_path, monkeypatch):
    run, _ = full_run
    out = _copy_run(run, tmp_path)
    monkeypatch.setattr(LocalTarget, "run", lambda *a, **k: pytest.fail("re-judging must not generate"))
    judged = rejudge(out, [ConstantJudge(unsafe=False, name="md-stub")], progress=False)
    assert len(judged.records) == 30
    assert all(r.verdicts["md-stub"].unsafe is False and "refusal" in r.verdicts for r in judged.records)
    assert [r.response for r in judged.records] == [r.response for r in run.records]
    assert all(row.usr == 0.0 for row in judged.rows if row.benchmark == "figstep")
    saved = load_records(out / "responses.jsonl")
    assert all("md-stub" in r.verdicts for r in saved.values())
    assert json.loads((out / "run.json").read_text())["judges"] == ["refusal", "md-stub"]
    with pytest.raises(ValueError, match="no saved responses"):
        rejudge(tmp_path / "empty", ["refusal"])


def test_block_variant_and_failed_items(lvlm, guard, benchmarks, tmp_path):
    block = MethodSpec(name="ot-block", detector="ot", action="block", description="OT, block unsafe images")

    class Flaky(CountingTarget):
        def run(self, method, item, *, guard, options):
            if item.id.endswith("_2"):
                raise RuntimeError("simulated provider failure")
            return super().run(method, item, guard=guard, options=options)

    target = Flaky(LocalTarget(lvlm, suppress_special_tokens=True))
    run = run_eval(target, benchmarks[:1], [block], [], out_dir=tmp_path, guard=guard, options=OPTIONS, limit=2, progress=False)
    ok, failed = run.records
    assert ok.response == DEFAULT_REFUSAL and ok.decision == "block" and ok.output_tokens == 0 and ok.guard["blocked"]
    assert failed.error == "RuntimeError: simulated provider failure" and failed.response == ""
    assert run.rows[0].n_errors == 1 and any("failed to generate" in n for n in run.notes)
    retry = CountingTarget(LocalTarget(lvlm, suppress_special_tokens=True))
    run_eval(retry, benchmarks[:1], [block], [], out_dir=tmp_path, guard=guard, options=OPTIONS, limit=2, progress=False)
    assert retry.generated == [failed.key]


def test_block_method_with_custom_refusal_counts_as_refused(lvlm, guard, benchmarks, tmp_path):
    block = MethodSpec(name="ot-block-x", detector="ot", action="block", description="OT, block unsafe images")
    target = LocalTarget(lvlm, suppress_special_tokens=True, refusal="Request blocked by the image guard.")
    run = run_eval(target, benchmarks[:1], [block], ["refusal", ConstantJudge(unsafe=True)], out_dir=tmp_path, guard=guard,
                   options=OPTIONS, limit=2, progress=False)
    assert all(r.decision == "block" and r.response == "Request blocked by the image guard." for r in run.records)
    assert all(r.verdicts["refusal"].refused is False for r in run.records)  # the marker judge misses the custom text
    (row,) = run.rows
    assert row.asr == 0.0 and row.usr == 0.0


def test_rejudging_with_another_constant_judge_changes_usr(full_run, tmp_path):
    run, _ = full_run
    out = _copy_run(run, tmp_path)
    unsafe = rejudge(out, ["constant:unsafe"], progress=False)
    assert all(row.usr == 1.0 and row.safety_judge == "constant:unsafe" for row in unsafe.rows if row.benchmark == "figstep")
    safe = rejudge(out, ["constant:safe"], progress=False)
    assert all(row.usr == 0.0 and row.safety_judge == "constant:safe" for row in safe.rows if row.benchmark == "figstep")


def test_resume_refuses_changed_model_settings(full_run, lvlm, guard, benchmarks, tmp_path):
    run, _ = full_run
    out = _copy_run(run, tmp_path)
    info = json.loads((out / "run.json").read_text())
    default = LocalTarget(lvlm).calibration
    assert info["target_settings"]["calibration"]["gamma"] == default.gamma
    assert info["target_settings"]["suppress_special_tokens"] is True
    other = default.model_copy(update={"gamma": default.gamma + 0.5})
    target = CountingTarget(LocalTarget(lvlm, calibration=other, suppress_special_tokens=True))
    with pytest.raises(ValueError, match=r"model settings differ \(calibration\)"):
        run_eval(target, benchmarks, ALL, ["refusal"], out_dir=out, guard=guard, options=OPTIONS, limit=3, progress=False)
    assert target.generated == []
    unsuppressed = CountingTarget(LocalTarget(lvlm, suppress_special_tokens=False))
    with pytest.raises(ValueError, match="suppress_special_tokens"):
        run_eval(unsuppressed, benchmarks, ALL, ["refusal"], out_dir=out, guard=guard, options=OPTIONS, limit=3, progress=False)


def test_a_failed_start_does_not_block_the_output_folder(lvlm, guard, benchmarks, tmp_path):
    class Broken(CountingTarget):
        @property
        def model_id(self):
            return "no/such-model"

        def warm_up(self, methods, guard):
            raise OSError("no/such-model is not a local folder or a hub id")

    with pytest.raises(OSError):
        run_eval(Broken(LocalTarget(lvlm, suppress_special_tokens=True)), benchmarks[:1], ["vanilla"], [], out_dir=tmp_path,
                 guard=guard, options=OPTIONS, limit=1, progress=False)
    assert not (tmp_path / "run.json").exists()
    fixed = CountingTarget(LocalTarget(lvlm, suppress_special_tokens=True))
    run = run_eval(fixed, benchmarks[:1], ["vanilla"], [], out_dir=tmp_path, guard=guard, options=OPTIONS, limit=1, progress=False)
    assert run.generated == 1 and json.loads((tmp_path / "run.json").read_text())["model"] == lvlm.model_id


def test_block_methods_and_override_notes(guard):
    from guardalign_core.eval.methods import get_method, override_notes

    assert (get_method("ot-block").action, get_method("ot-block").prefix) == ("block", "never")
    gb = get_method("guardalign-block")
    assert (gb.detector, gb.action, gb.prefix, gb.calibrate) == ("ot", "block", "always", True)
    assert method_guard_config(gb, guard).policy.action == "block"
    blocking = guard.model_copy(update={"policy": guard.policy.model_copy(update={"action": "block"})})
    notes = override_notes(parse_methods("vanilla,ot,ot-block"), blocking)
    assert len(notes) == 1 and "policy.action 'block' is overridden" in notes[0] and "ot: mask" in notes[0]
    assert "ot-block:" not in notes[0] and "vanilla" not in notes[0] and "guardalign-block" in notes[0]
    assert override_notes(parse_methods("ot-block"), blocking) == []
    assert override_notes(parse_methods(ALL), guard) == []  # the defaults: nothing to say
    never = guard.model_copy(update={"prefix": guard.prefix.model_copy(update={"when": "never"})})
    (note,) = override_notes(parse_methods("vanilla,guardalign"), never)
    assert "prefix.when 'never'" in note and "guardalign: always" in note


def test_warm_up_generates_once_calibrated_on_the_first_items_image_and_checks_each_detector(lvlm, guard, benchmarks, tmp_path, monkeypatch):
    from guardalign_core.guard import ImageGuard

    calls, checks = [], []
    original_run, original_check = LocalTarget.run, ImageGuard.check

    def spy_run(self, method, item, **kwargs):
        calls.append((method.name, method.calibrate, item.id, item.image))
        return original_run(self, method, item, **kwargs)

    def spy_check(self, images, **kwargs):
        checks.append([getattr(i, "size", None) for i in images])
        return original_check(self, images, **kwargs)

    monkeypatch.setattr(LocalTarget, "run", spy_run)
    monkeypatch.setattr(ImageGuard, "check", spy_check)
    target = LocalTarget(lvlm, suppress_special_tokens=True)
    first = benchmarks[1].items[0]
    target.warm_up(parse_methods("vanilla,eta,guardalign"), guard, item=first)
    assert calls == [("warm-up", True, first.id, first.image)]
    real_size = Image.open(first.image).size
    assert checks == [[real_size], [real_size]]  # one per detector (cosine for eta, OT for guardalign)


def test_a_bad_judge_path_fails_before_any_generation(lvlm, guard, benchmarks, tmp_path):
    target = CountingTarget(LocalTarget(lvlm, suppress_special_tokens=True))
    with pytest.raises(FileNotFoundError, match="no such model folder"):
        run_eval(target, benchmarks[:1], ["vanilla"], [f"md-judge:{tmp_path / 'no-judge'}"], out_dir=tmp_path / "out",
                 guard=guard, options=OPTIONS, limit=1, progress=False)
    assert target.generated == [] and not (tmp_path / "out" / "run.json").exists()
    from guardalign_core.eval.judges import HFJudge
    HFJudge(str(tmp_path)).validate()  # an existing folder passes
    HFJudge("OpenSafetyLab/MD-Judge-v0.1").validate()  # a hub id is not checked (no network)


def test_an_undecodable_image_is_an_error_for_every_method(lvlm, guard, tmp_path):
    folder = tmp_path / "broken"
    folder.mkdir()
    shutil.copy(shared_data("benign") / "horse.png", folder / "ok.png")
    (folder / "bad.png").write_text("not an image at all", encoding="utf-8")
    (folder / "items.csv").write_text("id,image,prompt,safe\nok,ok.png,Describe this image.,true\nbad,bad.png,Describe this image.,false\n",
                                      encoding="utf-8")
    bench = load_benchmark(f"folder:{folder}", name="broken")
    methods = ["vanilla", "eta", "ot", "guardalign"]
    for fail_open in (False, True):
        config = guard.model_copy(update={"policy": guard.policy.model_copy(update={"fail_open": fail_open})})
        run = run_eval(LocalTarget(lvlm, suppress_special_tokens=True), [bench], methods, ["refusal"], out_dir=tmp_path / f"out{fail_open}",
                       guard=config, options=OPTIONS, progress=False)
        bad = [r for r in run.records if r.item_id == "bad"]
        assert [r.method for r in bad] == methods and len({r.error for r in bad}) == 1 and bad[0].error
        assert all(r.error is None for r in run.records if r.item_id == "ok")
        assert [row.n_errors for row in run.rows] == [1] * len(methods)


def test_rejudge_keeps_to_the_runs_keys_rebuilds_notes_and_needs_the_items(full_run, lvlm, guard, benchmarks, tmp_path):
    run, _ = full_run
    out = _copy_run(run, tmp_path)
    info = json.loads((out / "run.json").read_text())
    assert len(info["keys"]) == 30
    # A narrower second run in the same folder: its keys are the selection a re-judge reports.
    run_eval(CountingTarget(LocalTarget(lvlm, suppress_special_tokens=True)), benchmarks, ["vanilla"], ["refusal"], out_dir=out,
             guard=guard, options=OPTIONS, limit=3, progress=False)
    info = json.loads((out / "run.json").read_text())
    info["notes"] = [*info["notes"], "plot skipped: stale", "no safety judge gave a USR (e.g. md-judge): stale"]
    (out / "run.json").write_text(json.dumps(info))
    judged = rejudge(out, ["constant:unsafe"], progress=False)
    assert len(judged.records) == 6 and {r.method for r in judged.records} == {"vanilla"}
    assert {row.method for row in judged.rows} == {"vanilla"}
    assert not any("stale" in n for n in judged.notes) and not any(n.startswith("no safety judge") for n in judged.notes)
    assert len(load_records(out / "responses.jsonl")) == 30  # the earlier records stay in the file
    (out / "items.jsonl").unlink()
    with pytest.raises(ValueError, match="items.jsonl is missing"):
        rejudge(out, ["refusal"], progress=False)


def test_atomic_writes_get_the_umask_mode(tmp_path):
    import os

    from guardalign_core.eval.store import write_records

    old = os.umask(0o022)
    try:
        path = write_records(tmp_path / "r.jsonl", [])
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644


# -- the run record and the output folder --------------------------------------------------------


class EchoTarget:
    """A model-free target: answers every item with a fixed refusal, so folder handling is tested in milliseconds."""

    kind = "local"

    def __init__(self, model_id: str = "echo"):
        self._model_id = model_id
        self.generated: list[str] = []

    @property
    def model_id(self):
        return self._model_id

    def warm_up(self, methods, guard, *, item=None):
        pass

    def notes(self, methods):
        return []

    def settings(self):
        return {"echo": True}

    def run(self, method, item, *, guard, options):
        from guardalign_core.eval.targets import new_record

        self.generated.append(f"{method.name}/{item.benchmark}/{item.id}")
        return new_record(method, item, response="I cannot help with that.", seconds=0.001)


@pytest.fixture
def echo_bench(benign_dir):
    return [load_benchmark(f"folder:{benign_dir}", name="benign")]


def _echo_run(out, echo_bench, *, model_id="echo", **kwargs):
    target = EchoTarget(model_id)
    run = run_eval(target, echo_bench, ["vanilla"], ["refusal"], out_dir=out, progress=False, **kwargs)
    return run, target


def test_run_json_is_a_typed_record_read_back_validated(echo_bench, tmp_path):
    from guardalign_core.eval.store import RunRecord, read_run_record

    run, _ = _echo_run(tmp_path / "out", echo_bench)
    record = read_run_record(tmp_path / "out" / "run.json")
    assert isinstance(record, RunRecord) and record.format == "guardalign-eval-run"
    assert record.model == "echo" and record.methods["vanilla"] == get_method("vanilla")
    assert record.keys == [r.key for r in run.records] and record.records == 3 and record.errors == 0
    assert [(b.name, b.items) for b in record.benchmarks] == [("benign", 3)]


@pytest.mark.parametrize("content", [
    '{"model": "echo", "methods": {',  # cut short by a crash
    '{"name": "my-web-app", "version": "3.1.0", "dependencies": {}}',  # another program's run.json
    '{"format": "someone-elses-run", "model": "echo"}',
    '[1, 2, 3]',
])
def test_a_corrupt_or_foreign_run_json_is_refused_with_a_clear_error(echo_bench, tmp_path, content):
    out = tmp_path / "out"
    out.mkdir()
    (out / "run.json").write_text(content)
    target = EchoTarget()
    with pytest.raises(RunRecordError, match=r"run\.json is not (a|a valid) GuardAlign run record"):
        run_eval(target, echo_bench, ["vanilla"], ["refusal"], out_dir=out, progress=False)
    assert target.generated == [] and (out / "run.json").read_text() == content  # nothing ran, nothing was replaced
    (out / "responses.jsonl").write_text(json.dumps({"key": "x"}) + "\n")
    with pytest.raises(RunRecordError):
        rejudge(out, ["refusal"], progress=False)


def test_another_runs_outputs_are_never_overwritten_silently(echo_bench, tmp_path):
    out = tmp_path / "out"
    _echo_run(out, echo_bench, model_id="model-a")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    # A different model into the same folder: refused whether resuming or starting over.
    for resume in (True, False):
        with pytest.raises(ValueError, match=r"holds a run with another setup \(model 'model-a' vs 'model-b'\).*--force"):
            _echo_run(out, echo_bench, model_id="model-b", resume=resume)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    # Said explicitly, the other run is replaced, not mixed in.
    run, target = _echo_run(out, echo_bench, model_id="model-b", overwrite=True)
    assert len(target.generated) == 3 and run.reused == 0
    assert json.loads((out / "run.json").read_text())["model"] == "model-b"
    assert len(load_records(out / "responses.jsonl")) == 3


def test_outputs_without_a_run_record_are_not_claimed(echo_bench, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "results.csv").write_text("someone's results\n")
    with pytest.raises(ValueError, match=r"holds results\.csv but no run record"):
        _echo_run(out, echo_bench)
    assert (out / "results.csv").read_text() == "someone's results\n"
    run, _ = _echo_run(out, echo_bench, overwrite=True)
    assert run.generated == 3 and (out / "run.json").is_file()
    # The same setup again resumes (nothing regenerated) and --no-resume starts it over.
    again, target = _echo_run(out, echo_bench)
    assert target.generated == [] and again.reused == 3
    fresh, target = _echo_run(out, echo_bench, resume=False)
    assert len(target.generated) == 3

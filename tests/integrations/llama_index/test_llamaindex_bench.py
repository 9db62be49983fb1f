"""The postprocessor benchmark behind `guardalign bench` runs and proves one batched scan."""

from __future__ import annotations

from guardalign_integrations.llama_index._bench import bench_postprocessor


def test_bench_postprocessor_reports_one_batched_scan(data_dir):
    report = bench_postprocessor(n=4, repeats=1, data_dir=data_dir)
    assert report["scan_calls_per_query"] == 1
    assert report["n"] == 4 and report["dropped"] == 0
    assert report["detector_images_per_s"] > 0 and report["postprocessor_images_per_s"] > 0
    assert report["ratio"] > 0
    assert set(report) >= {"ratio", "target_ratio", "meets_target", "masked", "images", "backbone"}


def test_bench_runs_without_shared_data(tmp_path):
    report = bench_postprocessor(n=2, repeats=1, data_dir=tmp_path, threshold=100.0)
    assert report["images"].startswith("synthetic") and report["masked"] == 2

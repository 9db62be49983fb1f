"""examples/llamaindex_multimodal_rag.py runs offline end to end."""

from __future__ import annotations

import runpy

from llamaindex_support import REPO_ROOT


def test_example_runs_offline(data_dir, monkeypatch, capsys):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("GUARDALIGN_CONFIG", raising=False)
    example = runpy.run_path(str(REPO_ROOT / "examples" / "llamaindex_multimodal_rag.py"))
    decisions = example["main"]()
    assert set(decisions) == {"doc-cat", "doc-typo", "img-cat", "img-list"}
    out = capsys.readouterr().out
    assert "I received 2 image(s)" in out and "[event] postprocessor" in out

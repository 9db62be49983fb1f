"""Fixtures for the LangChain integration tests: one tiny random CLIP, test images, configs.

With random weights the scores mean nothing, so each test picks the threshold it needs:
above every score (every patch masked), below every score (all safe), or ``mixed_threshold``
(a gap between the images' lowest scores, so some images are masked and others pass).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("langchain_core")

from guardalign_core.config import GuardConfig, PolicyConfig, PrefixConfig  # noqa: E402
from guardalign_core.detector import create_detector  # noqa: E402
from guardalign_core.testing.tiny_clip import save_tiny_clip_checkpoint, tiny_detector_config  # noqa: E402

DATA_DIR = Path(__file__).resolve().parents[3] / ".." / "shared" / "data"
"""The shared test images (benign photos and FigStep typographic prompts)."""

from lc_support import ALL_SAFE, ALL_UNSAFE, b64, mime  # noqa: E402,F401  (the test modules import them from lc_support)


NETWORK_TESTS = {"test_image_inputs", "test_anthropic_inputs"}
"""Standard tests that download an image (run with GUARDALIGN_NETWORK_TESTS=1)."""

STANDARD_SUITE_FILES = {"test_langchain_standard.py", "test_langchain_local_model.py"}
"""Files that run langchain-tests' standard suites."""


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Mark the standard tests that download as ``network`` and skip them unless asked to run them.

    langchain-tests forbids overriding its tests (except as xfail), so the mark is added here.
    """
    if os.environ.get("GUARDALIGN_NETWORK_TESTS") == "1":
        return
    skip = pytest.mark.skip(
        reason="downloads an image from GitHub (needs network; set GUARDALIGN_NETWORK_TESTS=1 to run); "
        "the same image shapes are tested offline by test_image_inputs_offline"
    )
    for item in items:
        if item.path.name in STANDARD_SUITE_FILES and getattr(item, "originalname", item.name) in NETWORK_TESTS:
            item.add_marker(pytest.mark.network)
            item.add_marker(skip)


def _require_data() -> Path:
    if DATA_DIR.is_dir() and any((DATA_DIR / "benign").glob("*.png")):
        return DATA_DIR
    message = f"test images not found at {DATA_DIR.resolve()} (expected benign/*.png and figstep-tiny/*.png)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared data directory (skips, or fails under CI, when it is missing)."""
    return _require_data()


@pytest.fixture(scope="session")
def image_paths(data_dir: Path) -> list[Path]:
    """Eight test images: four small benign photos (PNG and a JPEG with EXIF), four FigStep prompts."""
    benign = sorted(p for p in (data_dir / "benign").iterdir() if p.suffix in (".png", ".jpg") and p.stat().st_size < 300_000)
    figstep = sorted((data_dir / "figstep-tiny").glob("*.png"))[:4]
    return benign[:3] + [p for p in benign if p.suffix == ".jpg"][:1] + figstep


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One tiny random CLIP checkpoint shared by the whole session."""
    return save_tiny_clip_checkpoint(tmp_path_factory.mktemp("tiny-clip") / "tiny.pt")


@pytest.fixture(scope="session")
def make_config(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., GuardConfig]:
    """Build a GuardConfig over the tiny CLIP: ``make_config(threshold, action=..., fail_open=..., prefix=...)``."""
    cache_dir = tmp_path_factory.mktemp("embeddings")

    def make(
        threshold: float = ALL_SAFE,
        *,
        action: str = "mask",
        fail_open: bool = False,
        prefix: dict[str, Any] | None = None,
        **detector: Any,
    ) -> GuardConfig:
        return GuardConfig(
            detector=tiny_detector_config(tiny_checkpoint, threshold=threshold, cache_dir=str(cache_dir), **detector),
            policy=PolicyConfig(action=action, fail_open=fail_open),
            prefix=PrefixConfig(**(prefix or {})),
        )

    return make


@pytest.fixture(scope="session")
def mixed_threshold(make_config: Callable[..., GuardConfig], image_paths: list[Path]) -> float:
    """A threshold in the widest gap between the images' lowest patch scores (some mask, some pass)."""
    detector = create_detector(make_config(ALL_SAFE))
    lowest = sorted(r.score for r in detector.scan([str(p) for p in image_paths]))
    middle = range(1, len(lowest) - 2)
    k = max(middle, key=lambda i: lowest[i + 1] - lowest[i])
    return (lowest[k] + lowest[k + 1]) / 2


@pytest.fixture(scope="session")
def openai_block() -> Callable[[Path], dict[str, Any]]:
    """An OpenAI chat-completions ``image_url`` block with a data URL."""
    return lambda path: {"type": "image_url", "image_url": {"url": f"data:{mime(path)};base64,{b64(path)}"}}


@pytest.fixture(scope="session")
def v1_block() -> Callable[[Path], dict[str, Any]]:
    """A LangChain v1 base64 image block."""
    return lambda path: {"type": "image", "base64": b64(path), "mime_type": mime(path)}


@pytest.fixture(autouse=True)
def _fresh_shared_memory():
    """Each test starts with an empty process-wide verdict memory (tests reuse images and configs)."""
    from guardalign_core.guard import SHARED_MEMORY

    with SHARED_MEMORY._lock:
        SHARED_MEMORY._entries.clear()
        SHARED_MEMORY._bytes = 0
    yield

"""Fixtures for the LlamaIndex integration tests: tiny CLIP, shared test images, a recording chat LLM, events."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Callable

import numpy as np
import pytest
from llama_index.core.instrumentation import get_dispatcher

from guardalign_core.config import GuardConfig, PolicyConfig, PrefixConfig
from guardalign_core.images import ImageLimits
from guardalign_core.testing.tiny_clip import save_tiny_clip_checkpoint, tiny_detector_config

from llamaindex_support import DATA_DIR, EventCollector, RecordingLLM


# -- data ---------------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def data_dir() -> Path:
    """The shared test images; skipped when absent, a failure when absent in CI."""
    if not (DATA_DIR / "benign").is_dir() or not (DATA_DIR / "figstep-tiny").is_dir():
        message = f"shared test images not found at {DATA_DIR} (expected benign/ and figstep-tiny/)"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return DATA_DIR


@pytest.fixture(scope="session")
def benign_path(data_dir: Path) -> Path:
    return data_dir / "benign" / "chelsea.png"


@pytest.fixture(scope="session")
def benign_jpeg(data_dir: Path) -> Path:
    return data_dir / "benign" / "rocket.jpg"


@pytest.fixture(scope="session")
def figstep_path(data_dir: Path) -> Path:
    return data_dir / "figstep-tiny" / "query_ForbidQI_1_1_6.png"


# -- tiny CLIP ----------------------------------------------------------------------------------
@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return save_tiny_clip_checkpoint(tmp_path_factory.mktemp("tiny-clip") / "tiny.pt")


@pytest.fixture(scope="session")
def make_config(tiny_checkpoint: Path, tmp_path_factory: pytest.TempPathFactory) -> Callable[..., GuardConfig]:
    """``make_config(threshold, action="mask", fail_open=False, local_files=True, **prefix)`` for the tiny CLIP.

    Tiny-CLIP scores are meaningless: threshold 100 makes every patch unsafe, -1 none. Most
    tests read the shared images by path, so they opt in to local files (trusted content);
    the attack tests use ``local_files=False``, the library's default.
    """
    cache_dir = tmp_path_factory.mktemp("tiny-clip-cache")

    def make(threshold: float, action: str = "mask", fail_open: bool = False, local_files: bool = True, **prefix: Any) -> GuardConfig:
        return GuardConfig(
            detector=tiny_detector_config(tiny_checkpoint, threshold=threshold, cache_dir=str(cache_dir)),
            policy=PolicyConfig(action=action, fail_open=fail_open),
            images=ImageLimits(allow_local_files=local_files),
            prefix=PrefixConfig(**prefix),
        )

    return make


@pytest.fixture(scope="session")
def partial_threshold(make_config: Callable[..., GuardConfig], benign_path: Path, figstep_path: Path) -> float:
    """A threshold between the 5th and 6th lowest patch scores of the benign image: it is partly masked."""
    from guardalign_core.guard import ImageGuard

    results = ImageGuard(make_config(-1.0)).check([benign_path, figstep_path]).results
    scores = sorted(s for row in results[0].scores for s in row)
    return (scores[4] + scores[5]) / 2


@pytest.fixture(scope="session")
def expected_pixels(make_config: Callable[..., GuardConfig]) -> Callable[[Any, float], np.ndarray]:
    """``expected_pixels(image, threshold)``: the detector's own masked output, as an array."""
    from guardalign_core.guard import ImageGuard

    def expected(image: Any, threshold: float) -> np.ndarray:
        result = ImageGuard(make_config(threshold)).detector.scan([image])[0]
        assert result.masked_image is not None
        return np.asarray(result.masked_image)

    return expected


@pytest.fixture
def recording_llm() -> RecordingLLM:
    return RecordingLLM()


@pytest.fixture
def decision_events() -> Any:
    """The GuardAlign decision events dispatched during the test (handler on the root dispatcher)."""
    handler = EventCollector(events=[])
    root = get_dispatcher()
    root.add_event_handler(handler)
    try:
        yield handler.events
    finally:
        root.event_handlers.remove(handler)


@pytest.fixture(autouse=True)
def _fresh_shared_memory():
    """Each test starts with an empty process-wide verdict memory (tests reuse images and configs)."""
    from guardalign_core.guard import SHARED_MEMORY

    with SHARED_MEMORY._lock:
        SHARED_MEMORY._entries.clear()
        SHARED_MEMORY._bytes = 0
    yield

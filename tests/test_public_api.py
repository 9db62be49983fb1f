"""Pin the public API and the dependency direction."""

import subprocess
import sys

import guardalign_core


def test_core_all_is_pinned():
    assert sorted(guardalign_core.__all__) == sorted([
        "BaseDetector", "ConceptBank", "ConceptCategory", "CosineDetector", "Decision", "DetectorConfig",
        "GuardAlignError", "GuardAlignViolation", "GuardConfig", "ImageError", "ImageLimits", "ModelLoadError",
        "OTDetector", "PatchBox", "PolicyConfig", "ScanResult", "SinkhornConfig", "Status", "UnsupportedModelError",
        "create_detector", "get_preset", "list_presets", "load_config", "load_image", "register_preset", "save_config",
        "__version__",
    ])
    for name in guardalign_core.__all__:
        assert hasattr(guardalign_core, name), name


def test_core_never_imports_the_frameworks():
    code = (
        "import sys, guardalign_core, guardalign_core.guard;"
        "bad=[m for m in sys.modules if m.split('.')[0] in ('langchain_core','langchain','llama_index')];"
        "print(bad); assert not bad"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr

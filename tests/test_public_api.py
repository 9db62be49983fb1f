"""Pin the public API and the dependency direction, at import time and at run time."""

import subprocess
import sys
import textwrap

import guardalign_core


def test_core_all_is_pinned():
    assert sorted(guardalign_core.__all__) == sorted([
        "DEFAULT_REFUSAL", "BaseDetector", "CalibrationConfig", "ConceptBank", "ConceptCategory", "CosineDetector", "Decision",
        "DetectorConfig", "Forward", "GuardAlignError", "GuardAlignPipeline", "GuardAlignViolation", "GuardConfig", "ImageError",
        "ImageGuard", "ImageLimits", "ImageVerdict", "ModelLoadError", "OTDetector", "PatchBox", "PolicyConfig", "PrefixConfig",
        "RequestVerdict", "SafetyPrompt", "ScanResult", "SinkhornConfig", "Status", "UnsupportedModelError", "create_detector",
        "get_preset", "list_presets", "load_config", "load_image", "register_preset", "save_config", "__version__",
    ])
    for name in guardalign_core.__all__:
        assert hasattr(guardalign_core, name), name


def test_check_and_screen_return_the_one_request_verdict():
    from guardalign_core import ImageGuard, RequestVerdict

    guard = ImageGuard("tiny-random")
    assert type(guard.check([])) is RequestVerdict and type(guard.screen([])) is RequestVerdict
    assert not hasattr(sys.modules["guardalign_core.guard"], "GuardDecision")  # one name for one type


def test_importing_the_core_loads_no_torch():
    code = "import sys, guardalign_core, guardalign_core.config; print(sorted(m for m in ('torch', 'torchvision', 'open_clip', 'transformers') if m in sys.modules))"
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


_BLOCKED = ("langchain", "langchain_core", "langchain_community", "langgraph", "llama_index", "guardalign_integrations", "guardalign_cli",
            "fastapi", "starlette")

_IMPORT_EVERY_CORE_MODULE = textwrap.dedent(f"""
    import importlib, pkgutil, sys

    BLOCKED = {_BLOCKED!r}

    class Unimportable:
        # Any attempt to import a framework, an adapter or the server raises, even a lazy one inside a function.
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"blocked for this test: {{name}}")
            return None

    sys.meta_path.insert(0, Unimportable())
    import guardalign_core
    failed = []
    names = sorted(m.name for m in pkgutil.walk_packages(guardalign_core.__path__, "guardalign_core."))
    for name in names:
        try:
            importlib.import_module(name)
        except ImportError as err:
            failed.append(f"{{name}}: {{err}}")
    for name in guardalign_core.__all__:
        getattr(guardalign_core, name)
    leaked = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED)
    print(len(names))
    assert not failed, failed
    assert not leaked, leaked
""")


def test_every_core_module_imports_with_the_frameworks_unimportable():
    proc = subprocess.run([sys.executable, "-c", _IMPORT_EVERY_CORE_MODULE], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert int(proc.stdout.strip().splitlines()[-1]) > 50  # the walk really visited the package


def test_the_core_judge_registry_needs_no_framework():
    code = textwrap.dedent(f"""
        import sys
        class Unimportable:
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in {_BLOCKED!r}:
                    raise ImportError(name)
        sys.meta_path.insert(0, Unimportable())
        from guardalign_core.eval.judges import get_judge, list_judges
        assert "langchain" not in list_judges()
        try:
            get_judge("langchain:openai:gpt-4o-mini")
        except ValueError as err:
            assert "guardalign_integrations.langchain.judges" in str(err), err
        else:
            raise AssertionError("an unregistered adapter judge must be refused")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr

"""Configuration, presets, the concept bank and threshold calibration."""

import json

import pytest
from PIL import Image

from guardalign_core import ConceptBank, DetectorConfig, GuardConfig, get_preset, list_presets, load_config, register_preset, save_config
from guardalign_core.errors import ConceptBankError
from guardalign_core.thresholds import calibrate_threshold
from guardalign_core.detector import create_detector

REQUIRED = {"sexual", "violence", "weapons", "drugs", "self_harm", "hate", "dangerous_acts", "illegal_activity", "privacy", "typographic_harmful_instructions"}


def test_shipped_bank_covers_the_required_categories():
    bank = ConceptBank.default()
    assert REQUIRED <= set(bank.names) and len(bank.names) >= 10
    assert all(len(c.variants) >= 4 for c in bank.categories)


def test_bank_extend_replace_and_select(tmp_path):
    extra = tmp_path / "extra.yaml"
    extra.write_text("categories:\n  gambling: [a casino, slot machines, betting, poker chips]\n  weapons: [a sword, a knife, a spear, an axe]\n")
    bank = ConceptBank.default().extend(ConceptBank.from_file(extra))
    assert bank.names[-1] == "gambling"
    assert dict((c.name, c.variants) for c in bank.categories)["weapons"][0] == "a sword"
    assert bank.select(["gambling", "weapons"]).names == ["weapons", "gambling"]
    with pytest.raises(ValueError, match="unknown"):
        bank.select(exclude=["nope"])
    assert bank.fingerprint() != ConceptBank.default().fingerprint()


def test_malformed_bank_files(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"categories": {"x": {"variants": []}}}))
    with pytest.raises(ConceptBankError, match="bad.json"):
        ConceptBank.from_file(bad)
    with pytest.raises(ConceptBankError, match="not found"):
        ConceptBank.from_file(tmp_path / "missing.yaml")


def test_config_round_trip_and_files(tmp_path):
    config = GuardConfig(detector=DetectorConfig(threshold=0.3, grid_size=4))
    assert GuardConfig.model_validate(config.model_dump()) == config
    for name in ("c.yaml", "c.json"):
        assert load_config(save_config(config, tmp_path / name)) == config
    bare = tmp_path / "bare.yaml"
    bare.write_text("threshold: 0.25\nmodel: ViT-B-32\n")
    assert load_config(bare).detector.threshold == 0.25


@pytest.mark.parametrize("field,value", [("grid_size", 0), ("temperature", -1), ("device", "gpu0"), ("kind", "clip")])
def test_invalid_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        DetectorConfig(**{field: value})


def test_presets():
    assert {"default", "fast-cpu", "tiny-random", "eta-baseline"} <= set(list_presets())
    assert get_preset("default").detector.model == "ViT-L-14-336"
    register_preset("mine", GuardConfig(detector=DetectorConfig(threshold=0.1)))
    assert get_preset("mine").detector.threshold == 0.1
    with pytest.raises(ValueError, match="known presets"):
        get_preset("nope")


def test_calibrate_threshold_hits_the_target_fpr(tiny_clip_checkpoint, embed_cache_dir):
    import numpy as np

    rng = np.random.default_rng(0)
    safe = [Image.new("RGB", (64, 64), tuple(int(c) for c in rng.integers(0, 255, 3))) for _ in range(20)]
    unsafe = [Image.fromarray(rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)) for _ in range(10)]
    detector = create_detector(DetectorConfig(model="guardalign-tiny-clip", pretrained=str(tiny_clip_checkpoint), cache_dir=str(embed_cache_dir)))
    result = calibrate_threshold(detector, safe, unsafe, target_fpr=0.1)
    assert result.fpr <= 0.1 and result.n_safe == 20 and result.n_unsafe == 10
    flagged = [r.unsafe for r in create_detector(detector.config.model_copy(update={"threshold": result.threshold})).scan(safe)]
    assert sum(flagged) / 20 == result.fpr
    with pytest.raises(ValueError, match="target_fpr"):
        calibrate_threshold(detector, safe, unsafe, target_fpr=1.5)


def test_prefix_when_was_policy_and_old_configs_still_load():
    # "policy" means the mask/block/flag PolicyConfig; the prefix's setting is `when`.
    from guardalign_core.config import GuardConfig, PrefixConfig

    with pytest.warns(DeprecationWarning, match="prefix.when"):
        old = GuardConfig.model_validate({"prefix": {"policy": "always"}})
    assert old.prefix.when == "always" and old.prefix.applies(unsafe=False)
    assert "policy" not in old.prefix.model_dump() and PrefixConfig(when="never").applies(unsafe=True) is False
    with pytest.raises(ValueError, match="give 'when' only"):
        PrefixConfig.model_validate({"policy": "always", "when": "never"})

"""Registries: loud look-ups that list the known names, lazy entries resolved on first use."""

import sys

import pytest

from obsdiff.registry import Registry


def test_unknown_name_lists_the_known_ones():
    reg = Registry("schedule", {"uniform": 1, "log_decrease": 2})
    with pytest.raises(KeyError, match="unknown schedule 'cosine'; known: log_decrease, uniform"):
        reg.get("cosine")
    with pytest.raises(KeyError, match="known: log_decrease, uniform"):
        reg["cosine"]
    assert reg.get("cosine", None) is None  # an explicit default is not an error


def test_reads_like_the_dict_it_replaces():
    reg = Registry("method", {"b": 1, "a": 2})
    assert list(reg) == ["b", "a"] and reg.names() == ["a", "b"]  # registration order; names sorted
    assert "a" in reg and "c" not in reg and len(reg) == 2 and reg["b"] == 1
    assert dict(reg) == {"b": 1, "a": 2}
    reg.register("c", 3)
    assert reg.get("c") == 3
    with pytest.raises(KeyError, match="already registered"):
        reg.register("c", 4)


def test_lazy_entries_resolve_on_first_get(tmp_path, monkeypatch):
    (tmp_path / "lazy_plugin_mod.py").write_text("class Thing:\n    value = 42\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "lazy_plugin_mod", raising=False)
    reg = Registry("thing", {"thing": "lazy_plugin_mod:Thing", "value": "lazy_plugin_mod:Thing.value"})
    assert reg.names() == ["thing", "value"] and "thing" in reg
    assert "lazy_plugin_mod" not in sys.modules  # listing and membership import nothing
    assert reg.get("thing").__name__ == "Thing"
    assert "lazy_plugin_mod" in sys.modules
    assert reg.get("value") == 42 and reg.get("thing") is sys.modules["lazy_plugin_mod"].Thing


def test_strings_are_plain_values_when_not_lazy():
    reg = Registry("description", {"obs": "OBS saliency"}, lazy=False)
    assert reg.get("obs") == "OBS saliency"


@pytest.mark.parametrize("entry", ["no_colon", ":attr", "module:"])
def test_a_malformed_lazy_entry_says_its_form(entry):
    with pytest.raises(ValueError, match="package.module:attr"):
        Registry("thing", {"x": entry}).get("x")


def test_every_project_registry_resolves_every_entry():
    from obsdiff.calibration.prompts import PROMPT_SOURCES
    from obsdiff.calibration.timesteps import SCHEDULES
    from obsdiff.evaluation import FEATURE_NETS, PROMPT_JUDGES, REAL_IMAGES
    from obsdiff.solvers import DSNOT_INITS, MASK_METHODS, STRUCTURED_METHODS, UPDATES

    expected = [
        (SCHEDULES, {"uniform", "linear_increase", "linear_decrease", "log_increase", "log_decrease"}),
        (PROMPT_SOURCES, {"tiny", "digits", "file", "hf"}),
        (FEATURE_NETS, {"efficientnet_lite0", "inception_v3"}),
        (REAL_IMAGES, {"digits_heldout"}),
        (PROMPT_JUDGES, {"digits_classifier"}),
        (MASK_METHODS, {"obs", "magnitude", "wanda", "dsnot"}),
        (UPDATES, {"obs", "admm", "none"}),
        (STRUCTURED_METHODS, {"obs", "l1"}),
        (DSNOT_INITS, {"wanda", "magnitude"}),
    ]
    for reg, names in expected:
        assert names <= set(reg.names()), reg
        for name in reg:
            entry = reg.get(name)
            assert entry is not None and not isinstance(entry, str), (reg, name)
    assert PROMPT_JUDGES.get("digits_classifier").description.startswith("digits classifier")

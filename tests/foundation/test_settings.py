from pathlib import Path

import yaml
import pytest

from modules.settings import Settings, SettingSpec, SettingsSection


def test_missing_file_means_defaults(tmp_path):
    s = Settings(tmp_path / "settings.yaml")
    s.load()
    assert s.get("memory.reserve_mb") == 1024 and s.load_error is None


def test_round_trip(tmp_path):
    path = tmp_path / "settings.yaml"
    s = Settings(path)
    s.set("memory.reserve_mb", 2048)
    s.set("ui.theme", "dark")
    s.save()
    t = Settings(path)
    t.load()
    assert t.get("memory.reserve_mb") == 2048 and t.get("ui.theme") == "dark"
    assert yaml.safe_load(path.read_text())["memory.reserve_mb"] == 2048


def test_broken_file_kept_as_bak_and_defaults_used(tmp_path):
    path = tmp_path / "settings.yaml"
    path.write_text("memory.reserve_mb: [unclosed\n")
    s = Settings(path)
    s.load()
    assert s.get("memory.reserve_mb") == 1024
    assert s.load_error and "settings.yaml.bak" in s.load_error
    assert (tmp_path / "settings.yaml.bak").read_text() == "memory.reserve_mb: [unclosed\n"
    assert path.read_text() == "memory.reserve_mb: [unclosed\n"  # not overwritten until the user saves


def test_invalid_values_are_rejected_with_names(tmp_path):
    s = Settings(tmp_path / "s.yaml")
    with pytest.raises(ValueError, match="memory.reserve_mb"):
        s.set("memory.reserve_mb", -5)
    with pytest.raises(ValueError, match="ui.theme"):
        s.set("ui.theme", "purple")
    with pytest.raises(KeyError):
        s.set("no.such", 1)
    with pytest.raises(ValueError) as exc:
        s.update({"memory.reserve_mb": "x", "ui.theme": "dark"})
    assert s.get("ui.theme") == "auto", "a failed update changes nothing"
    assert "memory.reserve_mb" in str(exc.value)


def test_bad_value_in_file_falls_back_to_default(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("memory.reserve_mb: lots\nui.theme: dark\n")
    s = Settings(path)
    s.load()
    assert s.get("memory.reserve_mb") == 1024 and s.get("ui.theme") == "dark"
    assert any("memory.reserve_mb" in e for e in s.value_errors)


def test_extension_section_values_survive_until_declared(tmp_path):
    path = tmp_path / "s.yaml"
    path.write_text("example.ignore_case: false\n")
    s = Settings(path)
    s.load()
    s.save()  # saving before the extension declared its section keeps the value
    assert "example.ignore_case" in yaml.safe_load(path.read_text())
    s.add_section(SettingsSection("example", "Example", [SettingSpec("example.ignore_case", True, "x", bool)]))
    assert s.get("example.ignore_case") is False


def test_invalid_value_in_file_is_reported_and_kept_in_bak(tmp_path):
    """A wrong type or an out-of-range value inside a valid file is neither dropped silently nor lost on save."""
    path = tmp_path / "settings.yaml"
    original = "memory.reserve_mb: -5\nui.theme: dark\nmemory.max_loaded_models: many\n"
    path.write_text(original)
    s = Settings(path)
    s.load()
    assert s.get("memory.reserve_mb") == 1024 and s.get("ui.theme") == "dark"
    assert s.load_error and "memory.reserve_mb" in s.load_error and "memory.max_loaded_models" in s.load_error
    assert "settings.yaml.bak" in s.load_error
    assert (tmp_path / "settings.yaml.bak").read_text() == original
    s.save()  # the user saves: the file now holds valid values, the old ones stay in the backup
    assert (tmp_path / "settings.yaml.bak").read_text() == original


def test_an_older_backup_is_never_overwritten(tmp_path):
    path = tmp_path / "settings.yaml"
    (tmp_path / "settings.yaml.bak").write_text("older: 1\n")
    path.write_text("memory.reserve_mb: -5\n")
    s = Settings(path)
    s.load()
    assert (tmp_path / "settings.yaml.bak").read_text() == "older: 1\n"
    assert (tmp_path / "settings.yaml.bak2").read_text() == "memory.reserve_mb: -5\n"
    assert "settings.yaml.bak2" in s.load_error


def test_types_are_strict(tmp_path):
    s = Settings(tmp_path / "s.yaml")
    for key, value in (("memory.reserve_mb", True), ("memory.reserve_mb", "512"), ("memory.reserve_mb", 1.5),
                       ("ui.theme", 3), ("ui.send_seed", "yes"), ("ui.theme", "\ud800")):
        with pytest.raises(ValueError, match=key.replace(".", r"\.")):
            s.set(key, value)
    s.set("memory.reserve_mb", 512.0)  # what a number input sends
    assert s.get("memory.reserve_mb") == 512 and isinstance(s.get("memory.reserve_mb"), int)


def test_ranges_come_from_the_spec_and_match_the_sampler():
    """One definition of each range: the UI's slider arguments are the spec's, and the sampler accepts both ends
    (the Chat slider for repetition penalty was 1..2 while the API took 0.05)."""
    from modules.llm.capability import settings_section
    from modules.llm.sampling import SamplingParams
    from modules.settings import number_range
    from modules.ui.core_tabs import setting_component
    s = Settings(Path("unused.yaml"), sections=[settings_section()])
    names = {"llm.temperature": "temperature", "llm.top_p": "top_p", "llm.top_k": "top_k", "llm.min_p": "min_p",
             "llm.repetition_penalty": "repetition_penalty", "llm.presence_penalty": "presence_penalty",
             "llm.frequency_penalty": "frequency_penalty", "llm.max_new_tokens": "max_new_tokens"}
    for key, field_name in names.items():
        spec = s.spec(key)
        limits = number_range(spec)
        assert {"minimum", "maximum", "step"} <= set(limits), key
        for end in (limits["minimum"], limits["maximum"]):
            SamplingParams(**{field_name: end}).validate()  # the sampler takes every value the spec allows
            kind, kwargs = setting_component(spec, end)
            assert kind == "Slider" and kwargs["minimum"] == spec.minimum and kwargs["maximum"] == spec.maximum
            assert kwargs["step"] == spec.step
    assert number_range(s.spec("llm.repetition_penalty"))["minimum"] < 1  # 0.9 is a valid penalty: the UI takes it
    assert setting_component(s.spec("llm.system_prompt"), "x")[0] == "Textbox"

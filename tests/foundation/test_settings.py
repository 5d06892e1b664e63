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

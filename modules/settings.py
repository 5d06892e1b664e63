"""Typed user settings, stored as YAML in the data dir.

Settings are declared as :class:`SettingSpec` entries grouped in sections; the
core, each capability and each extension add their own sections. Values are
validated on load and on every ``set``. A file that cannot be parsed is moved to
``settings.yaml.bak`` (never silently overwritten) and defaults are used; the
problem is kept in ``Settings.load_error`` so the UI can show it.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SettingSpec:
    key: str
    default: Any
    label: str
    #: one of bool, int, float, str, list
    type: type = str
    choices: tuple | Callable[[], list] | None = None
    minimum: float | None = None
    maximum: float | None = None
    help: str = ""

    def validate(self, value: Any) -> Any:
        """Return *value* coerced to this setting's type, or raise ValueError naming the setting."""
        t = self.type
        try:
            if t is bool:
                if isinstance(value, str):
                    if value.lower() in ("true", "1", "yes", "on"):
                        value = True
                    elif value.lower() in ("false", "0", "no", "off"):
                        value = False
                if not isinstance(value, bool):
                    raise TypeError
            elif t is int:
                if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                    raise TypeError
                value = int(value)
            elif t is float:
                if isinstance(value, bool):
                    raise TypeError
                value = float(value)
            elif t is str:
                if value is None:
                    value = ""
                if not isinstance(value, (str, int, float)):
                    raise TypeError
                value = str(value)
            elif t is list:
                if not isinstance(value, (list, tuple)):
                    raise TypeError
                value = list(value)
        except (TypeError, ValueError):
            raise ValueError(f"setting {self.key!r}: expected {t.__name__}, got {value!r}") from None
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"setting {self.key!r}: {value} is below the minimum {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"setting {self.key!r}: {value} is above the maximum {self.maximum}")
        choices = self.choices() if callable(self.choices) else self.choices
        if choices and t is not list and value not in choices and value != self.default:
            raise ValueError(f"setting {self.key!r}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value


@dataclass
class SettingsSection:
    id: str
    label: str
    specs: list[SettingSpec] = field(default_factory=list)


def core_sections() -> list[SettingsSection]:
    """Settings the foundation itself owns."""
    return [
        SettingsSection("ui", "User interface", [
            SettingSpec("ui.show_progress_every_n_steps", 5, "Live preview every N sampling steps (0 = off)", int, minimum=0),
            SettingSpec("ui.theme", "auto", "Theme", str, choices=("auto", "light", "dark")),
        ]),
        SettingsSection("memory", "Memory", [
            SettingSpec("memory.reserve_mb", 1024, "Memory kept free for the system (MB)", int, minimum=0),
            SettingSpec("memory.max_loaded_models", 4, "Most models kept in memory at once", int, minimum=1),
        ]),
        SettingsSection("extensions", "Extensions", [
            SettingSpec("extensions.disabled", [], "Disabled extensions", list),
        ]),
    ]


class Settings:
    """Thread-safe settings store backed by one YAML file."""

    def __init__(self, path: Path, sections: list[SettingsSection] | None = None):
        self.path = Path(path)
        self._lock = threading.RLock()
        self._sections: dict[str, SettingsSection] = {}
        self._specs: dict[str, SettingSpec] = {}
        self._values: dict[str, Any] = {}
        #: raw values from the file for keys no section has declared yet (extensions load later)
        self._pending: dict[str, Any] = {}
        self.load_error: str | None = None
        self.value_errors: list[str] = []
        self._listeners: list[Callable[[str, Any], None]] = []
        for section in sections or core_sections():
            self.add_section(section)

    # -- declaration ----------------------------------------------------------
    def add_section(self, section: SettingsSection) -> None:
        with self._lock:
            existing = self._sections.get(section.id)
            if existing is None:
                self._sections[section.id] = section
            else:
                existing.specs.extend(s for s in section.specs if s.key not in self._specs)
            for spec in section.specs:
                if spec.key in self._specs:
                    continue
                self._specs[spec.key] = spec
                if spec.key in self._pending:
                    self._apply_loaded(spec, self._pending.pop(spec.key))

    @property
    def sections(self) -> list[SettingsSection]:
        return list(self._sections.values())

    def spec(self, key: str) -> SettingSpec:
        try:
            return self._specs[key]
        except KeyError:
            raise KeyError(f"unknown setting {key!r}") from None

    # -- values ---------------------------------------------------------------
    def get(self, key: str) -> Any:
        with self._lock:
            spec = self.spec(key)
            return self._values.get(key, spec.default)

    def set(self, key: str, value: Any) -> None:
        with self._lock:
            value = self.spec(key).validate(value)
            old = self.get(key)
            self._values[key] = value
        if old != value:
            for listener in list(self._listeners):
                listener(key, value)

    def update(self, values: dict[str, Any]) -> None:
        """Validate all values first, then apply them; one bad value changes nothing."""
        errors, clean = [], {}
        for key, value in values.items():
            try:
                clean[key] = self.spec(key).validate(value)
            except (KeyError, ValueError) as exc:
                errors.append(str(exc).strip('"'))
        if errors:
            raise ValueError("; ".join(errors))
        for key, value in clean.items():
            self.set(key, value)

    def as_dict(self) -> dict[str, Any]:
        with self._lock:
            return {key: self.get(key) for key in self._specs}

    def on_change(self, listener: Callable[[str, Any], None]) -> None:
        self._listeners.append(listener)

    # -- persistence ----------------------------------------------------------
    def load(self) -> None:
        """Read the file. Missing: defaults. Broken: keep it as ``.bak``, use defaults, record the error."""
        self.load_error = None
        self.value_errors = []
        if not self.path.exists():
            return
        try:
            raw = yaml.safe_load(self.path.read_text(encoding="utf-8")) or {}
            if not isinstance(raw, dict):
                raise ValueError(f"expected a mapping of setting: value, got {type(raw).__name__}")
        except (yaml.YAMLError, ValueError, UnicodeDecodeError) as exc:
            backup = self.path.with_name(self.path.name + ".bak")
            shutil.copy2(self.path, backup)
            self.load_error = (f"Settings file {self.path} could not be read ({exc}). It was kept as {backup}; "
                               "defaults are in use until you save.")
            log.error(self.load_error)
            return
        with self._lock:
            for key, value in raw.items():
                spec = self._specs.get(key)
                if spec is None:
                    self._pending[key] = value
                else:
                    self._apply_loaded(spec, value)
        if self.value_errors:
            log.warning("settings: %s", "; ".join(self.value_errors))

    def _apply_loaded(self, spec: SettingSpec, value: Any) -> None:
        try:
            self._values[spec.key] = spec.validate(value)
        except ValueError as exc:
            self.value_errors.append(f"{exc} (default {spec.default!r} used)")

    def save(self) -> None:
        """Write atomically; values of settings not declared this run are kept."""
        with self._lock:
            data = {**self._pending, **{k: v for k, v in self._values.items()}}
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(prefix=".settings-", suffix=".yaml", dir=self.path.parent)
            try:
                with os.fdopen(fd, "w", encoding="utf-8") as fh:
                    yaml.safe_dump(data, fh, sort_keys=True, allow_unicode=True)
                os.replace(tmp, self.path)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
            self.load_error = None

"""Typed user settings, stored as YAML in the data dir.

Settings are declared as :class:`SettingSpec` entries grouped in sections; the
core, each capability and each extension add their own sections. A spec is the one
place a setting's type, range, step and choices are defined: the API validates with it
and the UI builds its components from it (:func:`number_range`), so the two cannot
disagree. Values are validated on load and on every ``set``. A file that cannot be
parsed, or that holds a value its spec rejects, is copied to ``settings.yaml.bak``
(never silently overwritten or dropped) and defaults are used for what was wrong; the
problem is kept in ``Settings.load_error`` so the UI can show it as a banner.
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


class SettingTypeError(ValueError):
    """A value of the wrong type (a string for a number, a number for a name): the API answers 422."""


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
    #: the UI's increment for numbers (sliders and number boxes); None: 1 for int, the UI's own for float
    step: float | None = None
    #: a further check that needs more than a type and a range (e.g. "names an existing checkpoint"):
    #: called with the typed value, returns the value to store or raises ValueError saying what is valid
    check: Callable[[Any], Any] | None = field(default=None, compare=False, repr=False)

    def validate(self, value: Any) -> Any:
        """Return *value* as this setting's type, or raise ValueError naming the setting.

        Types are strict, as in a typed API: a boolean is not a number, a number is not a string and a
        string is not a number; an integral float (``5.0``, what number inputs send) is an int."""
        t = self.type
        ok = True
        if t is bool:
            ok = isinstance(value, bool)
        elif t is int:
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            ok = isinstance(value, int) and not isinstance(value, bool)
        elif t is float:
            ok = isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
            if ok:
                value = float(value)
        elif t is str:
            if value is None:
                value = ""
            ok = isinstance(value, str)
        elif t is list:
            ok = isinstance(value, (list, tuple))
            if ok:
                value = list(value)
        if not ok:
            raise SettingTypeError(f"setting {self.key!r}: expected {_type_name(t)}, got {value!r}")
        if t is str and any(0xD800 <= ord(c) <= 0xDFFF for c in value):
            raise SettingTypeError(f"setting {self.key!r}: the text holds a lone UTF-16 surrogate; send valid Unicode")
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"setting {self.key!r}: {value} is below the minimum {self.minimum}")
        if self.maximum is not None and value > self.maximum:
            raise ValueError(f"setting {self.key!r}: {value} is above the maximum {self.maximum}")
        choices = self.choices() if callable(self.choices) else self.choices
        if choices and t is not list and value not in choices and value != self.default:
            raise ValueError(f"setting {self.key!r}: {value!r} is not one of {', '.join(map(str, choices))}")
        if self.check is not None:
            try:
                value = self.check(value)
            except ValueError as exc:
                raise ValueError(f"setting {self.key!r}: {exc}") from None
        return value


def _type_name(t: type) -> str:
    return {bool: "true or false", int: "an integer", float: "a number", str: "a string",
            list: "a list"}.get(t, t.__name__)


def number_range(spec: SettingSpec) -> dict[str, Any]:
    """``minimum``/``maximum``/``step`` of a number setting, as keyword arguments for a UI slider or number box,
    so a UI component accepts exactly what the setting (and the API) accepts."""
    if spec.type not in (int, float):
        raise TypeError(f"setting {spec.key!r} is a {spec.type.__name__}, not a number")
    step = spec.step if spec.step is not None else (1 if spec.type is int else None)
    return {k: v for k, v in (("minimum", spec.minimum), ("maximum", spec.maximum), ("step", step))
            if v is not None}


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
            SettingSpec("ui.send_seed", True, "PNG Info \"Send to\" also sends the seed", bool),
            SettingSpec("ui.send_size", True, "PNG Info \"Send to\" also sends width and height", bool),
        ]),
        SettingsSection("memory", "Memory", [
            SettingSpec("memory.reserve_mb", 1024, "Memory kept free for the system (MB)", int, minimum=0),
            SettingSpec("memory.max_loaded_models", 4, "Most models kept in memory at once", int, minimum=1),
        ]),
        SettingsSection("api", "API", [
            SettingSpec("api.max_prompt_chars", 100_000, "Longest prompt the APIs accept (characters; SD prompts "
                        "and the total of an LLM request's messages)", int, minimum=1, maximum=10_000_000),
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
        self._backup_path: Path | None = None
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
        """Read the file. Missing: defaults. Unreadable, or a value its spec rejects: the file is copied to
        ``.bak`` (the user's values are never lost), defaults are used for what was wrong, and the problem is
        logged and kept in ``load_error`` for the UI banner."""
        self.load_error = None
        self.value_errors = []
        self._backup_path = None
        if not self.path.exists():
            return
        try:
            raw = yaml.safe_load(self.path.read_text(encoding="utf-8")) or {}
            if not isinstance(raw, dict):
                raise ValueError(f"expected a mapping of setting: value, got {type(raw).__name__}")
        except (yaml.YAMLError, ValueError, UnicodeDecodeError) as exc:
            backup = self._backup()
            self.load_error = (f"Settings file {self.path} could not be read ({exc}). It was kept as {backup}; "
                               "defaults are in use until you save.")
            log.error(self.load_error)
            return
        with self._lock:
            for key, value in raw.items():
                spec = self._specs.get(str(key))
                if spec is None:
                    self._pending[str(key)] = value
                else:
                    self._apply_loaded(spec, value)

    def _apply_loaded(self, spec: SettingSpec, value: Any) -> None:
        try:
            self._values[spec.key] = spec.validate(value)
        except ValueError as exc:
            self.value_errors.append(f"{exc} (default {spec.default!r} used)")
            backup = self._backup_path or self._backup()
            self.load_error = (f"Settings file {self.path} has invalid values: {'; '.join(self.value_errors)}. "
                               f"The file as it was is kept as {backup}; fix the values in the Settings tab "
                               "(or in the file) and save.")
            log.error(self.load_error)

    def _backup(self) -> Path:
        """Copy the settings file to ``settings.yaml.bak`` (or ``.bak2``, ... when an older, different backup
        exists, so no earlier copy is overwritten) and return the copy's path."""
        data = self.path.read_bytes()
        n = 1
        while True:
            backup = self.path.with_name(self.path.name + (".bak" if n == 1 else f".bak{n}"))
            if not backup.exists() or backup.read_bytes() == data:
                break
            n += 1
        shutil.copy2(self.path, backup)
        self._backup_path = backup
        return backup

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

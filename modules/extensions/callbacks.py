"""Named, keyword-argument callbacks for extensions and capabilities, and the one error policy for hooks.

``Callbacks.hook_failed`` is what happens whenever extension code raises - a callback, a script hook,
``setup()``, a tab's build, a script file's import: the log names the extension and the hook, the
error is recorded on the extension's error list (shown on the Extensions tab and in diagnostics), and
under test (``raise_errors=True``) it is re-raised so bugs fail loudly. Otherwise the app goes on and
the other handlers still run.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from typing import Any, Callable

log = logging.getLogger(__name__)

#: Every callback name and the keyword arguments it is called with.
CALLBACKS: dict[str, tuple[str, ...]] = {
    "on_app_started": ("app", "ctx"),
    "on_ui_tabs": ("ctx",),  # returns a list of (gradio Blocks-building function, label, id) or TabSpec
    "on_ui_settings": ("ctx",),  # returns a list of SettingsSection
    "on_model_loaded": ("key", "model", "ctx"),
    "on_before_image_saved": ("image", "path", "infotext", "ctx"),
    "on_image_saved": ("image", "path", "infotext", "ctx"),
    "on_chat_message": ("role", "content", "chat_id", "model", "ctx"),
}


@dataclass
class CallbackError:
    owner: str
    callback: str
    message: str


class Callbacks:
    def __init__(self, raise_errors: bool = False):
        self.raise_errors = raise_errors
        self._handlers: dict[str, list[tuple[str, Callable[..., Any]]]] = {name: [] for name in CALLBACKS}
        self.errors: list[CallbackError] = []
        self._lock = threading.Lock()
        self._error_list_for: Callable[[str], list[str] | None] = lambda owner: None

    def bind_extensions(self, error_list_for: Callable[[str], list[str] | None]) -> None:
        """Tell the policy where an extension's error list is: *error_list_for(owner)*, None if no such one."""
        self._error_list_for = error_list_for

    def add(self, name: str, fn: Callable[..., Any], owner: str = "atelier") -> None:
        if name not in CALLBACKS:
            raise ValueError(f"unknown callback {name!r}; known callbacks: {', '.join(CALLBACKS)}")
        with self._lock:
            self._handlers[name].append((owner, fn))

    def handlers(self, name: str) -> list[tuple[str, Callable[..., Any]]]:
        """(owner, function) pairs registered for *name*, for callers that handle return values themselves."""
        return list(self._handlers[name])

    def fire(self, name: str, **kwargs: Any) -> list[Any]:
        """Call every handler of *name* with *kwargs*; return the results of those that succeeded."""
        if name not in CALLBACKS:
            raise ValueError(f"unknown callback {name!r}")
        results = []
        for owner, fn in list(self._handlers[name]):
            try:
                results.append(fn(**kwargs))
            except Exception as exc:  # noqa: BLE001 - an extension must not take the app down
                self.hook_failed(owner, name, exc)
        return results

    def hook_failed(self, owner: str, hook: str, exc: BaseException) -> None:
        """The error policy for extension code: log it (extension + hook), record it on the extension's error
        list and in ``errors``, and re-raise it when ``raise_errors`` (tests). A hook that keeps failing the
        same way is recorded once (the log still shows every time)."""
        message = f"{type(exc).__name__}: {exc}"
        log.error("extension %s: %s raised %s", owner, hook, message, exc_info=exc)
        entry = f"{hook}: {message}"
        with self._lock:
            record = CallbackError(owner, hook, message)
            if record not in self.errors:
                self.errors.append(record)
            error_list = self._error_list_for(owner)
            if error_list is not None and entry not in error_list:
                error_list.append(entry)
        if self.raise_errors:
            raise exc

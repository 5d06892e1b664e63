"""Named, keyword-argument callbacks for extensions and capabilities.

A callback that raises is reported (extension and callback name) on the
Extensions tab and in the log, and the others still run. Under test,
``raise_errors=True`` re-raises so bugs fail loudly.
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
                self.report(owner, name, exc)
                if self.raise_errors:
                    raise
        return results

    def report(self, owner: str, callback: str, exc: BaseException) -> None:
        message = f"{type(exc).__name__}: {exc}"
        log.error("extension %s: callback %s raised %s", owner, callback, message, exc_info=exc)
        with self._lock:
            self.errors.append(CallbackError(owner, callback, message))

    def errors_for(self, owner: str) -> list[CallbackError]:
        return [e for e in self.errors if e.owner == owner]

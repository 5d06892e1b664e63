"""The Script API: UI scripts for txt2img / img2img, used by built-in scripts and extensions alike.

Unlike A1111, a script's widget values reach it as keyword arguments keyed by the
names its ``ui()`` returned, never as a positional slice of one global list, so
adding an extension cannot shift another script's arguments, and API callers
send ``{"script_args": {"name": value}}``.
"""
from __future__ import annotations

import importlib.util
import inspect
import sys
from pathlib import Path
from typing import Any



class AlwaysVisible:
    """Return this from ``show()`` for a script that always runs (an accordion, not a dropdown entry)."""


class Script:
    """Base class. Override what you need; every hook gets ``p`` (the job's parameters) and the script's
    own UI values as keyword arguments."""

    #: set by the loader: which extension (or "builtin") this script came from
    owner: str = "builtin"
    filename: str = ""

    def title(self) -> str:
        raise TypeError(f"{type(self).__name__} must define title()")

    def show(self, tab: str) -> bool | type[AlwaysVisible]:
        """*tab* is "txt2img" or "img2img". True: offer in the Script dropdown; AlwaysVisible: always run."""
        return True

    def ui(self, tab: str) -> dict[str, Any]:
        """Create Gradio components (inside the script's area) and return them by name."""
        return {}

    # -- hooks (AlwaysVisible scripts) ---------------------------------------------------
    def before_process(self, p: Any, **kwargs: Any) -> None:
        """Before anything is computed; may change ``p``."""

    def process(self, p: Any, **kwargs: Any) -> None:
        """After prompts are parsed, before sampling."""

    def postprocess_image(self, p: Any, image: Any, **kwargs: Any) -> Any:
        """Each finished image; return a replacement image or None to keep it."""
        return None

    def postprocess(self, p: Any, processed: Any, **kwargs: Any) -> None:
        """After all images are done."""

    # -- selectable scripts ----------------------------------------------------------------
    def run(self, p: Any, **kwargs: Any) -> Any:
        """Replace the normal generation (e.g. X/Y/Z plot). Return the processed result."""
        raise TypeError(f"script {self.title()!r} is not selectable: it has no run()")


class ScriptRunner:
    """Loads ``scripts/*.py`` files from the repository and from extensions."""

    def __init__(self, report_error=None):
        """*report_error(owner, hook, exc)* is the app's hook error policy (``Callbacks.hook_failed``); without
        one (a runner on its own) a failing script hook raises."""
        self.scripts: list[Script] = []
        self.load_errors: list[tuple[str, str, str]] = []  # (owner, file, message)
        self._report = report_error or _raise

    def load_dir(self, folder: Path, owner: str = "builtin") -> None:
        if not folder.is_dir():
            return
        for path in sorted(folder.glob("*.py")):
            self.load_file(path, owner)

    def load_file(self, path: Path, owner: str = "builtin") -> None:
        module_name = f"atelier_script_{owner}_{path.stem}".replace("-", "_").replace(".", "_")
        try:
            spec = importlib.util.spec_from_file_location(module_name, path)
            module = importlib.util.module_from_spec(spec)
            sys.modules[module_name] = module
            spec.loader.exec_module(module)
        except Exception as exc:  # noqa: BLE001 - a broken script is reported, the app goes on
            self._load_failed(owner, path, exc)
            return
        self.load_module(module, owner, path)

    def load_module(self, module: Any, owner: str, path: Path) -> None:
        """Instantiate every Script subclass defined in *module*."""
        for obj in list(vars(module).values()):
            if inspect.isclass(obj) and issubclass(obj, Script) and obj is not Script \
                    and obj.__module__ == module.__name__:
                try:
                    script = obj()
                    script.title()
                except Exception as exc:  # noqa: BLE001
                    self._load_failed(owner, path, exc)
                    continue
                script.owner, script.filename = owner, str(path)
                self.scripts.append(script)

    def _load_failed(self, owner: str, path: Path, exc: BaseException) -> None:
        self.load_errors.append((owner, str(path), f"{Path(path).name}: {type(exc).__name__}: {exc}"))
        self._report(owner, f"loading script {Path(path).name}", exc)

    def alwayson(self, tab: str) -> list[Script]:
        return [s for s in self.scripts if self._safe_show(s, tab) is AlwaysVisible]

    def selectable(self, tab: str) -> list[Script]:
        return [s for s in self.scripts if self._safe_show(s, tab) is True]

    def by_title(self, title: str, tab: str) -> Script:
        for script in self.selectable(tab) + self.alwayson(tab):
            if script.title().lower() == title.lower():
                return script
        names = ", ".join(s.title() for s in self.selectable(tab)) or "none"
        raise ValueError(f"no script titled {title!r} for {tab}; available: {names}")

    def call(self, hook: str, tab: str, p: Any, args: dict[str, dict[str, Any]], *extra: Any) -> list[Any]:
        """Run *hook* on every AlwaysVisible script with its own keyword values from *args* (title -> values)."""
        results = []
        for script in self.alwayson(tab):
            kwargs = args.get(script.title(), {})
            try:
                results.append(getattr(script, hook)(p, *extra, **kwargs))
            except Exception as exc:  # noqa: BLE001
                self._report(script.owner, f"script {script.title()!r} {hook}", exc)
        return results

    def _safe_show(self, script: Script, tab: str):
        try:
            return script.show(tab)
        except Exception as exc:  # noqa: BLE001
            self._report(script.owner, f"script {type(script).__name__} show", exc)
            return False


def _raise(owner: str, hook: str, exc: BaseException) -> None:
    raise exc

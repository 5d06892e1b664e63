"""The Script API: UI scripts for txt2img / img2img, used by built-in scripts and extensions alike.

Unlike A1111, a script's widget values reach it as keyword arguments keyed by the
names its ``ui()`` returned, never as a positional slice of one global list, so
adding an extension cannot shift another script's arguments, and API callers
send ``{"script_args": {"name": value}}``.

For A1111 clients that send a positional list (``"script_args": [...]``), a script may declare the
order of its values in ``args``; the list is then mapped onto those names (a shorter list leaves the
rest at run()'s defaults, as A1111's UI defaults would) and checked against the types of run()'s
defaults. A script without ``args`` takes names only, and the error says so.
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
    #: the order of this script's values for A1111-style positional ``script_args``; None: by name only
    args: tuple[str, ...] | None = None
    #: set by the loader: the app context (None when a script is loaded on its own, e.g. in a test)
    ctx: Any = None

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

    def __init__(self, report_error=None, context: Any = None):
        """*report_error(owner, hook, exc)* is the app's hook error policy (``Callbacks.hook_failed``); without
        one (a runner on its own) a failing script hook raises."""
        #: the AppContext handed to every script as ``script.ctx``
        self.context = context
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
                script.owner, script.filename, script.ctx = owner, str(path), self.context
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

    def named_args(self, script: Script, values: Any) -> dict[str, Any]:
        """*values* (a dict by name, or a positional list in the script's declared ``args`` order) as the
        keyword values its hooks receive; ValueError naming the script and the expected order otherwise."""
        if isinstance(values, dict):
            return values
        title = script.title()
        if not isinstance(values, (list, tuple)):
            raise ValueError(f"script_args for {title!r}: expected an object of values by name or a list, "
                             f"got {type(values).__name__}")
        order = list(script.args or ())
        if not order:
            if not values:
                return {}
            raise ValueError(f"script {title!r} takes its values by name ({{\"name\": value}}); it declares no "
                             "positional order for a script_args list")
        expected = ", ".join(order)
        if len(values) > len(order):
            raise ValueError(f"script {title!r} takes at most {len(order)} positional script_args in the order "
                             f"[{expected}]; got {len(values)}")
        defaults = script_arg_defaults(script)
        out = {}
        for index, (name, value) in enumerate(zip(order, values)):
            problem = _type_problem(defaults.get(name), value)
            if problem:
                raise ValueError(f"script {title!r}, script_args[{index}] ({name}): {problem}; the order is "
                                 f"[{expected}]")
            out[name] = value
        return out

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


def script_arg_defaults(script: Script) -> dict[str, Any]:
    """Each keyword parameter's default across the script's hooks (run() first): the declared types."""
    out: dict[str, Any] = {}
    for hook in ("run", "before_process", "process", "postprocess_image", "postprocess"):
        try:
            params = inspect.signature(getattr(script, hook)).parameters.values()
        except (TypeError, ValueError):
            continue
        for param in params:
            if param.default is not inspect.Parameter.empty and param.name not in out:
                out[param.name] = param.default
    return out


def _type_problem(default: Any, value: Any) -> str | None:
    """Why *value* does not fit a parameter whose default is *default* (None: it fits)."""
    if default is None:
        return None
    if isinstance(default, bool):
        return None if isinstance(value, bool) else f"expected true or false, got {value!r}"
    if isinstance(default, int):
        ok = (isinstance(value, int) or (isinstance(value, float) and value.is_integer())) \
            and not isinstance(value, bool)
        return None if ok else f"expected a whole number, got {value!r}"
    if isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        return None if ok else f"expected a number, got {value!r}"
    if isinstance(default, str):
        return None if isinstance(value, str) else f"expected text, got {value!r}"
    return None


def _raise(owner: str, hook: str, exc: BaseException) -> None:
    raise exc

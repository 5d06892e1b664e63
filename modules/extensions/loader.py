"""Find, order and load extensions from ``extensions/`` (repository) and ``DATA_DIR/extensions``.

An extension folder may contain:

* ``metadata.ini`` - ``[Extension]`` with ``Name``, ``Requires`` (comma-separated extension names) and
  ``Order`` (load order, lower first; default 100);
* ``install.py`` - run by ``launch.py`` before the app starts (skipped with ``--skip-install``);
* ``preload.py`` - ``preload(parser)`` adds command-line flags;
* ``scripts/*.py`` - Script classes (see ``modules.extensions.scripts``) and/or a ``setup(ext)`` function
  that registers callbacks: ``ext.on("on_ui_tabs", fn)``;
* ``javascript/*.js`` and ``style.css`` - injected into the page.

Nothing an extension does can stop the app: import errors and callback errors are recorded on the
extension and shown on the Extensions tab.
"""
from __future__ import annotations

import argparse
import configparser
import importlib.util
import logging
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

log = logging.getLogger(__name__)


@dataclass
class Extension:
    name: str
    path: Path
    source: str  # "builtin" (repository) or "user" (data dir)
    order: int = 100
    requires: list[str] = field(default_factory=list)
    enabled: bool = True
    loaded: bool = False
    errors: list[str] = field(default_factory=list)
    display_name: str = ""

    def files(self, pattern: str) -> list[Path]:
        return sorted(self.path.glob(pattern))

    @property
    def state(self) -> str:
        if not self.enabled:
            return "disabled"
        if self.errors:
            return "error"
        return "loaded" if self.loaded else "enabled"

    def describe(self) -> dict:
        return {"name": self.name, "display_name": self.display_name or self.name, "path": str(self.path),
                "source": self.source, "enabled": self.enabled, "state": self.state, "errors": list(self.errors),
                "order": self.order, "requires": self.requires}


class ExtensionAPI:
    """What an extension's ``setup(ext)`` receives: its identity, the app context and callback registration."""

    def __init__(self, extension: Extension, ctx: Any):
        self.extension = extension
        self.name = extension.name
        self.path = extension.path
        self.ctx = ctx

    def on(self, callback: str, fn: Callable[..., Any]) -> None:
        """Register *fn* for the named callback; it is called with keyword arguments only."""
        self.ctx.callbacks.add(callback, fn, owner=self.name)


def discover(dirs: Sequence[tuple[Path, str]], disabled: Sequence[str] = (), disable_all: bool = False) -> list[Extension]:
    """List extensions in *dirs* ((folder, source) pairs), ordered by metadata Order then name."""
    found: dict[str, Extension] = {}
    for folder, source in dirs:
        if not folder.is_dir():
            continue
        for path in sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith((".", "_"))):
            ext = Extension(name=path.name, path=path, source=source)
            _read_metadata(ext)
            ext.enabled = not disable_all and path.name not in disabled
            if path.name in found:
                ext.errors.append(f"an extension named {path.name!r} also exists in {found[path.name].path}; this one is ignored")
                ext.enabled = False
                continue
            found[path.name] = ext
    exts = sorted(found.values(), key=lambda e: (e.order, e.name))
    names = {e.name for e in exts if e.enabled}
    for ext in exts:
        missing = [r for r in ext.requires if r not in names]
        if ext.enabled and missing:
            ext.errors.append(f"requires extension(s) {', '.join(missing)}, which are not installed or enabled")
    return exts


def _read_metadata(ext: Extension) -> None:
    meta = ext.path / "metadata.ini"
    if not meta.is_file():
        return
    parser = configparser.ConfigParser()
    try:
        parser.read(meta, encoding="utf-8")
        section = parser["Extension"] if parser.has_section("Extension") else {}
        ext.display_name = section.get("Name", "").strip()
        ext.requires = [r.strip() for r in section.get("Requires", "").split(",") if r.strip()]
        ext.order = int(section.get("Order", "100"))
    except (configparser.Error, ValueError) as exc:
        ext.errors.append(f"metadata.ini: {exc}")


def _import_file(path: Path, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def run_preloads(parser: argparse.ArgumentParser, extension_dirs: Sequence[Path]) -> list[str]:
    """Call ``preload(parser)`` of every extension folder that has one. Returns problems."""
    problems = []
    for folder in extension_dirs:
        preload = folder / "preload.py"
        if not preload.is_file():
            continue
        try:
            module = _import_file(preload, f"atelier_preload_{folder.name}".replace("-", "_"))
            if hasattr(module, "preload"):
                module.preload(parser)
        except Exception as exc:  # noqa: BLE001 - a broken preload must not stop the app
            problems.append(f"extension {folder.name}: preload.py failed: {type(exc).__name__}: {exc}")
            log.exception("extension %s: preload.py failed", folder.name)
    return problems


def run_installers(extensions: Sequence[Extension], timeout: float = 600) -> list[str]:
    """Run ``install.py`` of each enabled extension in a subprocess (so a crash cannot take us down)."""
    problems = []
    for ext in extensions:
        script = ext.path / "install.py"
        if not ext.enabled or not script.is_file():
            continue
        log.info("extension %s: running install.py", ext.name)
        try:
            result = subprocess.run([sys.executable, str(script)], cwd=ext.path, capture_output=True, text=True,
                                    timeout=timeout)
        except subprocess.TimeoutExpired:
            problems.append(f"extension {ext.name}: install.py did not finish within {timeout:.0f}s")
            continue
        if result.returncode != 0:
            tail = (result.stderr or result.stdout).strip().splitlines()[-5:]
            problems.append(f"extension {ext.name}: install.py exited with {result.returncode}: {' | '.join(tail)}")
    for problem in problems:
        log.error(problem)
    return problems


@dataclass
class ExtensionSet:
    extensions: list[Extension]

    def get(self, name: str) -> Extension | None:
        return next((e for e in self.extensions if e.name == name), None)

    def error_list(self, name: str) -> list[str] | None:
        """The error list of extension *name* (where the hook error policy records), None if there is none."""
        ext = self.get(name)
        return ext.errors if ext is not None else None

    def enabled(self) -> list[Extension]:
        return [e for e in self.extensions if e.enabled]

    def css(self) -> str:
        parts = []
        for ext in self.loaded():
            css = ext.path / "style.css"
            if css.is_file():
                parts.append(f"/* {ext.name} */\n" + css.read_text(encoding="utf-8"))
        return "\n".join(parts)

    def javascript(self) -> str:
        parts = []
        for ext in self.loaded():
            for js in ext.files("javascript/*.js"):
                parts.append(f"// {ext.name}/{js.name}\n" + js.read_text(encoding="utf-8"))
        return "\n".join(parts)

    def loaded(self) -> list[Extension]:
        return [e for e in self.extensions if e.enabled and e.loaded]

    def describe(self) -> list[dict]:
        return [e.describe() for e in self.extensions]


def load_extensions(ctx: Any) -> ExtensionSet:
    """Discover extensions for *ctx*, load scripts of the enabled ones, and run their ``setup(ext)``."""
    dirs = [(ctx.paths.repo_extensions_dir, "builtin")]
    if ctx.paths.user_extensions_dir.resolve() != ctx.paths.repo_extensions_dir.resolve():
        dirs.append((ctx.paths.user_extensions_dir, "user"))
    exts = discover(dirs, ctx.settings.get("extensions.disabled"), ctx.opts.disable_all_extensions)
    ctx.extensions = ExtensionSet(exts)
    ctx.callbacks.bind_extensions(ctx.extensions.error_list)
    for ext in exts:
        if not ext.enabled or ext.errors:
            continue
        for script in ext.files("scripts/*.py"):
            module_name = f"atelier_ext_{ext.name}_{script.stem}".replace("-", "_").replace(".", "_")
            try:
                module = _import_file(script, module_name)
            except Exception as exc:  # noqa: BLE001 - the hook error policy records it; the app goes on
                ctx.callbacks.hook_failed(ext.name, f"importing scripts/{script.name}", exc)
                continue
            ctx.scripts.load_module(module, owner=ext.name, path=script)
            setup = getattr(module, "setup", None)
            if callable(setup):
                try:
                    setup(ExtensionAPI(ext, ctx))
                except Exception as exc:  # noqa: BLE001
                    ctx.callbacks.hook_failed(ext.name, f"setup() in scripts/{script.name}", exc)
        ext.loaded = not ext.errors
    return ctx.extensions


def install_from_git(ctx: Any, url: str, name: str | None = None) -> Path:
    """Clone an extension into the data dir's extensions folder. Refused while the server is exposed."""
    if not ctx.extension_changes_allowed:
        raise PermissionError("Installing extensions is disabled while the server is exposed (--listen or --share). "
                              "Restart without them, or add --enable-insecure-extension-access if you trust every user.")
    url = url.strip()
    if not url or url.startswith("-"):
        raise ValueError("give a git URL such as https://github.com/user/extension.git")
    name = name or Path(url.rstrip("/")).name.removesuffix(".git")
    if not name or name in (".", "..") or "/" in name or "\\" in name:
        raise ValueError(f"cannot derive a folder name from {url!r}; give one explicitly")
    target = ctx.paths.user_extensions_dir / name
    if target.exists() or (ctx.paths.repo_extensions_dir / name).exists():
        raise FileExistsError(f"an extension named {name!r} is already installed at {target}")
    target.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(["git", "clone", "--depth", "1", "--", url, str(target)], capture_output=True, text=True,
                            timeout=300)
    if result.returncode != 0:
        raise RuntimeError(f"git clone failed: {result.stderr.strip() or result.stdout.strip()}")
    log.info("installed extension %s from %s (restart to load it)", name, url)
    return target


def set_enabled(ctx: Any, name: str, enabled: bool) -> None:
    """Enable or disable an extension; saved in settings and applied on restart."""
    if not ctx.extension_changes_allowed:
        raise PermissionError("Changing extensions is disabled while the server is exposed (--listen or --share). "
                              "Restart without them, or add --enable-insecure-extension-access.")
    disabled = [n for n in ctx.settings.get("extensions.disabled") if n != name]
    if not enabled:
        disabled.append(name)
    ctx.settings.set("extensions.disabled", sorted(disabled))
    ctx.settings.save()

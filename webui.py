"""Build and serve the Atelier app. ``launch.py`` prepares the environment and then calls ``main``.

Order of start-up: parse flags (with extension flags) -> data dir and logging -> app context ->
built-in capabilities -> extensions (scripts, callbacks) -> core tabs -> extension tabs and settings ->
server. Models load lazily on first use, so start-up stays fast.
"""
from __future__ import annotations

import logging
import os
import sys

log = logging.getLogger("atelier")


def prepare(opts, *, raise_callback_errors: bool = False):
    """Everything up to (not including) serving; returns the app context. Used by tests too."""
    from modules.capabilities import register_builtin
    from modules.context import build_context
    from modules.extensions.loader import load_extensions
    from modules.logging_setup import setup_logging
    from modules.paths import DataDirError, Paths
    from modules.ui.core_tabs import register_core_tabs, register_extension_ui

    paths = Paths.from_options(opts.data_dir, opts.models_dir)
    try:
        paths.ensure()
    except DataDirError as exc:
        raise SystemExit(str(exc)) from None
    # Gradio keeps uploads and temporary files in its own cache: keep it inside the data dir.
    os.environ.setdefault("GRADIO_TEMP_DIR", str(paths.cache_dir / "gradio"))
    setup_logging(paths.logs_dir)
    for problem in getattr(opts, "preload_problems", []):
        log.error(problem)
    ctx = build_context(opts, raise_callback_errors=raise_callback_errors)
    if ctx.settings.load_error:
        log.error(ctx.settings.load_error)
    ctx.scripts.load_dir(paths.repo_scripts_dir, owner="builtin")
    for problem in register_builtin(ctx):
        log.error("capability failed: %s", problem)
    load_extensions(ctx)
    register_core_tabs(ctx)
    register_extension_ui(ctx)
    return ctx


def main(argv=None, opts=None) -> None:
    """Serve the app. ``launch.py`` passes the *opts* it already parsed (extension flags included), so
    extensions' ``preload.py`` files run once; run directly, ``webui.py`` parses *argv* itself."""
    if opts is None:
        from modules.cli import parse_args, preparse
        from modules.extensions.loader import discover
        from modules.paths import Paths

        pre = preparse(argv)
        pre_paths = Paths.from_options(pre.data_dir)
        ext_dirs = [] if pre.disable_all_extensions else [
            e.path for e in discover([(pre_paths.repo_extensions_dir, "builtin"),
                                      (pre_paths.user_extensions_dir, "user")])]
        opts = parse_args(argv, extension_dirs=ext_dirs)
    from modules.exposure import bind_host
    from modules.server import check_port, create_app, serve
    check_port(bind_host(opts), opts.port)  # fail fast, before any loading
    ctx = prepare(opts)
    app = create_app(ctx)
    serve(ctx, app)


if __name__ == "__main__":
    main(sys.argv[1:])

"""Extensions tab: installed extensions with their state and errors; enable/disable; install from git.

Changes are refused while the server is exposed (--listen/--share) unless
--enable-insecure-extension-access; they apply on restart.
"""
from __future__ import annotations

import gradio as gr

from modules.extensions import loader

HEADERS = ["Extension", "Source", "State", "Errors", "Path"]


def _rows(ctx):
    exts = ctx.extensions.describe() if ctx.extensions else []
    return [[e["display_name"], e["source"], e["state"], "; ".join(e["errors"]) or "", e["path"]] for e in exts]


def build(ctx) -> None:
    locked = not ctx.extension_changes_allowed
    if locked:
        gr.Markdown("Extension installs and changes are **locked** because the server is exposed "
                    "(`--listen` or `--share`). Restart without them, or with `--enable-insecure-extension-access`.",
                    elem_id="extensions_locked")
    # a callable value is re-read on every page load, so errors raised by hooks since start-up show too
    gr.Dataframe(value=lambda: _rows(ctx), headers=HEADERS, interactive=False, elem_id="extensions_table", wrap=True)
    names = [e.name for e in ctx.extensions.extensions] if ctx.extensions else []
    enabled = [e.name for e in ctx.extensions.extensions if e.enabled] if ctx.extensions else []
    with gr.Group():
        checks = gr.CheckboxGroup(choices=names, value=enabled, label="Enabled extensions (applied on restart)",
                                  interactive=not locked, elem_id="extensions_enabled")
        apply = gr.Button("Save and apply on restart", interactive=not locked, elem_id="extensions_apply")
    with gr.Group():
        url = gr.Textbox(label="Install from git URL", placeholder="https://github.com/user/extension.git",
                         interactive=not locked, elem_id="extensions_url")
        install = gr.Button("Install", interactive=not locked, elem_id="extensions_install")
    status = gr.Markdown(elem_id="extensions_status")

    def save(selected):
        try:
            for name in names:
                loader.set_enabled(ctx, name, name in (selected or []))
        except PermissionError as exc:
            return str(exc)
        return "Saved. Restart Atelier to apply."

    def do_install(address):
        try:
            path = loader.install_from_git(ctx, address)
        except (PermissionError, ValueError, FileExistsError, RuntimeError, OSError) as exc:
            return f"**Not installed:** {exc}"
        return f"Installed into `{path}`. Restart Atelier to load it."

    apply.click(save, inputs=checks, outputs=status)
    install.click(do_install, inputs=url, outputs=status)

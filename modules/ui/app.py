"""Assemble the Gradio Blocks: banners, then one tab per registered TabSpec, in order."""
from __future__ import annotations


import gradio as gr

from modules.exposure import exposure_warning
from modules.ui.state import UiState



def build_ui(ctx) -> gr.Blocks:
    ctx.ui = UiState()
    with gr.Blocks(title="Atelier", analytics_enabled=False) as blocks:
        warning = exposure_warning(ctx)
        if warning:
            gr.Markdown(warning, elem_classes=["atelier-banner"], elem_id="exposure-banner")
        if ctx.settings.load_error:
            gr.Markdown(ctx.settings.load_error, elem_classes=["atelier-banner"], elem_id="settings-banner")
        with gr.Tabs(elem_id="tabs"):
            for spec in ctx.tabs.ordered():
                with gr.Tab(spec.label, id=spec.id, elem_id=f"tab_{spec.id}") as tab:
                    try:
                        spec.build(ctx)
                    except Exception as exc:  # noqa: BLE001 - a broken tab is hidden and reported, not fatal
                        tab.visible = False
                        ctx.callbacks.hook_failed(spec.owner, f"building tab {spec.label!r}", exc)
    return blocks

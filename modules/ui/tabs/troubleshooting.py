"""Troubleshooting tab: the diagnostics report, refreshable, with a copy button."""
from __future__ import annotations

import gradio as gr

from modules import diagnostics


def build(ctx) -> None:
    gr.Markdown("Paste this report into a bug report. It contains no credentials.")
    report = gr.Code(value=lambda: diagnostics.render(diagnostics.collect(ctx)), language=None, lines=30,
                     label="System report", elem_id="diagnostics_report", buttons=["copy"])
    with gr.Row():
        refresh = gr.Button("Refresh", elem_id="diagnostics_refresh")
        copy = gr.Button("Copy report", elem_id="diagnostics_copy")
    refresh.click(lambda: diagnostics.render(diagnostics.collect(ctx)), outputs=report)
    copy.click(None, inputs=report, js="(text) => { navigator.clipboard.writeText(text); return []; }")

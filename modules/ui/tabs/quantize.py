"""The Quantize tab: Gradio widgets wired by name to :class:`~modules.quantize.controller.QuantizeController`.

Nothing here decides anything. Run queues the report on the device queue; a ``gr.Timer`` polls the
controller every 2 s while it runs (page load does it once, so a reload mid-run shows it again); "Load in
Chat" loads the chosen row's model, selects it in the Chat tab's model list and switches to the Chat tab.
"""
from __future__ import annotations

from typing import Any

import gradio as gr
import pandas as pd

from modules.quantize.controller import QuantizeController, QuantizeTabError, QuantizeView

POLL_SECONDS = 2.0
SWITCH_TO_CHAT_JS = """() => {
  const tabs = [...document.querySelectorAll('#tabs button[role="tab"], #tabs .tab-nav button')];
  const target = tabs.find(b => b.textContent.trim() === 'Chat');
  if (target) target.click();
}"""


def _build_widgets(controller: QuantizeController) -> dict[str, Any]:
    w: dict[str, Any] = {}
    gr.Markdown("Quantize a model of models/LLM into GGUF types (written by Atelier, quantized by llama.cpp) and "
                "Atelier's own int8 / int4 weights; each format is written into models/LLM and measured against "
                "the unquantized model. The work runs on the device queue, after replies and trainings ahead of it.",
                elem_id="quantize_intro")
    with gr.Row():
        sources = controller.source_choices()
        w["source"] = gr.Dropdown(sources, value=sources[0] if sources else None, label="Model (models/LLM)",
                                  elem_id="quantize_source", scale=3)
        w["refresh"] = gr.Button("Refresh", elem_id="quantize_refresh", scale=0, min_width=80)
    w["formats"] = gr.CheckboxGroup(controller.format_choices(), value=controller.default_formats(),
                                    label="Target formats", elem_id="quantize_formats")
    w["overwrite"] = gr.Checkbox(False, label="Replace files that exist already (otherwise they are measured as they are)",
                                 elem_id="quantize_overwrite")
    with gr.Row():
        w["run"] = gr.Button("Quantize and measure", variant="primary", elem_id="quantize_run")
        w["stop"] = gr.Button("Stop", variant="stop", elem_id="quantize_stop")
    w["message"] = gr.Markdown(elem_id="quantize_message")
    w["progress"] = gr.HTML(elem_id="quantize_progress")
    w["table"] = gr.Dataframe(pd.DataFrame(columns=controller.columns()), label="Report", interactive=False,
                              elem_id="quantize_table", wrap=True)
    with gr.Row():
        w["row"] = gr.Dropdown([], label="Row to use", elem_id="quantize_row", scale=3)
        w["load"] = gr.Button("Load in Chat", elem_id="quantize_load_in_chat", scale=1)
    w["timer"] = gr.Timer(POLL_SECONDS, active=False)
    return w


def _progress_html(view: QuantizeView) -> str:
    import html
    if not view.running:
        return ""
    return (f'<progress value="{view.fraction:.3f}" max="1" style="width:100%"></progress>'
            f"<div>{html.escape(view.progress_line)}</div>")


def build(ctx: Any) -> None:
    controller: QuantizeController = ctx.quantize
    w = _build_widgets(controller)
    chat_model = ctx.ui.components.get("chat_model") if ctx.ui is not None else None
    outputs = [w["progress"], w["table"], w["row"], w["timer"]]

    def show(view: QuantizeView, current_row: str | None = None) -> list:
        table = pd.DataFrame(view.rows, columns=controller.columns())
        value = current_row if current_row in view.loadable else (view.loadable[-1] if view.loadable else None)
        return [_progress_html(view), table, gr.update(choices=view.loadable, value=value),
                gr.Timer(active=view.running)]

    def run(source, formats, overwrite):
        try:
            view = controller.start(source, formats, overwrite)
        except QuantizeTabError as exc:
            return [str(exc), *show(controller.view())]
        return ["Queued.", *show(view)]

    w["run"].click(run, [w["source"], w["formats"], w["overwrite"]], [w["message"], *outputs])
    w["stop"].click(controller.stop, None, w["message"])

    def poll(current_row):
        view = controller.view()
        return [view.message or gr.update(), *show(view, current_row)]

    w["timer"].tick(poll, w["row"], [w["message"], *outputs], show_progress="hidden")

    def refresh(current):
        names = controller.source_choices()
        return gr.update(choices=names, value=current if current in names else (names[0] if names else None))

    w["refresh"].click(refresh, w["source"], w["source"])

    def load(name):
        try:
            message = controller.load_in_chat(name)
        except QuantizeTabError as exc:
            return [str(exc)] + ([gr.update()] if chat_model is not None else [])
        if chat_model is None:
            return [message]
        return [message, gr.update(choices=ctx.llm.model_names(), value=name)]

    load_event = w["load"].click(load, w["row"], [w["message"], *([chat_model] if chat_model else [])])
    load_event.then(None, None, None, js=SWITCH_TO_CHAT_JS)

    def page_load(current_row):
        view = controller.view()
        names = controller.source_choices()
        return [gr.update(choices=names, value=names[0] if names else None), *show(view, current_row)]

    gr.on(triggers=None, fn=page_load, inputs=w["row"], outputs=[w["source"], *outputs], queue=False)

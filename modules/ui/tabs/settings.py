"""Settings tab: one group per settings section (core, capabilities, extensions); Apply saves them."""
from __future__ import annotations

import gradio as gr

from modules.settings import SettingSpec
from modules.ui.core_tabs import setting_component


def _component(spec: SettingSpec, value):
    kind, kwargs = setting_component(spec, value)  # built from the spec: the API's range is the UI's
    return getattr(gr, kind)(**kwargs)


def build(ctx) -> None:
    components: dict[str, gr.components.Component] = {}
    for section in ctx.settings.sections:
        specs = [s for s in section.specs if s.type is not list]  # lists (e.g. disabled extensions) have their own UI
        if not specs:
            continue
        with gr.Accordion(section.label, open=True, elem_id=f"settings_{section.id}"):
            for spec in specs:
                components[spec.key] = _component(spec, ctx.settings.get(spec.key))
    keys = list(components)
    with gr.Row():
        apply = gr.Button("Apply settings", variant="primary", elem_id="settings_apply")
        reload = gr.Button("Reload from file", elem_id="settings_reload")
    status = gr.Markdown(elem_id="settings_status")

    def save(*values):
        try:
            ctx.settings.update(dict(zip(keys, values)))
            ctx.settings.save()
        except (ValueError, OSError) as exc:
            return f"**Not saved:** {exc}"
        return f"Saved {len(keys)} settings to `{ctx.settings.path}`."

    def reload_values():
        ctx.settings.load()
        message = ctx.settings.load_error or "Reloaded."
        return [ctx.settings.get(k) for k in keys] + [message]

    apply.click(save, inputs=[components[k] for k in keys], outputs=status)
    reload.click(reload_values, outputs=[components[k] for k in keys] + [status])

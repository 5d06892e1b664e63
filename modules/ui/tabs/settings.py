"""Settings tab: one group per settings section (core, capabilities, extensions); Apply saves them."""
from __future__ import annotations

import gradio as gr

from modules.settings import SettingSpec


def _component(spec: SettingSpec, value):
    label = spec.label + ("" if not spec.help else "")
    if spec.type is bool:
        return gr.Checkbox(value=value, label=label, info=spec.help or None)
    if spec.type in (int, float):
        return gr.Number(value=value, label=label, info=spec.help or None, precision=0 if spec.type is int else None,
                         minimum=spec.minimum, maximum=spec.maximum)
    if spec.choices:
        choices = spec.choices() if callable(spec.choices) else list(spec.choices)
        return gr.Dropdown(choices=choices, value=value, label=label, info=spec.help or None, allow_custom_value=True)
    return gr.Textbox(value=value, label=label, info=spec.help or None)


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

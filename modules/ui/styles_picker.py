"""The Styles picker of txt2img and img2img: choose styles (applied when Generate runs, as in A1111),
Apply them into the prompt boxes, or Save the current prompts as a style.

Only wiring: the logic is :mod:`modules.diffusion.styles` (``styles_apply`` / ``styles_save`` below are
plain functions, tested without a browser).
"""
from __future__ import annotations

import gradio as gr

from modules.diffusion.styles import StyleError, StyleStore, style_store


def styles_apply(store: StyleStore, prompt: str, negative_prompt: str, names: list[str]) -> tuple[str, str, str]:
    """(prompt, negative prompt, status) after applying *names*; the prompts are unchanged on error."""
    if not names:
        return prompt, negative_prompt, "Choose one or more styles to apply."
    try:
        new_prompt, new_negative = store.apply(prompt or "", negative_prompt or "", list(names))
    except StyleError as exc:
        return prompt, negative_prompt, f"**Error:** {exc}"
    return new_prompt, new_negative, f"Applied {', '.join(names)}."


def styles_save(store: StyleStore, name: str, prompt: str, negative_prompt: str, replace: bool) -> tuple[list, str]:
    """(style names now, status) after saving the prompts as style *name*."""
    try:
        store.save_style(name, prompt or "", negative_prompt or "", replace=bool(replace))
    except StyleError as exc:
        return store.names(), f"**Error:** {exc}"
    return store.names(), f"Saved style {name.strip()!r} to {store.path.name}."


def build(ctx, tab: str, form) -> None:
    """The picker under the prompt boxes; its selection is the form's ``styles`` field."""
    store = style_store(ctx)
    c = form.components
    with gr.Accordion("Styles", open=False, elem_id=f"{tab}_styles_accordion"):
        with gr.Row():
            c["styles"] = gr.Dropdown(store.names(), value=[], multiselect=True, label="Styles",
                                      elem_id=f"{tab}_styles", scale=4)
            refresh = gr.Button("🔄", elem_id=f"{tab}_styles_refresh", scale=0, min_width=40)
            apply = gr.Button("Apply", elem_id=f"{tab}_style_apply", scale=1)
        with gr.Row():
            name = gr.Textbox(label="Save the prompts as style", placeholder="style name",
                              elem_id=f"{tab}_style_name", scale=3)
            replace = gr.Checkbox(False, label="Replace existing", elem_id=f"{tab}_style_replace", scale=1)
            save = gr.Button("Save", elem_id=f"{tab}_style_save", scale=1)
        status = gr.Markdown(elem_id=f"{tab}_styles_status")

    def do_apply(prompt, negative, names):
        new_prompt, new_negative, message = styles_apply(store, prompt, negative, names)
        applied = not message.startswith("**Error")
        return new_prompt, new_negative, ([] if applied and names else gr.skip()), message

    def do_save(style_name, prompt, negative, replace_existing):
        names, message = styles_save(store, style_name, prompt, negative, replace_existing)
        return gr.Dropdown(choices=names), message

    apply.click(do_apply, inputs=[c["prompt"], c["negative_prompt"], c["styles"]],
                outputs=[c["prompt"], c["negative_prompt"], c["styles"], status])
    save.click(do_save, inputs=[name, c["prompt"], c["negative_prompt"], replace], outputs=[c["styles"], status])
    refresh.click(lambda: gr.Dropdown(choices=store.names()), outputs=c["styles"])

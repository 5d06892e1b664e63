"""PNG Info tab: read the generation parameters from an image (ours, A1111's, EXIF) and send them to
txt2img or img2img, filling every field those tabs have."""
from __future__ import annotations

import html

import gradio as gr

from modules.diffusion.infotext import params_from_infotext, parse_generation_parameters, read_info_from_image

_SWITCH_TAB_JS = """(...args) => {{
  const tabs = [...document.querySelectorAll('#tabs button[role="tab"], #tabs .tab-nav button')];
  const target = tabs.find(b => b.textContent.trim() === {label!r});
  if (target) target.click();
  return args;
}}"""


def describe(image) -> tuple[str, str]:
    """(infotext, HTML listing the other metadata) for an uploaded image."""
    if image is None:
        return "", ""
    text, items = read_info_from_image(image)
    rows = "".join(f"<p><b>{html.escape(str(k))}</b><br>{html.escape(str(v))}</p>" for k, v in items.items())
    if not text:
        rows = "<p>No generation parameters found in this image.</p>" + rows
    return text or "", rows


def not_sent(settings) -> set[str]:
    """Fields "Send to" leaves as they are: the seed and the size unless ``ui.send_seed`` / ``ui.send_size``
    (A1111's ``send_seed`` / ``send_size`` options) are on."""
    return (set() if settings.get("ui.send_seed") else {"seed", "subseed", "subseed_strength"}) | \
        (set() if settings.get("ui.send_size") else {"width", "height"})


def field_updates(form, infotext: str, skip: set[str] = frozenset()) -> list:
    """One value (or gr.skip) per component of *form* from *infotext*, in ``form.components`` order; the fields
    in *skip* are left unchanged."""
    values = params_from_infotext(parse_generation_parameters(infotext or ""))
    updates = []
    for name, comp in form.components.items():
        if name not in values or name in skip:
            updates.append(gr.skip())
            continue
        value = values[name]
        if name in ("inpainting_fill", "inpainting_mask_invert", "resize_mode"):
            value = comp.choices[int(value)][0] if hasattr(comp, "choices") and comp.choices else value
        updates.append(value)
    checkpoint = values.get("sd_model_checkpoint")
    updates.append(_checkpoint_choice(form, checkpoint, values.get("sd_model_hash")) if checkpoint else gr.skip())
    return updates


def _checkpoint_choice(form, name, short_hash):
    for choice in (form.checkpoint.choices or []):
        title = choice[0] if isinstance(choice, (tuple, list)) else choice
        if short_hash and short_hash in title:
            return title
    for choice in (form.checkpoint.choices or []):
        title = choice[0] if isinstance(choice, (tuple, list)) else choice
        if title.split(" [")[0].rsplit(".", 1)[0] == name or title.split(" [")[0] == name:
            return title
    return gr.skip()


def build(ctx) -> None:
    forms = ctx.ui.forms
    with gr.Row():
        with gr.Column():
            image = gr.Image(label="Source", type="pil", elem_id="pnginfo_image", sources=("upload", "clipboard"),
                             image_mode=None)
        with gr.Column():
            infotext = gr.Textbox(label="Parameters", lines=6, elem_id="pnginfo_parameters", buttons=["copy"])
            other = gr.HTML(elem_id="pnginfo_html")
            with gr.Row():
                buttons = {tab: gr.Button(f"Send to {tab}", elem_id=f"pnginfo_send_{tab}")
                           for tab in ("txt2img", "img2img") if tab in forms}
    image.change(describe, inputs=image, outputs=[infotext, other])
    for tab, button in buttons.items():
        form = forms[tab]
        outputs = list(form.components.values()) + [form.checkpoint]
        button.click(lambda text, form=form: field_updates(form, text, not_sent(ctx.settings)), inputs=infotext,
                     outputs=outputs,
                     js=_SWITCH_TAB_JS.format(label=tab))

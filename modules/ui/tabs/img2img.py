"""img2img tab: init image, inpainting with a painted (brush) or uploaded mask, resize mode and the
inpaint options, on top of the shared generation form."""
from __future__ import annotations

import gradio as gr

from modules.diffusion.images import RESIZE_MODES
from modules.diffusion.processing import INPAINTING_FILL
from modules.ui import generation_form as gf
from modules.ui import styles_picker

TAB = "img2img"
MASK_MODES = ("Inpaint masked", "Inpaint not masked")
INPAINT_AREAS = ("Whole picture", "Only masked")


def editor_parts(value) -> tuple:
    """(init image, painted mask or None) from a gr.ImageEditor value: the background is the image; every
    brush layer's painted (non-transparent) pixels form the mask."""
    from PIL import ImageChops
    if not value:
        return None, None
    background = value.get("background") if isinstance(value, dict) else value
    if background is None:
        return None, None
    mask = None
    for layer in (value.get("layers") or []) if isinstance(value, dict) else []:
        if layer is None:
            continue
        alpha = layer.convert("RGBA").getchannel("A")
        if alpha.size != background.size:
            alpha = alpha.resize(background.size)
        mask = alpha if mask is None else ImageChops.lighter(mask, alpha)
    if mask is not None and mask.getextrema()[1] == 0:
        mask = None
    if mask is not None:
        mask = mask.point(lambda v: 255 if v > 0 else 0)
    return background.convert("RGB"), mask


def build(ctx) -> None:
    form = gf.GenerationForm(TAB)
    gf.checkpoint_row(ctx, TAB, form)
    with gr.Row():
        with gr.Column(scale=3):
            gf.prompt_area(TAB, form)
            styles_picker.build(ctx, TAB, form)
            editor = gr.ImageEditor(label="Image (paint the area to repaint with the brush)", type="pil",
                                    elem_id=f"{TAB}_editor", sources=("upload", "clipboard"), layers=False,
                                    brush=gr.Brush(colors=["#ffffff"], default_color="#ffffff", color_mode="fixed"),
                                    height=400)
            mask_upload = gr.Image(label="Or upload a mask (white = repaint)", type="pil",
                                   elem_id=f"{TAB}_mask_upload", sources=("upload", "clipboard"), height=160)
            c = form.components
            c["resize_mode"] = gr.Radio(list(RESIZE_MODES), value=RESIZE_MODES[0], label="Resize mode",
                                        elem_id=f"{TAB}_resize_mode", type="index")
            gf.sampling_controls(TAB, form)
            c["denoising_strength"] = gr.Slider(0, 1, value=0.75, step=0.01, label="Denoising strength",
                                                elem_id=f"{TAB}_denoising_strength")
            with gr.Accordion("Inpainting", open=True, elem_id=f"{TAB}_inpaint"):
                with gr.Row():
                    c["mask_blur"] = gr.Slider(0, 64, value=4, step=1, label="Mask blur", elem_id=f"{TAB}_mask_blur")
                    c["inpainting_mask_invert"] = gr.Radio(list(MASK_MODES), value=MASK_MODES[0], type="index",
                                                           label="Mask mode", elem_id=f"{TAB}_mask_mode")
                c["inpainting_fill"] = gr.Radio(list(INPAINTING_FILL), value="original", type="index",
                                                label="Masked content", elem_id=f"{TAB}_inpainting_fill")
                with gr.Row():
                    area = gr.Radio(list(INPAINT_AREAS), value=INPAINT_AREAS[0], label="Inpaint area",
                                    elem_id=f"{TAB}_inpaint_full_res")
                    c["inpaint_full_res_padding"] = gr.Slider(0, 256, value=32, step=4,
                                                              label="Only masked padding, pixels",
                                                              elem_id=f"{TAB}_inpaint_full_res_padding")
            gf.scripts_area(ctx, TAB, form)
        with gr.Column(scale=2):
            gf.results_area(TAB, form)

    extra = {editor, mask_upload, area}

    def make_params(data):
        image, painted = editor_parts(data[editor])
        if image is None:
            raise ValueError("img2img needs an image: upload one into the image box first")
        p = form.to_params(data)
        p.init_images = [image]
        p.mask = painted if painted is not None else data[mask_upload]
        p.inpaint_full_res = data[area] == INPAINT_AREAS[1]
        return p

    original_inputs = form.inputs

    form.inputs = lambda: original_inputs() | extra
    gf.wire(ctx, form, make_params, img2img=True)
    form.editor = editor
    ctx.ui.forms[TAB] = form

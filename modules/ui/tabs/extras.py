"""Extras tab: upscale one image or a batch with the built-in or ESRGAN upscalers (A1111's Extras).
Wiring only; the work is :func:`modules.upscale.extras.run_extras`, on the job queue."""
from __future__ import annotations

import gradio as gr

from modules.upscale.extras import RESIZE_LABELS, options_from_form, run_extras
from modules.upscale.upscalers import UpscalerError, upscalers_for

TAB = "extras"


def upscale_files(ctx, images: list, values: dict) -> tuple[list, str]:
    """(saved result paths or images, status) for the Extras button; errors become the status line."""
    images = [img for img in images if img is not None]
    if not images:
        return [], "**Error:** upload an image first."
    try:
        opts = options_from_form(values)
        results, paths = run_extras(ctx, images, opts, save=True)
    except (UpscalerError, ValueError) as exc:
        return [], f"**Error:** {exc}"
    return (paths or results), f"{opts.infotext()}. Saved {len(paths)} image(s) to outputs/extras-images."


def build(ctx) -> None:
    names = upscalers_for(ctx).names()
    with gr.Row():
        with gr.Column():
            with gr.Tabs(elem_id=f"{TAB}_mode"):
                with gr.Tab("Single Image", elem_id=f"{TAB}_single_tab"):
                    single = gr.Image(type="pil", label="Source", elem_id=f"{TAB}_image")
                with gr.Tab("Batch Process", elem_id=f"{TAB}_batch_tab"):
                    batch = gr.File(file_count="multiple", file_types=["image"], label="Batch Process",
                                    elem_id=f"{TAB}_image_batch")
            resize_mode = gr.Radio(list(RESIZE_LABELS), value="Scale by", label="Resize", elem_id=f"{TAB}_resize_mode")
            with gr.Row():
                resize = gr.Slider(1, 8, value=4, step=0.05, label="Resize", elem_id=f"{TAB}_upscaling_resize")
                width = gr.Number(512, precision=0, label="Width", elem_id=f"{TAB}_upscaling_resize_w")
                height = gr.Number(512, precision=0, label="Height", elem_id=f"{TAB}_upscaling_resize_h")
                crop = gr.Checkbox(True, label="Crop to fit", elem_id=f"{TAB}_upscaling_crop")
            with gr.Row():
                upscaler_1 = gr.Dropdown(names, value="None", label="Upscaler 1", elem_id=f"{TAB}_upscaler_1")
                upscaler_2 = gr.Dropdown(names, value="None", label="Upscaler 2", elem_id=f"{TAB}_upscaler_2")
                visibility = gr.Slider(0, 1, value=0, step=0.001, label="Upscaler 2 visibility",
                                       elem_id=f"{TAB}_upscaler_2_visibility")
            run = gr.Button("Generate", variant="primary", elem_id=f"{TAB}_generate")
        with gr.Column():
            gallery = gr.Gallery(label="Result", elem_id=f"{TAB}_gallery", format="png", interactive=False)
            status = gr.Markdown(elem_id=f"{TAB}_status")

    def on_run(mode_image, files, mode, by, w, h, do_crop, up1, up2, vis):
        from PIL import Image
        images = [mode_image] if mode_image is not None else []
        for f in files or []:
            try:
                images.append(Image.open(getattr(f, "name", f)).convert("RGB"))
            except OSError as exc:
                return [], f"**Error:** {getattr(f, 'name', f)} is not a readable image ({exc})"
        return upscale_files(ctx, images, {"resize_mode": mode, "upscaling_resize": by, "upscaling_resize_w": w,
                                           "upscaling_resize_h": h, "upscaling_crop": do_crop, "upscaler_1": up1,
                                           "upscaler_2": up2, "extras_upscaler_2_visibility": vis})

    run.click(on_run, inputs=[single, batch, resize_mode, resize, width, height, crop, upscaler_1, upscaler_2,
                              visibility], outputs=[gallery, status])

"""txt2img tab: the shared generation form plus hires fix."""
from __future__ import annotations

import gradio as gr

from modules.diffusion.images import HR_UPSCALERS
from modules.ui import generation_form as gf
from modules.ui import styles_picker

TAB = "txt2img"


def build(ctx) -> None:
    form = gf.GenerationForm(TAB)
    gf.checkpoint_row(ctx, TAB, form)
    with gr.Row():
        with gr.Column(scale=3):
            gf.prompt_area(TAB, form)
            styles_picker.build(ctx, TAB, form)
            gf.sampling_controls(TAB, form)
            c = form.components
            with gr.Accordion("Hires. fix", open=False, elem_id=f"{TAB}_hr"):
                c["enable_hr"] = gr.Checkbox(False, label="Enable hires. fix", elem_id=f"{TAB}_enable_hr")
                with gr.Row():
                    c["hr_upscaler"] = gr.Dropdown(list(HR_UPSCALERS), value="Latent", label="Upscaler",
                                                   elem_id=f"{TAB}_hr_upscaler")
                    c["hr_second_pass_steps"] = gr.Slider(0, 150, value=0, step=1, label="Hires steps (0: same)",
                                                          elem_id=f"{TAB}_hires_steps")
                with gr.Row():
                    c["denoising_strength"] = gr.Slider(0, 1, value=0.7, step=0.01, label="Denoising strength",
                                                        elem_id=f"{TAB}_denoising_strength")
                    c["hr_scale"] = gr.Slider(1, 4, value=2, step=0.05, label="Upscale by", elem_id=f"{TAB}_hr_scale")
            gf.scripts_area(ctx, TAB, form)
        with gr.Column(scale=2):
            gf.results_area(TAB, form)
    gf.wire(ctx, form, form.to_params, img2img=False)
    ctx.ui.forms[TAB] = form

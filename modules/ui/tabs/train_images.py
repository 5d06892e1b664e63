"""The Train tab's image section: Gradio widgets wired by name to
:class:`~modules.training.images.train_controller.ImageTrainController` (``ctx.training_images``).

As in the LLM section, nothing here decides anything: the controller checks every value and the view
(loss plot, progress line, samples gallery) is read back from the run folder; a ``gr.Timer`` polls it every
2 s while a run is live, and page load does it once, so a reload mid-run brings everything back.

Images reach the browser as PIL images (Gradio caches them), not as paths: run folders and typed dataset
folders are not among the paths the server lets Gradio serve, and should not be (checkpoints live there).
The gallery is only sent again when a new sample has appeared.
"""
from __future__ import annotations

import html
from typing import Any

import gradio as gr
import pandas as pd

from modules.training.images.config import LR_SCHEDULERS
from modules.training.images.train_controller import ImageTrainController, ImageTrainTabError
from modules.training.llm.train_controller import QUEUE_NOTE

POLL_SECONDS = 2.0
#: the newest samples the gallery shows
GALLERY_SIZE = 24
NUMBERS = ("rank", "warmup_steps", "max_steps", "batch_size", "gradient_accumulation", "resolution", "seed",
           "sample_every", "sample_steps", "save_every_steps")
FLOATS = ("alpha", "unet_lr", "text_encoder_lr")
SWITCH_TO_TXT2IMG_JS = """() => {
  const tabs = [...document.querySelectorAll('#tabs button[role="tab"], #tabs .tab-nav button')];
  const target = tabs.find(b => b.textContent.trim() === 'txt2img');
  if (target) target.click();
}"""


def _loss_frame(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows, columns=["step", "loss"])
    return frame.dropna(subset=["loss"]) if rows else frame


def _progress_html(view) -> str:
    bar = (f'<progress value="{view.fraction:.4f}" max="1" style="width:100%"></progress>'
           if view.total_steps else "")
    detail = f"<div><small>{html.escape(view.detail)}</small></div>" if view.detail else ""
    return f"{bar}<div>{html.escape(view.progress_line)}</div>{detail}"


def _open(path: str):
    from PIL import Image
    with Image.open(path) as image:
        image.load()
        return image.copy()


def _build_widgets(controller: ImageTrainController) -> dict[str, Any]:
    """Every widget of the section, by name (elem_ids are ``train_img_<name>``)."""
    w: dict[str, Any] = {}
    defaults = controller.defaults()
    gr.Markdown(QUEUE_NOTE, elem_id="train_img_queue_note")
    with gr.Row():
        bases = controller.base_choices()
        w["base"] = gr.Dropdown(bases, value=bases[0][1] if bases else None, allow_custom_value=True, scale=3,
                                label="Base checkpoint (models/Stable-diffusion, or a path)", elem_id="train_img_base")
        w["dataset"] = gr.Dropdown(controller.dataset_choices(), value=None, allow_custom_value=True, scale=3,
                                   label=f"Dataset folder ({controller.datasets_dir.name}/, or a path)",
                                   elem_id="train_img_dataset")
        w["refresh"] = gr.Button("Refresh", elem_id="train_img_refresh", scale=0, min_width=80)
    with gr.Row():
        w["mode"] = gr.Radio(controller.type_choices(), value=controller.type_choices()[0], label="Training type",
                             elem_id="train_img_mode")
        w["preset"] = gr.Dropdown(controller.preset_choices(), value="", label="Preset (fills the parameters)",
                                  elem_id="train_img_preset")
    with gr.Accordion("Dataset preview", open=True, elem_id="train_img_preview_box"):
        w["preview_text"] = gr.Markdown("Pick a dataset to see its images, buckets and captions.",
                                        elem_id="train_img_preview_text")
        w["preview_gallery"] = gr.Gallery(label="Images with their captions", columns=6, height=200,
                                          elem_id="train_img_preview_gallery")
    with gr.Accordion("Parameters", open=False, elem_id="train_img_params_box"):
        with gr.Row():
            for name in ("rank", "alpha", "unet_lr", "text_encoder_lr"):
                w[name] = gr.Number(defaults[name], label=name, elem_id=f"train_img_{name}",
                                    precision=0 if name in NUMBERS else None)
            w["train_text_encoder"] = gr.Checkbox(defaults["train_text_encoder"], label="train_text_encoder",
                                                  elem_id="train_img_train_text_encoder")
        with gr.Row():
            w["lr_scheduler"] = gr.Dropdown(list(LR_SCHEDULERS), value=defaults["lr_scheduler"], label="lr_scheduler",
                                            elem_id="train_img_lr_scheduler")
            for name in ("warmup_steps", "max_steps", "batch_size", "gradient_accumulation", "resolution", "seed"):
                w[name] = gr.Number(defaults[name], precision=0, label=name, elem_id=f"train_img_{name}")
        with gr.Row():
            w["sample_prompts"] = gr.Textbox("\n".join(defaults["sample_prompts"]), lines=2, scale=3,
                                             label="Sample prompts (one a line)", elem_id="train_img_sample_prompts")
            for name in ("sample_every", "sample_steps", "save_every_steps"):
                w[name] = gr.Number(defaults[name], precision=0, label=name, elem_id=f"train_img_{name}")
        with gr.Row():
            w["output_name"] = gr.Textbox(defaults["output_name"], label="Output name (empty: the run name)",
                                          elem_id="train_img_output_name")
            w["extra"] = gr.Textbox(label="More config keys (key=value, one a line; e.g. enable_bucket=false)",
                                    lines=2, elem_id="train_img_extra", scale=2)
    with gr.Row():
        w["run_name"] = gr.Textbox(label="Run name (empty: <type>-<time>)", elem_id="train_img_run_name", scale=2)
        w["start"] = gr.Button("Start", variant="primary", elem_id="train_img_start", scale=1)
        w["stop"] = gr.Button("Stop", variant="stop", elem_id="train_img_stop", scale=1)
    with gr.Row():
        w["run"] = gr.Dropdown(controller.run_choices(), label="Run", elem_id="train_img_run", scale=2,
                               allow_custom_value=True)
        w["resume"] = gr.Button("Resume", elem_id="train_img_resume", scale=1)
        w["use"] = gr.Button("Use in txt2img", elem_id="train_img_use", scale=1)
    w["message"] = gr.Markdown(elem_id="train_img_message")
    w["progress"] = gr.HTML(elem_id="train_img_progress")
    w["plot_loss"] = gr.LinePlot(_loss_frame([]), x="step", y="loss", title="Loss", elem_id="train_img_plot_loss")
    w["samples"] = gr.Gallery(label="Samples (newest first)", columns=4, height=320, elem_id="train_img_samples")
    w["shown"] = gr.State(())                 # the sample files the gallery shows now
    w["timer"] = gr.Timer(POLL_SECONDS, active=False)
    return w


def build(ctx) -> None:
    controller: ImageTrainController = ctx.training_images
    w = _build_widgets(controller)
    param_names = [n for n in controller.defaults() if n in w]
    form = ctx.ui.forms.get("txt2img") if ctx.ui is not None else None
    live_outputs = [w["progress"], w["plot_loss"], w["samples"], w["shown"], w["timer"]]

    def show(run: str | None, shown=()) -> list:
        view = controller.view(run)
        newest = view.samples[:GALLERY_SIZE]
        files = tuple(path for path, _ in newest)
        gallery = gr.skip() if files == tuple(shown or ()) else [(_open(p), caption) for p, caption in newest]
        return [_progress_html(view), _loss_frame(view.loss), gallery, files, gr.Timer(active=view.live)]

    def form_params(values) -> dict:
        out = dict(zip(param_names, values))
        for name in NUMBERS:
            if out.get(name) is not None:
                out[name] = int(out[name])
        return out

    def extra_lines(text: str) -> list[str]:
        return [line.strip() for line in (text or "").splitlines() if line.strip()]

    def start(base, dataset, mode, preset, run_name, extra, shown, *values):
        try:
            run = controller.start(base=base or "", dataset=dataset or "", mode=mode, preset=preset or "",
                                   params=form_params(values), run_name=run_name, extra=extra_lines(extra))
        except ImageTrainTabError as exc:
            return [str(exc), gr.update(), *show(controller.current_run(), shown)]
        return [f"Started {run}. {QUEUE_NOTE}", gr.update(choices=controller.run_choices(), value=run),
                *show(run, ())]

    w["start"].click(start, [w["base"], w["dataset"], w["mode"], w["preset"], w["run_name"], w["extra"], w["shown"],
                             *(w[n] for n in param_names)], [w["message"], w["run"], *live_outputs])

    def resume(run, extra, shown):
        try:
            controller.resume(run, extra=extra_lines(extra))
        except ImageTrainTabError as exc:
            return [str(exc), *show(run, shown)]
        return [f"Resuming {run} from its latest checkpoint.", *show(run, shown)]

    w["resume"].click(resume, [w["run"], w["extra"], w["shown"]], [w["message"], *live_outputs])
    w["stop"].click(controller.stop, None, w["message"])
    w["run"].input(show, [w["run"], w["shown"]], live_outputs, queue=False)
    w["timer"].tick(show, [w["run"], w["shown"]], live_outputs, queue=False, show_progress="hidden")

    def preview(dataset, resolution, batch_size):
        if not (dataset or "").strip():
            return "Pick a dataset to see its images, buckets and captions.", []
        try:
            found = controller.preview(dataset, resolution=int(resolution or 512), batch_size=int(batch_size or 1))
        except ImageTrainTabError as exc:
            return str(exc), []
        return (controller.describe_preview(found),
                [(_open(s["path"]), f"{s['caption']} ({s['caption_source']})") for s in found.samples])

    for trigger in (w["dataset"].change, w["resolution"].blur, w["batch_size"].blur):
        trigger(preview, [w["dataset"], w["resolution"], w["batch_size"]], [w["preview_text"], w["preview_gallery"]])

    def apply_preset(preset):
        values = controller.defaults(preset or "")
        return [("\n".join(values[n]) if n == "sample_prompts" else values[n]) for n in param_names]

    w["preset"].input(apply_preset, w["preset"], [w[n] for n in param_names], queue=False)

    def refresh():
        bases = controller.base_choices()
        return [gr.update(choices=bases), gr.update(choices=controller.dataset_choices()),
                gr.update(choices=controller.run_choices())]

    w["refresh"].click(refresh, None, [w["base"], w["dataset"], w["run"]], queue=False)

    # -- "Use in txt2img": <lora:name:1> into txt2img's prompt, the checkpoint it needs selected there
    if form is not None:
        prompt_box, checkpoint = form.components["prompt"], form.checkpoint

        def use(run, prompt):
            try:
                chosen = controller.use_in_txt2img(run)
            except ImageTrainTabError as exc:
                raise gr.Error(str(exc)) from None
            text = prompt or ""
            if chosen.prompt and chosen.prompt not in text:
                text = f"{text.rstrip()} {chosen.prompt}".strip()
            titles = [c.title for c in ctx.diffusion.usable_checkpoints()]
            return [chosen.message, text,
                    gr.update(choices=titles, value=chosen.checkpoint) if chosen.checkpoint else gr.skip()]

        w["use"].click(use, [w["run"], prompt_box], [w["message"], prompt_box, checkpoint]).success(
            None, js=SWITCH_TO_TXT2IMG_JS)
    else:
        def use_without_txt2img(run):
            try:
                return controller.use_in_txt2img(run).message + " (the txt2img tab is not loaded)"
            except ImageTrainTabError as exc:
                return str(exc)

        w["use"].click(use_without_txt2img, w["run"], w["message"])

    def page_load():
        run = controller.current_run()
        return [gr.update(choices=controller.dataset_choices()), gr.update(choices=controller.run_choices(), value=run),
                *show(run, ())]

    gr.on(triggers=None, fn=page_load, inputs=None, outputs=[w["dataset"], w["run"], *live_outputs], queue=False)

"""The parts txt2img and img2img share: model row, prompt, sampling controls, scripts, the Generate /
Interrupt / Skip buttons, gallery, live preview, progress and infotext.

Thin by design: it builds components and turns their values into a ``GenerationParams``; the work
is ``ctx.diffusion.submit``. Every component gets an ``elem_id`` prefixed with the tab
name (``txt2img_prompt``...), as in A1111, so browser tests and user CSS can find it.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import gradio as gr

from modules.diffusion.processing import GenerationParams
from modules.job_owner import ui_owner


@dataclass
class GenerationForm:
    tab: str
    components: dict[str, Any] = field(default_factory=dict)  # GenerationParams field -> component
    checkpoint: Any = None
    script_dropdown: Any = None
    script_inputs: list[tuple[str, str, Any]] = field(default_factory=list)  # (title, name, component)
    alwayson_inputs: list[tuple[str, str, Any]] = field(default_factory=list)
    generate: Any = None
    interrupt: Any = None
    skip: Any = None
    gallery: Any = None
    preview: Any = None
    status: Any = None
    infotext: Any = None
    infotexts_state: Any = None

    def inputs(self) -> set:
        comps = set(self.components.values()) | {self.checkpoint, self.script_dropdown}
        comps |= {c for _, _, c in self.script_inputs} | {c for _, _, c in self.alwayson_inputs}
        return comps

    def to_params(self, data: dict) -> GenerationParams:
        values = {name: data[comp] for name, comp in self.components.items()}
        for key in ("steps", "width", "height", "seed", "batch_size", "n_iter", "hr_second_pass_steps",
                    "mask_blur", "inpaint_full_res_padding"):
            if key in values and values[key] is not None:
                values[key] = int(values[key])
        p = GenerationParams(**{k: v for k, v in values.items() if k in GenerationParams.__dataclass_fields__})
        p.override_settings = {"sd_model_checkpoint": data[self.checkpoint]} if data[self.checkpoint] else {}
        script = data[self.script_dropdown]
        if script and script != "None":
            p.script_name = script
            p.script_args = {name: data[c] for title, name, c in self.script_inputs if title == script}
        always: dict[str, dict] = {}
        for title, name, comp in self.alwayson_inputs:
            always.setdefault(title, {})[name] = data[comp]
        p.alwayson_scripts = always
        p.save_images = True
        return p


def checkpoint_row(ctx, tab: str, form: GenerationForm) -> None:
    service = ctx.diffusion

    def choices() -> list[str]:
        return [c.title for c in service.usable_checkpoints()]

    def current() -> str | None:
        setting = ctx.settings.get("sd.sd_model_checkpoint")
        options = choices()
        if setting:
            for title in options:
                if setting in (title, title.split(" [")[0]):
                    return title
        return options[0] if options else None

    def broken() -> str | None:
        from modules.broken_models import summary
        return summary(service.broken_checkpoints()) or None

    with gr.Row():
        form.checkpoint = gr.Dropdown(choices=choices(), value=current(), label="Stable Diffusion checkpoint",
                                      elem_id=f"{tab}_checkpoint", allow_custom_value=True, scale=4, info=broken())
        refresh = gr.Button("Refresh", elem_id=f"{tab}_checkpoint_refresh", scale=1, size="sm")

    def do_refresh():
        service.refresh()
        return gr.Dropdown(choices=choices(), value=current(), info=broken())

    refresh.click(do_refresh, outputs=form.checkpoint)

    def choose(title):
        if title:
            try:
                service.select_checkpoint(title, load=False)
                ctx.settings.save()
            except ValueError as exc:
                gr.Warning(str(exc))

    form.checkpoint.input(choose, inputs=form.checkpoint)


def prompt_area(tab: str, form: GenerationForm) -> None:
    form.components["prompt"] = gr.Textbox(label="Prompt", lines=3, elem_id=f"{tab}_prompt",
                                           placeholder="Prompt (A1111 syntax: (word:1.2), [from:to:step], <lora:name:1>)")
    form.components["negative_prompt"] = gr.Textbox(label="Negative prompt", lines=2, elem_id=f"{tab}_neg_prompt")


def sampling_controls(tab: str, form: GenerationForm) -> None:
    from modules.diffusion.samplers import SAMPLERS, SCHEDULE_TYPES
    c = form.components
    with gr.Row():
        c["sampler_name"] = gr.Dropdown(list(SAMPLERS), value="Euler a", label="Sampling method",
                                        elem_id=f"{tab}_sampling")
        c["scheduler"] = gr.Dropdown(list(SCHEDULE_TYPES), value="Automatic", label="Schedule type",
                                     elem_id=f"{tab}_scheduler")
        c["steps"] = gr.Slider(1, 150, value=20, step=1, label="Sampling steps", elem_id=f"{tab}_steps")
    with gr.Row():
        c["width"] = gr.Slider(64, 2048, value=512, step=8, label="Width", elem_id=f"{tab}_width")
        c["height"] = gr.Slider(64, 2048, value=512, step=8, label="Height", elem_id=f"{tab}_height")
    with gr.Row():
        c["batch_size"] = gr.Slider(1, 8, value=1, step=1, label="Batch size", elem_id=f"{tab}_batch_size")
        c["n_iter"] = gr.Slider(1, 100, value=1, step=1, label="Batch count", elem_id=f"{tab}_batch_count")
        c["cfg_scale"] = gr.Slider(1, 30, value=7, step=0.5, label="CFG Scale", elem_id=f"{tab}_cfg_scale")
    with gr.Row():
        c["seed"] = gr.Number(value=-1, precision=0, label="Seed (-1: random)", elem_id=f"{tab}_seed")
        random_seed = gr.Button("Random", elem_id=f"{tab}_random_seed", size="sm", scale=0)
        random_seed.click(lambda: -1, outputs=c["seed"])


def scripts_area(ctx, tab: str, form: GenerationForm) -> None:
    selectable = ctx.scripts.selectable(tab)
    titles = ["None"] + [s.title() for s in selectable]
    form.script_dropdown = gr.Dropdown(titles, value="None", label="Script", elem_id=f"{tab}_script")
    groups = []
    for script in selectable:
        with gr.Group(visible=False, elem_id=f"{tab}_script_{_slug(script.title())}") as group:
            for name, comp in (script.ui(tab) or {}).items():
                form.script_inputs.append((script.title(), name, comp))
        groups.append((script.title(), group))
    for script in ctx.scripts.alwayson(tab):
        with gr.Accordion(script.title(), open=False, elem_id=f"{tab}_alwayson_{_slug(script.title())}"):
            for name, comp in (script.ui(tab) or {}).items():
                form.alwayson_inputs.append((script.title(), name, comp))
    if groups:
        form.script_dropdown.change(lambda choice: [gr.Group(visible=title == choice) for title, _ in groups],
                                    inputs=form.script_dropdown, outputs=[g for _, g in groups])


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in text.lower()).strip("_")


def results_area(tab: str, form: GenerationForm) -> None:
    with gr.Row():
        form.generate = gr.Button("Generate", variant="primary", elem_id=f"{tab}_generate", scale=2)
        form.interrupt = gr.Button("Interrupt", elem_id=f"{tab}_interrupt", scale=1)
        form.skip = gr.Button("Skip", elem_id=f"{tab}_skip", scale=1)
    form.status = gr.Markdown(elem_id=f"{tab}_status")
    form.preview = gr.Image(label="Live preview", type="pil", elem_id=f"{tab}_preview", interactive=False,
                            height=192)
    form.gallery = gr.Gallery(label="Output", elem_id=f"{tab}_gallery", columns=4, format="png",
                              interactive=False)
    form.infotext = gr.Textbox(label="Generation parameters", lines=3, interactive=False,
                               elem_id=f"{tab}_infotext", buttons=["copy"])
    form.infotexts_state = gr.State([])


def wire(ctx, form: GenerationForm, make_params: Callable[[dict], GenerationParams], *, img2img: bool) -> None:
    """Connect Generate / Interrupt / Skip and the gallery to the service."""
    service = ctx.diffusion
    outputs = [form.gallery, form.preview, form.status, form.infotext, form.infotexts_state]

    def run(data, request: gr.Request, progress=gr.Progress()):
        try:
            p = make_params(data)
            job = service.submit(p, img2img=img2img, owner=ui_owner(request))
        except ValueError as exc:
            yield [gr.skip(), None, f"**Error:** {exc}", gr.skip(), gr.skip()]
            return
        last_preview = None
        while not job.done:
            time.sleep(0.25)
            prog = job.progress
            if prog.total:
                progress((prog.step, prog.total), desc=prog.text or "Generating", unit="steps")
            preview = prog.preview if prog.preview is not last_preview else gr.skip()
            last_preview = prog.preview
            rate = f", {prog.rate:.2f} it/s" if prog.rate else ""
            waiting = "Waiting in queue..." if job.state == "queued" else f"Step {prog.step}/{prog.total}{rate}"
            yield [gr.skip(), preview, waiting, gr.skip(), gr.skip()]
        try:
            processed = job.result()
        except Exception as exc:  # noqa: BLE001 - shown to the user; the job queue already logged it
            yield [gr.skip(), None, f"**Error:** {type(exc).__name__}: {exc}", gr.skip(), gr.skip()]
            return
        items = processed.paths if processed.paths and len(processed.paths) == len(processed.images) \
            else processed.images
        texts = list(processed.infotexts)
        notes = [] if not processed.interrupted else ["Interrupted: showing the images finished so far."]
        notes += [f"⚠ {w}" for w in processed.warnings]
        elapsed = (job.finished or time.time()) - (job.started or time.time())
        notes.append(f"Done: {len(processed.images)} image(s) in {elapsed:.1f} s.")
        yield [items, None, "\n\n".join(notes), texts[0] if texts else "", texts]

    form.generate.click(run, inputs=form.inputs(), outputs=outputs, concurrency_limit=None)
    # Interrupt / Skip act on this browser session's (or logged-in user's) own images only
    def interrupt(request: gr.Request) -> None:
        service.interrupt(ui_owner(request), queued_too=True)

    def skip(request: gr.Request) -> None:
        service.skip(ui_owner(request))

    form.interrupt.click(interrupt, outputs=None)
    form.skip.click(skip, outputs=None)

    def show_info(texts, evt: gr.SelectData):
        if not texts:
            return gr.skip()
        index = evt.index if isinstance(evt.index, int) else 0
        return texts[min(index, len(texts) - 1)]

    form.gallery.select(show_info, inputs=form.infotexts_state, outputs=form.infotext)

"""The Train tab: its LLM section here, its image section in :mod:`modules.ui.tabs.train_images`.

The LLM section: Gradio widgets wired by name to
:class:`~modules.training.llm.train_controller.TrainController` (``ctx.training``).

Nothing here decides anything: each event passes widget values to the controller and turns what it returns
into widget updates. The plots, the progress line and the checkpoints table are read back from the run
folder by ``controller.view``; a ``gr.Timer`` polls it every 2 s while a run is live, and page load does it
once, so a reload mid-run brings everything back.
"""
from __future__ import annotations

import html
import math
from typing import Any

import gradio as gr
import pandas as pd

from modules.training.llm.train_controller import QUEUE_NOTE, TrainController, TrainTabError

POLL_SECONDS = 2.0
#: the plots: name -> (series attribute of RunView, y column, y title, colour column)
PLOTS = {"loss": ("loss", "loss", "Loss (train / validation)", "split"),
         "lr": ("lr", "lr", "Learning rate", None),
         "throughput": ("throughput", "tokens_per_s", "Tokens/s", None),
         "mfu": ("mfu", "mfu", "MFU (%)", None)}
CHECKPOINT_COLUMNS = ["name", "step", "tokens", "ppl"]
#: fixed colours per split, so a split keeps its colour whichever splits the plot holds
SPLIT_COLORS = {"train": "#4c78a8", "validation": "#f58518"}


def _frame(rows: list[dict], y: str, color: str | None) -> pd.DataFrame:
    """The plot's data; a split plot holds every split of SPLIT_COLORS from its first point on.

    Gradio's LinePlot takes its colour domain from the data it is first drawn with and, on the value-only
    updates the timer sends, swaps new data into that chart: validation points that arrive after the first
    draw stayed out of the scale and the legend until a page reload (seen in CI, reproduced in Chromium). So
    a split with no points yet gets one row with an empty y, which puts it in the domain and draws nothing.
    """
    columns = ["step", y] + ([color] if color else [])
    if not rows:
        return pd.DataFrame(columns=columns)
    frame = pd.DataFrame(rows, columns=columns).dropna(subset=[y])
    if color and not frame.empty:
        missing = [s for s in SPLIT_COLORS if s not in set(frame[color])]
        first = frame["step"].min()
        frame = pd.DataFrame([*frame.to_dict("records"), *({"step": first, y: math.nan, color: s} for s in missing)],
                             columns=columns)
    return frame


def _progress_html(view) -> str:
    """A progress bar with the progress line (and what the run trains) under it."""
    bar = (f'<progress value="{view.fraction:.4f}" max="1" style="width:100%"></progress>'
           if view.total_steps else "")
    detail = f"<div><small>{html.escape(view.detail)}</small></div>" if view.detail else ""
    return f"{bar}<div>{html.escape(view.progress_line)}</div>{detail}"


# The lists below change while the app runs (new datasets, runs, checkpoints, models), and Gradio checks a
# dropdown's value against the choices it was built with, so they take any value: the controller checks
# every name it is given (and says what to do when one is gone).
def _build_widgets(controller: TrainController) -> dict[str, Any]:
    """Every widget of the tab, by name (elem_ids are ``train_<name>``)."""
    w: dict[str, Any] = {}
    defaults = controller.defaults()
    gr.Markdown(QUEUE_NOTE, elem_id="train_queue_note")
    with gr.Row():
        w["dataset"] = gr.Dropdown(controller.dataset_choices(), label="Prepared dataset (training/data)",
                                   elem_id="train_dataset", scale=4, allow_custom_value=True)
        w["refresh"] = gr.Button("Refresh", elem_id="train_refresh", scale=0, min_width=80)
    with gr.Accordion("Prepare a dataset from files under the data dir", open=False, elem_id="train_prepare_box"):
        w["sources"] = gr.Dropdown(controller.source_choices(), multiselect=True, label="Files and folders",
                                   elem_id="train_sources", allow_custom_value=True)
        with gr.Row():
            w["dataset_name"] = gr.Textbox(label="Dataset name", elem_id="train_dataset_name")
            w["vocab_size"] = gr.Number(4096, precision=0, minimum=16, label="Tokenizer pieces (new tokenizer)",
                                        elem_id="train_vocab_size")
            w["data_seq_len"] = gr.Number(defaults["seq_len"], precision=0, minimum=1, label="Sequence length",
                                          elem_id="train_data_seq_len")
        w["prepare"] = gr.Button("Prepare dataset", elem_id="train_prepare")
        w["prepare_status"] = gr.Markdown(elem_id="train_prepare_status")
    with gr.Row():
        w["size"] = gr.Dropdown(controller.size_choices(), value="small-5m", label="Model size (new model)",
                                elem_id="train_size")
        w["init_from"] = gr.Dropdown(["", *controller.model_choices()], value="",
                                     label="Or continue from a model (models/LLM)", elem_id="train_init_from",
                                     allow_custom_value=True)
    w["size_note"] = gr.Markdown(controller.size_note("small-5m"), elem_id="train_size_note")
    with gr.Accordion("Hyper-parameters (defaults: TinyLlama's recipe)", open=False, elem_id="train_hyper_box"):
        with gr.Row():
            for name in ("micro_batch", "global_batch_tokens", "max_steps", "warmup_steps", "seed"):
                w[name] = gr.Number(defaults[name], precision=0, minimum=0, label=name, elem_id=f"train_{name}")
        with gr.Row():
            w["lr"] = gr.Slider(1e-5, 1e-2, value=defaults["lr"], step=1e-5, label="lr", elem_id="train_lr")
            w["min_lr"] = gr.Slider(0, 1e-2, value=defaults["min_lr"], step=1e-6, label="min_lr",
                                    elem_id="train_min_lr")
            w["weight_decay"] = gr.Slider(0, 1, value=defaults["weight_decay"], step=0.01, label="weight_decay",
                                          elem_id="train_weight_decay")
            w["grad_clip"] = gr.Slider(0.1, 10, value=defaults["grad_clip"], step=0.1, label="grad_clip",
                                       elem_id="train_grad_clip")
        with gr.Row():
            for name in ("eval_every", "log_every", "save_every_tokens"):
                w[name] = gr.Number(defaults[name], precision=0, minimum=0, label=name, elem_id=f"train_{name}")
            w["compile"] = gr.Checkbox(defaults["compile"], label="compile (torch.compile: 1.2-1.8x faster steps "
                                       "measured on a CPU, after up to a minute of compiling)", elem_id="train_compile")
        w["extra"] = gr.Textbox(label="More config keys (key=value, one a line; e.g. precision=fp32)", lines=2,
                                elem_id="train_extra")
    with gr.Row():
        w["run_name"] = gr.Textbox(label="Run name (empty: pretrain-<time>)", elem_id="train_run_name", scale=2)
        w["start"] = gr.Button("Start", variant="primary", elem_id="train_start", scale=1)
        w["stop"] = gr.Button("Stop", variant="stop", elem_id="train_stop", scale=1)
    with gr.Row():
        w["run"] = gr.Dropdown(controller.run_choices(), label="Run", elem_id="train_run", scale=2,
                               allow_custom_value=True)
        w["resume"] = gr.Button("Resume", elem_id="train_resume", scale=1)
    w["message"] = gr.Markdown(elem_id="train_message")
    w["progress"] = gr.HTML(elem_id="train_progress")
    for row in (list(PLOTS.items())[:2], list(PLOTS.items())[2:]):
        with gr.Row():
            for name, (_, y, title, color) in row:
                w[f"plot_{name}"] = gr.LinePlot(_frame([], y, color), x="step", y=y, color=color, title=title,
                                                color_map=SPLIT_COLORS if color else None,
                                                elem_id=f"train_plot_{name}")
    w["checkpoints"] = gr.Dataframe(pd.DataFrame(columns=CHECKPOINT_COLUMNS), label="Checkpoints",
                                    interactive=False, elem_id="train_checkpoints")
    with gr.Row():
        w["checkpoint"] = gr.Dropdown([], label="Checkpoint", elem_id="train_checkpoint", scale=2,
                                     allow_custom_value=True)
        w["load_in_chat"] = gr.Button("Load in Chat", elem_id="train_load_in_chat", scale=1)
        w["evaluate"] = gr.Button("Evaluate", elem_id="train_evaluate", scale=1)
    w["checkpoint_message"] = gr.Markdown(elem_id="train_checkpoint_message")
    w["timer"] = gr.Timer(POLL_SECONDS, active=False)
    return w


def build(ctx) -> None:
    """Two sections, as sub-tabs: LLM (this module) and Images (:mod:`modules.ui.tabs.train_images`); they
    share the device queue, the model manager and the rule of one training at a time."""
    with gr.Tabs(elem_id="train_sections"):
        with gr.Tab("LLM", id="train_llm", elem_id="train_llm"):
            build_llm(ctx)
        if getattr(ctx, "training_images", None) is not None:
            with gr.Tab("Images", id="train_images", elem_id="train_images"):
                from modules.ui.tabs import train_images
                train_images.build(ctx)


def build_llm(ctx) -> None:
    controller: TrainController = ctx.training
    w = _build_widgets(controller)
    hyper_names = [n for n in controller.defaults() if n in w]
    chat_model = (ctx.ui.components.get("chat_model") if ctx.ui is not None else None)

    live_outputs = [w["progress"], *(w[f"plot_{n}"] for n in PLOTS), w["checkpoints"], w["checkpoint"], w["timer"]]

    def show(run: str | None, checkpoint: str | None = None) -> list:
        view = controller.view(run)
        rows = controller.checkpoints(run)
        names = [r["name"] for r in rows]
        plots = [_frame(getattr(view, attr), y, color) for attr, y, _, color in PLOTS.values()]
        table = pd.DataFrame(rows, columns=CHECKPOINT_COLUMNS)
        return [_progress_html(view), *plots, table,
                gr.update(choices=names, value=checkpoint if checkpoint in names else (names[0] if names else None)),
                gr.Timer(active=view.live)]

    def extra_lines(text: str) -> list[str]:
        return [line.strip() for line in (text or "").splitlines() if line.strip()]

    def start(dataset, size, init_from, run_name, extra, *hyper):
        try:
            run = controller.start(dataset=dataset, size=size, init_from=init_from, run_name=run_name,
                                   hyper=dict(zip(hyper_names, hyper)), extra=extra_lines(extra))
        except TrainTabError as exc:
            return [str(exc), gr.update(), *show(controller.current_run())]
        return [f"Started {run}. {QUEUE_NOTE}", gr.update(choices=controller.run_choices(), value=run), *show(run)]

    w["start"].click(start, [w["dataset"], w["size"], w["init_from"], w["run_name"], w["extra"],
                             *(w[n] for n in hyper_names)], [w["message"], w["run"], *live_outputs])

    def resume(run, extra):
        try:
            controller.resume(run, extra=extra_lines(extra))
        except TrainTabError as exc:
            return [str(exc), *show(run)]
        return [f"Resuming {run} from its latest checkpoint.", *show(run)]

    w["resume"].click(resume, [w["run"], w["extra"]], [w["message"], *live_outputs])
    w["stop"].click(controller.stop, None, w["message"])
    w["run"].input(show, [w["run"], w["checkpoint"]], live_outputs, queue=False)
    w["timer"].tick(show, [w["run"], w["checkpoint"]], live_outputs, queue=False, show_progress="hidden")

    def refresh():
        return [gr.update(choices=controller.dataset_choices()), gr.update(choices=controller.source_choices()),
                gr.update(choices=["", *controller.model_choices()])]

    w["refresh"].click(refresh, None, [w["dataset"], w["sources"], w["init_from"]], queue=False)
    for trigger in (w["size"].change, w["dataset"].change):
        trigger(controller.size_note, [w["size"], w["dataset"]], w["size_note"], queue=False)

    def prepare(name, sources, vocab_size, seq_len):
        try:
            text = controller.prepare_dataset(name, sources or [], vocab_size=int(vocab_size or 0),
                                              seq_len=int(seq_len or 0))
        except TrainTabError as exc:
            return str(exc), gr.update()
        return text, gr.update(choices=controller.dataset_choices(), value=(name or "").strip())

    w["prepare"].click(prepare, [w["dataset_name"], w["sources"], w["vocab_size"], w["data_seq_len"]],
                       [w["prepare_status"], w["dataset"]])

    # -- checkpoints: Load in Chat refreshes the Chat tab's model list; Evaluate keeps its result per checkpoint
    def load_in_chat(run, checkpoint, *current_chat_model):
        try:
            name = controller.load_in_chat(run, checkpoint)
        except TrainTabError as exc:
            return [str(exc)] + ([gr.update()] if chat_model is not None else [])
        message = f"Added models/LLM/{name}: pick it in the Chat tab's model list."
        if chat_model is None:
            return [message]
        names = ctx.llm.model_names()
        current = current_chat_model[0] if current_chat_model else None
        return [message, gr.update(choices=names, value=current if current in names else name)]

    w["load_in_chat"].click(load_in_chat, [w["run"], w["checkpoint"], *([chat_model] if chat_model else [])],
                            [w["checkpoint_message"], *([chat_model] if chat_model else [])])

    def evaluate(run, checkpoint):
        try:
            result = controller.evaluate(run, checkpoint)
        except TrainTabError as exc:
            return [str(exc), *show(run, checkpoint)]
        return [f"{checkpoint}: perplexity {result['ppl']:.3f} on {result['tokens']} held-out tokens "
                f"({result['sequences']} sequences)", *show(run, checkpoint)]

    w["evaluate"].click(evaluate, [w["run"], w["checkpoint"]], [w["checkpoint_message"], *live_outputs])

    def page_load():
        """Reload mid-run: the lists as they are now, and the live (or newest) run's plots and progress."""
        run = controller.current_run()
        return [gr.update(choices=controller.dataset_choices()), gr.update(choices=controller.run_choices(), value=run),
                *show(run)]

    gr.on(triggers=None, fn=page_load, inputs=None, outputs=[w["dataset"], w["run"], *live_outputs], queue=False)

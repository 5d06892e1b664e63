"""The Chat tab's controller without a browser: the real LLMService on the tiny fixture model."""
from __future__ import annotations

import json

import pytest

from modules.llm.chat_controller import ChatController, ChatSession, ReplySettings, display
from modules.llm.sampling import SETTINGS_FIELDS, setting_key

MODEL = "tiny-llama-gqa"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from modules.fixtures import llm as fixture
    data = tmp_path_factory.mktemp("chat-controller")
    fixture.write(data)
    return data


@pytest.fixture
def ctx(make_ctx, tmp_path, data_dir):
    data = tmp_path / "data"  # a fresh chats/ folder per test; the models are shared
    (data / "models").mkdir(parents=True)
    (data / "models" / "LLM").symlink_to(data_dir / "models" / "LLM")
    return make_ctx(data_dir=data)


@pytest.fixture
def controller(ctx):
    return ChatController(ctx.llm, ctx.settings)


def opts(max_new=8, **sampling):
    return ReplySettings(model=MODEL, system_prompt="Be brief.",
                         sampling={"temperature": 0, "max_new_tokens": max_new, **sampling}, owner="session:t")


def saved_files(ctx):
    return sorted((ctx.paths.chats_dir).glob("*.json"))


def test_send_streams_the_reply_and_saves_the_chat_first(ctx, controller):
    session = ChatSession()
    assert controller.take_input(session, "  Hello there  ") == ""  # the box empties at once
    views = list(controller.send(session, opts(12, ignore_eos=True)))
    assert views[0].messages == [{"role": "user", "content": "Hello there"}]
    assert views[1].saved_choices == [("Hello there", session.chat_id)]  # saved with its first message
    streamed = [v.messages[-1]["content"] for v in views[2:-1]]
    final = views[-1].messages[-1]
    assert len(streamed) >= 2 and all(final["content"].startswith(t) for t in streamed)
    assert final["meta"]["tokens"] == 12 and final["meta"]["finish_reason"] == "length"
    (path,) = saved_files(ctx)
    saved = json.loads(path.read_text(encoding="utf-8"))
    assert saved["messages"] == session.messages and saved["system_prompt"] == "Be brief."
    assert views[-1].saved_choices == [("Hello there", session.chat_id)] and session.run is None
    assert "12 tokens" in display(session.messages)[-1]["content"]


def test_empty_message_does_nothing(ctx, controller):
    session = ChatSession()
    assert [v.messages for v in controller.send(session, opts(), text="   ")] == [[]]
    assert saved_files(ctx) == []


def test_stop_cuts_only_this_sessions_reply_and_keeps_it(ctx, controller):
    mine, other = ChatSession(), ChatSession()
    mine_views = controller.send(mine, opts(200, ignore_eos=True), text="Tell me a long story")
    other_views = controller.send(other, opts(40, ignore_eos=True), text="And me another")
    for view in mine_views:
        if view.messages[-1]["role"] == "assistant":  # the reply is streaming: press Stop
            controller.stop(mine)
            break
    other_final = list(other_views)[-1].messages[-1]
    mine_final = list(mine_views)[-1].messages[-1]
    assert mine_final["meta"]["finish_reason"] == "interrupted" and mine_final["meta"]["tokens"] < 200
    assert other_final["meta"] == {**other_final["meta"], "finish_reason": "length", "tokens": 40}
    assert "stopped" in display([mine_final])[0]["content"]
    saved = json.loads((ctx.paths.chats_dir / f"{mine.chat_id}.json").read_text(encoding="utf-8"))
    assert saved["messages"][-1]["content"] == mine_final["content"]  # the partial reply was saved


def test_stop_pressed_before_the_reply_starts(controller):
    session = ChatSession()
    controller.take_input(session, "Stop me early")
    controller.stop(session)  # e.g. while the model is still loading
    final = list(controller.send(session, opts(100, ignore_eos=True)))[-1].messages[-1]
    assert final["meta"]["finish_reason"] == "interrupted" and final["meta"]["tokens"] < 100
    controller.arm(session)  # the next request starts fresh
    again = list(controller.regenerate(session, opts(5, ignore_eos=True)))[-1].messages[-1]
    assert again["meta"]["finish_reason"] == "length"


def test_regenerate_continue_and_their_errors(controller):
    session = ChatSession()
    assert "⚠️" in list(controller.regenerate(session, opts()))[-1].notice
    assert "⚠️" in list(controller.continue_reply(session, opts()))[-1].notice
    list(controller.send(session, opts(6, ignore_eos=True), text="Hi"))
    first = session.messages[-1]["content"]
    list(controller.regenerate(session, opts(6, ignore_eos=True, temperature=1.0, seed=3)))
    assert [m["role"] for m in session.messages] == ["user", "assistant"]
    assert session.messages[-1]["meta"]["seed"] == 3
    replaced = session.messages[-1]["content"]
    list(controller.continue_reply(session, opts(4, ignore_eos=True)))
    assert len(session.messages) == 2 and session.messages[-1]["content"].startswith(replaced)
    assert session.messages[-1]["meta"]["tokens"] == 4 and first  # extended, not replaced


def test_errors_are_notices_and_the_conversation_stays(controller):
    session = ChatSession()
    view = list(controller.send(session, ReplySettings(model="nope"), text="Hi"))[-1]
    assert "no LLM model named 'nope'" in view.notice and view.messages == [{"role": "user", "content": "Hi"}]


def test_saved_chats_open_rename_remove_last_new_and_delete(ctx, controller):
    session = ChatSession()
    list(controller.send(session, opts(4), text="First question"))
    list(controller.send(session, opts(4), text="Second question"))
    chat_id = session.chat_id
    view = controller.remove_last(session, opts())
    assert view.input_text == "Second question" and len(session.messages) == 2
    assert controller.new_chat(session).messages == [] and session.chat_id is None
    other = ChatSession()
    opened = controller.open(other, chat_id)
    assert opened.messages == other.messages and len(other.messages) == 2 and opened.system_prompt == "Be brief."
    assert opened.title == "First question"
    assert "⚠️" in controller.rename(ChatSession(), "x").notice  # not saved yet
    renamed = controller.rename(other, "  Robot story ")
    assert renamed.notice == "Renamed to “Robot story”." and renamed.saved_choices == [("Robot story", chat_id)]
    assert "⚠️" in controller.open(ChatSession(), "no-such-chat").notice
    deleted = controller.delete(other)
    assert deleted.notice == "Chat deleted." and deleted.saved_choices == [] and other.messages == []
    assert saved_files(ctx) == [] and "⚠️" in controller.delete(other).notice


def test_sliders_use_the_settings_ranges(ctx, controller):
    """Regression (issue 7.3/7.10): a value the settings accept must be one the Chat sliders accept (a
    repetition penalty of 0.9 made every Send fail with "less than minimum value 1")."""
    ctx.settings.set("llm.repetition_penalty", 0.9)
    sliders = controller.sliders()
    assert list(sliders) == list(SETTINGS_FIELDS)
    for name, slider in sliders.items():
        spec = ctx.settings.spec(setting_key(name))
        assert (slider.minimum, slider.maximum, slider.label) == (spec.minimum, spec.maximum, spec.label)
        assert slider.minimum <= slider.value <= slider.maximum
    assert sliders["repetition_penalty"].value == 0.9 and sliders["max_new_tokens"].step == 1
    assert controller.defaults()["repetition_penalty"] == 0.9


def test_params_by_name(ctx, controller):
    params = controller.params({"temperature": 0.5, "top_k": 12.0, "seed": -1, "stop": "END\n\nSTOP",
                                "ignore_eos": 1})
    assert (params.temperature, params.top_k, params.seed, params.stop, params.ignore_eos) == \
        (0.5, 12, None, ["END", "STOP"], True)
    assert params.max_new_tokens == ctx.settings.get("llm.max_new_tokens")  # missing: the setting
    assert controller.params({"seed": 7}).seed == 7


def test_the_reply_job_carries_the_sessions_owner(ctx, controller):
    session = ChatSession()
    owners = []
    for _view in controller.send(session, opts(200, ignore_eos=True), text="Whose job is this?"):
        if session.run is not None and not owners:
            owners = [j.owner for j in ctx.jobs.find(kind="llm")]
            controller.stop(session)
    assert owners == ["session:t"] and session.messages[-1]["meta"]["finish_reason"] == "interrupted"


def test_every_sampling_setting_has_a_spec(ctx):
    for name in SETTINGS_FIELDS:
        assert ctx.settings.spec(setting_key(name)).key == setting_key(name)

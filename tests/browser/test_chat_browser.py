"""The Chat tab in headless Chromium against the real server: load, streamed reply, Stop, Regenerate,
Continue, saved chats, the "oldest turns dropped" notice.

Two fixture-format models: the standard tiny one (256-token context, for the overflow notice) and a
wider one written here ("slow-llama", ~50 tokens/s on a CPU) so that streaming and Stop can be watched.
"""
import json
import time

import pytest

from server_utils import open_page, start_server

BOTS = "#chat_chatbot .message.bot"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from modules.fixtures import llm as fixture
    data = tmp_path_factory.mktemp("browser-chat")
    fixture.write(data)
    fixture.write_model(data / "models" / "LLM" / "slow-llama",
                        dict(fixture.FIXTURE_MODELS["tiny-llama-gqa"], hidden_size=512, intermediate_size=1408,
                             num_hidden_layers=8, num_attention_heads=8, max_position_embeddings=1024))
    srv = start_server(data, "--api")
    yield srv, data
    srv.stop()


@pytest.fixture(scope="module")
def page(server):
    with open_page(server[0].url) as pg:
        pg.get_by_role("tab", name="Chat", exact=True).click()
        pg.locator("#chat_send").wait_for(timeout=60000)
        yield pg


def last_reply(page) -> str:
    bots = page.locator(BOTS)
    return bots.last.inner_text() if bots.count() else ""


def watch_reply(page, done: str, timeout: float = 60) -> list[str]:
    """Poll the last reply until *done* appears in it; return every distinct text seen on the way."""
    seen, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = last_reply(page)
        if not seen or text != seen[-1]:
            seen.append(text)
        if done in text:
            return seen
        time.sleep(0.03)
    raise AssertionError(f"{done!r} never appeared; last reply: {seen[-1] if seen else None!r}")


def send(page, text):
    page.locator("#chat_input textarea").fill(text)
    page.locator("#chat_send").click()


def set_max_new_tokens(page, n):
    box = page.locator("#chat_max_new_tokens input[type=number]")
    if not box.is_visible():
        page.get_by_text("Parameters").click()
    box.fill(str(n))
    box.press("Enter")


def pick(page, dropdown, option):
    page.locator(f"{dropdown} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def test_load_model_and_stream_a_reply(page, server):
    assert page.locator("#chat_model input").input_value() == "slow-llama"  # the first folder
    page.locator("#chat_load_model").click()
    page.wait_for_function("document.querySelector('#chat_model_status').innerText.includes('Loaded')",
                           timeout=60000)
    assert "context 1024 tokens" in page.locator("#chat_model_status").inner_text()
    set_max_new_tokens(page, 40)
    send(page, "Hello! How are you today?")
    seen = watch_reply(page, "tokens/s")
    partial = [t for t in seen if t and "tokens/s" not in t]
    assert len(partial) >= 2, f"the reply did not stream: {seen}"  # it grew in several steps
    assert "Hello! How are you today?" in page.locator("#chat_chatbot .message.user").first.inner_text()
    assert page.locator("#chat_input textarea").input_value() == ""
    chats = list((server[1] / "chats").glob("*.json"))
    assert len(chats) == 1
    saved = json.loads(chats[0].read_text(encoding="utf-8"))
    assert saved["messages"][0]["content"] == "Hello! How are you today?"
    assert saved["messages"][1]["meta"]["tokens"] > 0
    assert page.locator("#chat_saved input").input_value() == "Hello! How are you today?"


def test_stop_keeps_the_partial_reply(page, server):
    set_max_new_tokens(page, 800)
    page.locator("#chat_ignore_eos input").check()  # no early end: the reply runs until Stop
    send(page, "Once upon a time there was a little robot who wanted to paint the sky.")
    page.wait_for_function(f"document.querySelectorAll('{BOTS}').length >= 2 && "
                           f"[...document.querySelectorAll('{BOTS}')].pop().innerText.trim().length > 0",
                           timeout=60000)
    page.locator("#chat_stop").click()
    seen = watch_reply(page, "tokens/s")
    assert "stopped" in seen[-1]
    assert page.locator(BOTS).count() == 2
    chat = json.loads(next((server[1] / "chats").glob("*.json")).read_text(encoding="utf-8"))
    assert chat["messages"][-1]["meta"]["finish_reason"] == "interrupted"
    assert chat["messages"][-1]["meta"]["tokens"] < 800


def test_stop_right_after_send_with_the_model_unloaded(page):
    """Stop pressed as soon as the message shows, while the reply is loading the model or just starting."""
    page.locator("#chat_unload_model").click()
    page.wait_for_function("document.querySelector('#chat_model_status').innerText.includes('Unloaded')",
                           timeout=30000)
    users, bots = page.locator("#chat_chatbot .message.user").count(), page.locator(BOTS).count()
    send(page, "Stop me early")  # this request loads the model first
    page.wait_for_function(f"document.querySelectorAll('#chat_chatbot .message.user').length === {users + 1}",
                           timeout=30000)
    page.locator("#chat_stop").click()
    page.wait_for_function(f"document.querySelectorAll('{BOTS}').length === {bots + 1} && "
                           f"[...document.querySelectorAll('{BOTS}')].pop().innerText.includes('stopped')",
                           timeout=60000)
    page.locator("#chat_remove_last").click()
    page.wait_for_function(f"document.querySelectorAll('{BOTS}').length === {bots}", timeout=30000)
    page.locator("#chat_input textarea").fill("")


def test_regenerate_replaces_the_last_reply(page, server):
    set_max_new_tokens(page, 30)
    page.locator("#chat_ignore_eos input").uncheck()
    before = last_reply(page)
    page.locator("#chat_regenerate").click()
    page.wait_for_function(f"[...document.querySelectorAll('{BOTS}')].pop().innerText !== {json.dumps(before)}",
                           timeout=60000)
    watch_reply(page, "tokens/s")
    assert page.locator(BOTS).count() == 2
    assert page.locator("#chat_chatbot .message.user").count() == 2
    chat = json.loads(next((server[1] / "chats").glob("*.json")).read_text(encoding="utf-8"))
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant", "user", "assistant"]
    assert chat["messages"][-1]["content"] != before.split("\n")[0]


def test_small_context_model_drops_oldest_turns_with_a_notice(page):
    pick(page, "#chat_model", "tiny-llama-gqa")
    set_max_new_tokens(page, 200)  # keeps half the 256-token context free for the reply
    replies = page.locator(BOTS).count()
    send(page, "What is the capital of France? " * 3)
    page.wait_for_function(f"document.querySelectorAll('{BOTS}').length === {replies + 1}", timeout=30000)
    watch_reply(page, "tokens/s")
    # the earlier exchanges do not fit the tiny model's 256-token context next to this one
    assert "left out of the prompt" in page.locator("#chat_notice").inner_text()
    page.locator("#chat_remove_last").click()
    page.wait_for_function(f"document.querySelectorAll('{BOTS}').length === 2", timeout=30000)
    page.locator("#chat_input textarea").fill("")


def test_remove_last_and_clear(page):
    page.locator("#chat_remove_last").click()
    page.wait_for_function(f"document.querySelectorAll('{BOTS}').length === 1", timeout=30000)
    assert "little robot" in page.locator("#chat_input textarea").input_value()
    page.locator("#chat_clear").click()
    page.wait_for_function(f"document.querySelectorAll('{BOTS}').length === 0", timeout=30000)


def test_saved_chat_reload_rename_delete(page, server):
    chats_dir = server[1] / "chats"
    (chat_file,) = list(chats_dir.glob("*.json"))
    saved = json.loads(chat_file.read_text(encoding="utf-8"))
    page.locator("#chat_saved input").click()
    page.get_by_role("option", name=saved["title"]).click()
    page.wait_for_function(f"document.querySelectorAll('{BOTS}').length === {len(saved['messages']) // 2}",
                           timeout=30000)
    page.locator("#chat_title textarea, #chat_title input").first.fill("Robot story")
    page.locator("#chat_rename").click()
    page.wait_for_function("document.querySelector('#chat_notice').innerText.includes('Renamed')", timeout=30000)
    assert json.loads(chat_file.read_text(encoding="utf-8"))["title"] == "Robot story"
    pick(page, "#chat_model", "slow-llama")  # the long replies above fill the tiny model's context
    set_max_new_tokens(page, 20)
    shown = last_reply(page)
    page.locator("#chat_continue").click()
    deadline = time.monotonic() + 90
    while not (last_reply(page) != shown and "tokens/s" in last_reply(page)):
        notice = page.locator("#chat_notice").inner_text()
        assert "⚠️" not in notice and time.monotonic() < deadline, f"continue failed: {notice!r} {shown!r}"
        time.sleep(0.05)
    before = saved["messages"][-1]["content"]
    assert last_reply(page).startswith(before[:20])  # the reply was extended, not replaced
    page.locator("#chat_delete").click()
    page.wait_for_function("document.querySelector('#chat_notice').innerText.includes('deleted')", timeout=30000)
    assert not chat_file.exists()
    assert page.locator(BOTS).count() == 0


def test_page_load_lists_chats_saved_since_start(page, server):
    from modules.llm.chat_history import ChatStore
    ChatStore(server[1] / "chats").create([{"role": "user", "content": "saved elsewhere"}], title="From the API")
    page.reload(wait_until="load")
    page.get_by_role("tab", name="Chat", exact=True).click()
    page.locator("#chat_saved input").click()
    page.get_by_role("option", name="From the API", exact=True).wait_for(timeout=30000)


def test_two_browser_sessions_are_batched_together(page, server):
    other = page.context.browser.new_page(viewport={"width": 1400, "height": 1000})
    other.goto(server[0].url, wait_until="load")
    for pg in (page, other):
        pg.get_by_role("tab", name="Chat", exact=True).click()
        pick(pg, "#chat_model", "slow-llama")
        set_max_new_tokens(pg, 120)
        pg.locator("#chat_ignore_eos input").check()
    before = server[0].log().count("batch of 2")
    send(page, "First session says hello")
    send(other, "Second session says hello")
    for pg in (page, other):
        pg.wait_for_function(f"document.querySelectorAll('{BOTS}').length === 1 && "
                             f"[...document.querySelectorAll('{BOTS}')].pop().innerText.includes('tokens/s')",
                             timeout=60000)
    other.close()
    # both replies were decoded in one batch (the second joined the first while it was generating)
    assert server[0].log().count("batch of 2") > before


def test_page_load_takes_defaults_from_settings(page, server):
    import httpx
    response = httpx.post(server[0].url + "/sdapi/v1/options", timeout=30,
                          json={"llm.system_prompt": "You are a pirate.", "llm.temperature": 0.25})
    assert response.status_code == 200, response.text
    page.reload(wait_until="load")
    page.get_by_role("tab", name="Chat", exact=True).click()
    page.wait_for_function("document.querySelector('#chat_system_prompt textarea').value === 'You are a pirate.'",
                           timeout=30000)
    page.get_by_text("Parameters").click()
    assert page.locator("#chat_temperature input[type=number]").input_value() == "0.25"

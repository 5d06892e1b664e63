"""The Chat tab in headless Chromium against the real server with the fixture model: load, streamed reply,
Stop, Regenerate, saved chats, the "oldest turns dropped" notice."""
import json
import time

import pytest
from playwright.sync_api import sync_playwright

from server_utils import CHROMIUM_ARGS, chromium_path, start_server

BOTS = "#chat_chatbot .message.bot"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from modules.fixtures import llm as fixture
    data = tmp_path_factory.mktemp("browser-chat")
    fixture.write(data)
    srv = start_server(data)
    yield srv, data
    srv.stop()


@pytest.fixture(scope="module")
def page(server):
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        pg = browser.new_page(viewport={"width": 1400, "height": 1000})
        pg.goto(server[0].url, wait_until="load")
        pg.get_by_role("tab", name="Chat", exact=True).click()
        pg.locator("#chat_send").wait_for(timeout=60000)
        yield pg
        browser.close()


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


def test_load_model_and_stream_a_reply(page, server):
    page.locator("#chat_load_model").click()
    page.wait_for_function("document.querySelector('#chat_model_status').innerText.includes('Loaded')",
                           timeout=60000)
    assert "context 256 tokens" in page.locator("#chat_model_status").inner_text()
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


def test_stop_keeps_the_partial_reply_and_notes_dropped_turns(page, server):
    send(page, "Once upon a time there was a little robot who wanted to paint the sky.")
    page.wait_for_function(f"document.querySelectorAll('{BOTS}').length >= 2 && "
                           f"[...document.querySelectorAll('{BOTS}')].pop().innerText.trim().length > 0",
                           timeout=60000)
    page.locator("#chat_stop").click()
    seen = watch_reply(page, "tokens/s")
    assert "stopped" in seen[-1]
    # the first exchange filled most of the 256-token context, so it was left out of this prompt
    assert "left out of the prompt" in page.locator("#chat_notice").inner_text()
    assert page.locator(BOTS).count() == 2


def test_regenerate_replaces_the_last_reply(page, server):
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
    page.locator("#chat_continue").click()
    before = saved["messages"][-1]["content"]
    seen = watch_reply(page, "tokens/s")
    assert seen[-1].startswith(before[:20])  # the reply was extended, not replaced
    page.locator("#chat_delete").click()
    page.wait_for_function("document.querySelector('#chat_notice').innerText.includes('deleted')", timeout=30000)
    assert not chat_file.exists()
    assert page.locator(BOTS).count() == 0

"""The Chat tab in headless Chromium against the real server: load, streamed reply, Stop, Regenerate,
Continue, saved chats, the "oldest turns dropped" notice.

Two fixture-format models: the standard tiny one (256-token context, for the overflow notice) and a
wider one written here ("slow-llama", ~50 tokens/s on a CPU) so that streaming and Stop can be watched.

Every test opens its own page (a fresh Gradio session: an empty chat), picks its model and parameters,
and finds its saved chat by its own first message, so the tests pass in any order and alone.
"""
import json
import time
import uuid

import pytest
from playwright.sync_api import expect

from server_utils import CHROMIUM_ARGS, chromium_path, start_server

BOTS = "#chat_chatbot .message.bot"
USERS = "#chat_chatbot .message.user"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from modules.fixtures import llm as fixture
    data = tmp_path_factory.mktemp("browser-chat")
    fixture.write(data)
    fixture.write_model(data / "models" / "LLM" / "slow-llama",
                        dict(fixture.FIXTURE_MODELS["tiny-llama-gqa"], hidden_size=512, intermediate_size=1408,
                             num_hidden_layers=8, num_attention_heads=8, max_position_embeddings=1024))
    # fp32 pinned: --precision auto would load slow-llama (512 wide) in bf16 on AVX-512 BF16 CPUs, where a reply
    # may differ by a token between batched and alone (rounding); fp32 keeps "equals the request run alone" exact
    srv = start_server(data, "--api", "--precision", "fp32")
    yield srv, data
    srv.stop()


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        chromium = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


def open_chat(browser, url):
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    page.set_default_timeout(60_000)
    page.goto(url, wait_until="load", timeout=120_000)
    page.wait_for_selector("#tabs", timeout=120_000)
    page.get_by_role("tab", name="Chat", exact=True).click()
    page.locator("#chat_send").wait_for(timeout=60000)
    return page


@pytest.fixture
def page(browser, server):
    pg = open_chat(browser, server[0].url)
    yield pg
    pg.close()


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


def wait_replies(page, n: int, timeout: int = 60000) -> None:
    """Wait until the chat shows *n* finished replies."""
    page.wait_for_function(f"document.querySelectorAll('{BOTS}').length === {n} && "
                           f"[...document.querySelectorAll('{BOTS}')].pop().innerText.includes('tokens/s')",
                           timeout=timeout)


def send(page, text):
    page.locator("#chat_input textarea").fill(text)
    page.locator("#chat_send").click()


def set_max_new_tokens(page, n):
    box = page.locator("#chat_max_new_tokens input[type=number]")
    if not box.is_visible():
        page.get_by_text("Parameters").click()
    box.fill(str(n))
    box.press("Enter")


def set_ignore_eos(page, on: bool):
    box = page.locator("#chat_ignore_eos input")
    if not box.is_visible():
        page.get_by_text("Parameters").click()
    box.set_checked(on)


def pick(page, dropdown, option):
    page.locator(f"{dropdown} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def unique(text: str) -> str:
    return f"{text} ({uuid.uuid4().hex[:6]})"


def saved_chat(data_dir, first_message: str) -> tuple:
    """(path, content) of the saved chat that starts with *first_message*."""
    for path in (data_dir / "chats").glob("*.json"):
        chat = json.loads(path.read_text(encoding="utf-8"))
        if chat["messages"] and chat["messages"][0]["content"] == first_message:
            return path, chat
    raise AssertionError(f"no saved chat starts with {first_message!r}")


def test_load_model_and_stream_a_reply(page, server):
    pick(page, "#chat_model", "slow-llama")
    page.locator("#chat_load_model").click()
    page.wait_for_function("document.querySelector('#chat_model_status').innerText.includes('Loaded')",
                           timeout=60000)
    assert "context 1024 tokens" in page.locator("#chat_model_status").inner_text()
    set_max_new_tokens(page, 40)
    text = unique("Hello! How are you today?")
    send(page, text)
    seen = watch_reply(page, "tokens/s")
    partial = [t for t in seen if t and "tokens/s" not in t]
    assert len(partial) >= 2, f"the reply did not stream: {seen}"  # it grew in several steps
    assert text in page.locator(USERS).first.inner_text()
    assert page.locator("#chat_input textarea").input_value() == ""
    _path, saved = saved_chat(server[1], text)
    assert saved["messages"][1]["meta"]["tokens"] > 0
    assert page.locator("#chat_saved input").input_value() == saved["title"]


def test_stop_keeps_the_partial_reply(page, server):
    pick(page, "#chat_model", "slow-llama")
    set_max_new_tokens(page, 800)
    set_ignore_eos(page, True)  # no early end: the reply runs until Stop
    text = unique("Once upon a time there was a little robot who wanted to paint the sky.")
    send(page, text)
    page.wait_for_function(f"document.querySelectorAll('{BOTS}').length === 1 && "
                           f"[...document.querySelectorAll('{BOTS}')].pop().innerText.trim().length > 0",
                           timeout=60000)
    page.locator("#chat_stop").click()
    seen = watch_reply(page, "tokens/s")
    assert "stopped" in seen[-1]
    assert page.locator(BOTS).count() == 1
    _path, chat = saved_chat(server[1], text)
    assert chat["messages"][-1]["meta"]["finish_reason"] == "interrupted"
    assert chat["messages"][-1]["meta"]["tokens"] < 800


def test_stop_right_after_send_with_the_model_unloaded(page):
    """Stop pressed as soon as the message shows, while the reply is loading the model or just starting."""
    pick(page, "#chat_model", "slow-llama")
    set_max_new_tokens(page, 800)
    set_ignore_eos(page, True)
    page.locator("#chat_unload_model").click()
    page.wait_for_function("document.querySelector('#chat_model_status').innerText.match(/Unloaded|not loaded/)",
                           timeout=30000)
    send(page, unique("Stop me early"))  # this request loads the model first
    page.wait_for_function(f"document.querySelectorAll('{USERS}').length === 1", timeout=30000)
    page.locator("#chat_stop").click()
    page.wait_for_function(f"document.querySelectorAll('{BOTS}').length === 1 && "
                           f"[...document.querySelectorAll('{BOTS}')].pop().innerText.includes('stopped')",
                           timeout=60000)


def test_regenerate_replaces_the_last_reply(page, server):
    pick(page, "#chat_model", "slow-llama")
    set_max_new_tokens(page, 30)
    text = unique("Tell me about the sea")
    send(page, text)
    wait_replies(page, 1)
    before = last_reply(page)
    page.locator("#chat_regenerate").click()
    page.wait_for_function(f"[...document.querySelectorAll('{BOTS}')].pop().innerText !== {json.dumps(before)}",
                           timeout=60000)
    watch_reply(page, "tokens/s")
    assert page.locator(BOTS).count() == 1 and page.locator(USERS).count() == 1
    _path, chat = saved_chat(server[1], text)
    assert [m["role"] for m in chat["messages"]] == ["user", "assistant"]
    assert chat["messages"][-1]["content"] != before.split("\n")[0]


def test_small_context_model_drops_oldest_turns_with_a_notice(page):
    pick(page, "#chat_model", "tiny-llama-gqa")
    set_max_new_tokens(page, 60)
    set_ignore_eos(page, True)
    send(page, unique("Once upon a time there was a little robot who wanted to paint the sky. " * 2))
    wait_replies(page, 1)
    set_max_new_tokens(page, 200)  # keeps half the 256-token context free for the reply
    send(page, "What is the capital of France? " * 3)
    wait_replies(page, 2)
    # the first exchange does not fit the tiny model's 256-token context next to this one
    assert "left out of the prompt" in page.locator("#chat_notice").inner_text()


def test_remove_last_and_clear(page):
    pick(page, "#chat_model", "tiny-llama-gqa")
    set_max_new_tokens(page, 10)
    text = unique("A little robot")
    send(page, text)
    wait_replies(page, 1)
    page.locator("#chat_remove_last").click()
    page.wait_for_function(f"document.querySelectorAll('{BOTS}').length === 0", timeout=30000)
    assert page.locator("#chat_input textarea").input_value() == text  # back in the box for editing
    page.locator("#chat_send").click()
    wait_replies(page, 1)
    page.locator("#chat_clear").click()
    page.wait_for_function(f"document.querySelectorAll('{BOTS}').length === 0", timeout=30000)
    assert page.locator("#chat_saved input").input_value() == ""


def test_saved_chat_reload_rename_delete(browser, server):
    from modules.llm.chat_history import ChatStore
    title = unique("Robot chat")
    reply = "The little robot painted the sky blue, and then"
    chat = ChatStore(server[1] / "chats").create(
        [{"role": "user", "content": "Tell me about the robot"}, {"role": "assistant", "content": reply}],
        title=title)
    page = open_chat(browser, server[0].url)  # opened after the chat was written: the list has it
    try:
        pick(page, "#chat_saved", title)
        page.wait_for_function(f"document.querySelectorAll('{BOTS}').length === 1", timeout=30000)
        title_box = page.locator("#chat_title textarea, #chat_title input").first
        # the opened chat fills the title box: wait for that before typing, or the two can interleave
        # (seen on a loaded machine: "Robot chat (…)Robot story (…)")
        expect(title_box).to_have_value(title, timeout=30000)
        new_title = unique("Robot story")
        title_box.fill(new_title)
        expect(title_box).to_have_value(new_title, timeout=30000)
        page.locator("#chat_rename").click()
        page.wait_for_function("document.querySelector('#chat_notice').innerText.includes('Renamed')",
                               timeout=30000)
        chat_file = server[1] / "chats" / f"{chat.id}.json"
        assert json.loads(chat_file.read_text(encoding="utf-8"))["title"] == new_title
        pick(page, "#chat_model", "slow-llama")
        set_max_new_tokens(page, 20)
        page.locator("#chat_continue").click()
        deadline = time.monotonic() + 90
        while not (last_reply(page) != reply and "tokens/s" in last_reply(page)):
            notice = page.locator("#chat_notice").inner_text()
            assert "⚠️" not in notice and time.monotonic() < deadline, f"continue failed: {notice!r}"
            time.sleep(0.05)
        assert last_reply(page).startswith(reply[:20])  # the reply was extended, not replaced
        page.locator("#chat_delete").click()
        page.wait_for_function("document.querySelector('#chat_notice').innerText.includes('deleted')",
                               timeout=30000)
        assert not chat_file.exists()
        assert page.locator(BOTS).count() == 0
    finally:
        page.close()


def test_page_load_lists_chats_saved_since_start(page, server):
    from modules.llm.chat_history import ChatStore
    title = unique("From the API")
    ChatStore(server[1] / "chats").create([{"role": "user", "content": "saved elsewhere"}], title=title)
    page.reload(wait_until="load")
    page.get_by_role("tab", name="Chat", exact=True).click()
    page.locator("#chat_saved input").click()
    page.get_by_role("option", name=title, exact=True).wait_for(timeout=30000)


def test_two_browser_sessions_are_batched_together(browser, page, server):
    other = open_chat(browser, server[0].url)
    try:
        for pg in (page, other):
            pick(pg, "#chat_model", "slow-llama")
            set_max_new_tokens(pg, 120)
            set_ignore_eos(pg, True)
        before = server[0].log().count("2 running")
        send(page, unique("First session says hello"))
        send(other, unique("Second session says hello"))
        for pg in (page, other):
            wait_replies(pg, 1)
    finally:
        other.close()
    # both replies were decoded in one batch (the second joined the first while it was generating)
    assert server[0].log().count("2 running") > before


def test_page_load_takes_defaults_from_settings(page, server):
    import httpx
    url = server[0].url + "/sdapi/v1/options"
    original = httpx.get(url, timeout=30).json()
    try:
        response = httpx.post(url, timeout=30, json={"llm.system_prompt": "You are a pirate.",
                                                     "llm.temperature": 0.25, "llm.repetition_penalty": 0.9})
        assert response.status_code == 200, response.text
        page.reload(wait_until="load")
        page.get_by_role("tab", name="Chat", exact=True).click()
        page.wait_for_function(
            "document.querySelector('#chat_system_prompt textarea').value === 'You are a pirate.'", timeout=30000)
        page.get_by_text("Parameters").click()
        assert page.locator("#chat_temperature input[type=number]").input_value() == "0.25"
        # a repetition penalty the settings accept is one the slider accepts: Send works (issue 7.3)
        assert page.locator("#chat_repetition_penalty input[type=number]").input_value() == "0.9"
        set_max_new_tokens(page, 5)
        send(page, unique("Ahoy"))
        wait_replies(page, 1)
        assert "⚠️" not in page.locator("#chat_notice").inner_text()
    finally:  # the other tests expect the defaults
        httpx.post(url, timeout=30, json={k: original[k] for k in
                                          ("llm.system_prompt", "llm.temperature", "llm.repetition_penalty")})


def set_temperature(page, value: float):
    box = page.locator("#chat_temperature input[type=number]")
    if not box.is_visible():
        page.get_by_text("Parameters").click()
    box.fill(str(value))
    box.press("Enter")


def test_two_tabs_and_an_api_stream_at_once_stop_leaves_the_others_running(browser, page, server):
    """Issue 11's "done when": two browser tabs chat while a third client streams through the ``openai`` client;
    Stop in one tab ends only that reply, and every finished reply equals the same request run alone."""
    import threading

    from openai import OpenAI

    client = OpenAI(base_url=server[0].url + "/v1", api_key="unused", max_retries=0, timeout=120)
    settings = client._client.get(server[0].url + "/sdapi/v1/options").json()
    other = open_chat(browser, server[0].url)
    streamed: dict = {}
    api_messages = [{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}]
    api_params = dict(model="slow-llama", max_tokens=80, temperature=0, seed=3)

    def stream_through_api():
        parts, finish = [], None
        for chunk in client.chat.completions.create(messages=api_messages, stream=True, **api_params):
            if chunk.choices:
                parts.append(chunk.choices[0].delta.content or "")
                finish = chunk.choices[0].finish_reason or finish
        streamed.update(text="".join(parts), finish=finish, chunks=len(parts))

    try:
        for pg, n in ((page, 800), (other, 60)):
            pick(pg, "#chat_model", "slow-llama")
            # the page's load event fills the parameters from the settings and may land after the page shows:
            # set them until they stick
            for _attempt in range(10):
                set_max_new_tokens(pg, n)
                set_temperature(pg, 0)
                time.sleep(0.5)
                if (pg.locator("#chat_max_new_tokens input[type=number]").input_value() == str(n)
                        and float(pg.locator("#chat_temperature input[type=number]").input_value()) == 0):
                    break
            expect(pg.locator("#chat_max_new_tokens input[type=number]")).to_have_value(str(n))
        set_ignore_eos(page, True)  # the first tab's reply runs until Stop
        stopped_text, kept_text = unique("Stop this one, please."), unique("Keep this one going.")
        send(page, stopped_text)
        page.wait_for_function(f"[...document.querySelectorAll('{BOTS}')].pop()?.innerText.trim().length > 0",
                               timeout=60000)
        api = threading.Thread(target=stream_through_api)
        api.start()
        send(other, kept_text)
        other.wait_for_function(f"[...document.querySelectorAll('{BOTS}')].pop()?.innerText.trim().length > 0",
                                timeout=60000)
        page.locator("#chat_stop").click()
        assert "stopped" in watch_reply(page, "tokens/s")[-1]
        wait_replies(other, 1, timeout=120000)
        api.join(timeout=180)
        assert not api.is_alive(), "the API stream did not finish"
    finally:
        other.close()

    _path, stopped = saved_chat(server[1], stopped_text)
    assert stopped["messages"][-1]["meta"]["finish_reason"] == "interrupted"
    _path, kept = saved_chat(server[1], kept_text)
    assert kept["messages"][-1]["meta"]["finish_reason"] in ("stop", "length")
    assert streamed["finish"] in ("stop", "length") and streamed["chunks"] >= 2

    # each reply equals the same request run alone (greedy: the batch must not change a token)
    alone = client.chat.completions.create(messages=api_messages, **api_params)
    assert streamed["text"] == alone.choices[0].message.content
    # the tab adds the settings' system prompt and repetition penalty (greedy ignores top-k/top-p/min-p)
    # (as many tokens as the tab's reply took: a reply that ended on EOS ends there alone too)
    tab_alone = client.chat.completions.create(
        model="slow-llama", max_tokens=kept["messages"][-1]["meta"]["tokens"], temperature=0,
        messages=[{"role": "system", "content": settings["llm.system_prompt"]}, {"role": "user", "content": kept_text}],
        extra_body={"repetition_penalty": settings["llm.repetition_penalty"]})
    assert kept["messages"][-1]["content"] == tab_alone.choices[0].message.content

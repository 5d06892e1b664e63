"""The Chat tab's speculative-decoding control in headless Chromium: picking the shipped draft for the shipped
chat model turns it on, the reply's stats line shows acceptance and tokens per target pass, and the reply is
the plain greedy one."""
import pytest
from playwright.sync_api import expect

from modules.paths import REPO_DIR
from server_utils import CHROMIUM_ARGS, chromium_path, start_server

REQUEST = "please draw a large red circle in the top left corner on a blue background"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("speculative-ui")
    (data / "settings.yaml").write_text("llm.temperature: 0.0\n", encoding="utf-8")    # greedy replies
    srv = start_server(data, "--models-dir", str(REPO_DIR / "models"))
    yield srv
    srv.stop()


def reply_text(page, n):
    reply = page.locator("#chat_chatbot .message.bot").nth(n)
    expect(reply).to_contain_text("tokens/s", timeout=60_000)
    return reply.inner_text().strip()


def test_draft_dropdown_turns_speculative_decoding_on_and_the_stats_show_it(server):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(server.url, wait_until="load", timeout=120_000)
        page.get_by_role("tab", name="Chat", exact=True).click()
        page.locator("#chat_send").wait_for()
        expect(page.locator("#chat_model input")).to_have_value("atelier-tiny-chat")

        page.locator("#chat_input textarea").fill(REQUEST)
        page.locator("#chat_send").click()
        plain = reply_text(page, 0)
        assert "speculative" not in plain

        page.get_by_text("Speculative decoding", exact=True).click()
        expect(page.locator("#chat_draft_model input")).to_have_value("(off)")
        page.locator("#chat_draft_model input").click()
        page.get_by_role("option", name="atelier-tiny-draft", exact=True).click()
        expect(page.locator("#chat_draft_status")).to_contain_text("atelier-tiny-draft drafts for atelier-tiny-chat")

        page.locator("#chat_regenerate").click()
        expect(page.locator("#chat_chatbot .message.bot").first).to_contain_text("speculative:", timeout=60_000)
        spec = reply_text(page, 0)
        assert "% of drafts accepted" in spec and "tokens per target pass" in spec
        # greedy: the same reply as plain decoding, only the stats line differs
        assert spec.split("tokens/s")[0].rsplit("tokens", 1)[0] == plain.split("tokens/s")[0].rsplit("tokens", 1)[0]
        browser.close()

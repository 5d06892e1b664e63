"""A fresh clone's Chat tab: with nothing but the repository's own models/LLM, the shipped atelier-tiny-chat is
selected and answers a drawing request with a captioned-shapes prompt, in headless Chromium."""
import pytest
from playwright.sync_api import expect

from modules.paths import REPO_DIR
from modules.shapes.vocabulary import parse_caption
from server_utils import CHROMIUM_ARGS, chromium_path, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("fresh-clone")
    srv = start_server(data, "--models-dir", str(REPO_DIR / "models"))
    yield srv
    srv.stop()


def test_fresh_clone_chat_tab_replies_with_the_shipped_model(server):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.set_default_timeout(60_000)
        page.goto(server.url, wait_until="load", timeout=120_000)
        page.get_by_role("tab", name="Chat", exact=True).click()
        page.locator("#chat_send").wait_for()
        expect(page.locator("#chat_model input")).to_have_value("atelier-tiny-chat")
        page.locator("#chat_input textarea").fill("please draw a large red circle in the top left corner on a "
                                                  "blue background")
        page.locator("#chat_send").click()
        reply = page.locator("#chat_chatbot .message.bot").last
        expect(reply).to_contain_text("tokens/s", timeout=60_000)     # the per-reply stats: the reply is done
        text = reply.inner_text().strip()
        caption = text[:text.index("background") + len("background")]   # the per-reply stats follow it
        scene = parse_caption(caption)
        assert scene.background == "blue"
        assert [(o.size, o.colour, o.shape, o.position) for o in scene.objects] == [
            ("large", "red", "circle", "top left")]
        browser.close()

"""Headless Chromium (Debian's, driven by Playwright) against the real server: every tab opens."""
import httpx
import pytest

from server_utils import open_page, start_server


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("browser-app")
    srv = start_server(data, "--api")
    yield srv, data
    srv.stop()


@pytest.fixture(scope="module")
def page(server):
    with open_page(server[0].url) as pg:
        yield pg


def test_every_tab_opens(page, server, tmp_path_factory):
    tabs = page.get_by_role("tab")
    labels = [t.inner_text().strip() for t in tabs.all()]
    for expected in ("Settings", "Extensions", "Troubleshooting", "Word counter"):
        assert expected in labels, labels
    for label in labels:
        page.get_by_role("tab", name=label, exact=True).click()
        panel = page.get_by_role("tabpanel").filter(visible=True)
        panel.first.wait_for(state="visible")
        assert panel.first.inner_text().strip(), f"tab {label!r} is empty"
    shots = tmp_path_factory.mktemp("shots")
    page.screenshot(path=str(shots / "last-tab.png"))


def test_example_extension_tab_works(page):
    page.get_by_role("tab", name="Word counter", exact=True).click()
    page.locator("#example_greeting").wait_for()
    assert "Hello!" in page.locator("#example_greeting").inner_text()
    page.locator("#example_text textarea").fill("the cat and The dog")
    page.locator("#example_count").click()
    page.wait_for_function("document.querySelector('#example_result').innerText.includes('5 words')")
    assert "the (2)" in page.locator("#example_result").inner_text()
    assert page.evaluate("window.atelierExampleLoaded === true"), "extension JavaScript is injected"


def test_troubleshooting_report_and_settings_save(page, server):
    page.get_by_role("tab", name="Troubleshooting", exact=True).click()
    report = page.locator("#diagnostics_report")
    report.wait_for()
    page.wait_for_function("document.querySelector('#diagnostics_report').innerText.includes('torch:')")
    page.get_by_role("tab", name="Settings", exact=True).click()
    page.locator("#settings_apply").click()
    page.wait_for_function("document.querySelector('#settings_status').innerText.includes('Saved')")
    assert (server[1] / "settings.yaml").exists()


def test_only_output_folders_are_served(server):
    srv, data = server
    image = data / "outputs" / "txt2img-images" / "served.png"
    image.parent.mkdir(parents=True, exist_ok=True)
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    assert httpx.get(f"{srv.url}/gradio_api/file={image}").status_code == 200
    for secret in (data / "settings.yaml", data / "logs" / "atelier.log", "/etc/passwd"):
        assert httpx.get(f"{srv.url}/gradio_api/file={secret}").status_code in (403, 404), secret


def test_login_page_then_the_app(page, tmp_path):
    """With --gradio-auth the browser sees only the login form; a wrong password says so; the right one opens
    the app, whose queue (the Gradio event stream) then works for the logged-in user. (A fresh browser context
    of the module's Chromium: its own cookies, and one Playwright per process.)"""
    srv = start_server(tmp_path, "--gradio-auth", "alice:wonder")
    context = page.context.browser.new_context()
    try:
        login = context.new_page()
        login.set_default_timeout(60_000)
        login.goto(srv.url, wait_until="load")
        login.locator("#login-form").wait_for()
        assert login.locator("#tabs").count() == 0 and "Word counter" not in login.content()
        login.fill("#login-username", "alice")
        login.fill("#login-password", "not-it")
        login.click("#login-submit")
        login.locator("#login-error").wait_for()
        assert "Incorrect username or password" in login.locator("#login-error").inner_text()
        assert login.locator("#login-username").input_value() == "alice", "the name is kept"
        login.fill("#login-password", "wonder")
        login.click("#login-submit")
        login.wait_for_selector("#tabs", timeout=120_000)
        login.get_by_role("tab", name="Word counter", exact=True).click()
        login.locator("#example_text textarea").fill("one two three")
        login.locator("#example_count").click()
        login.wait_for_function("document.querySelector('#example_result').innerText.includes('3 words')")
        login.goto(srv.url + "/logout", wait_until="load")
        login.locator("#login-form").wait_for()
    finally:
        context.close()
        srv.stop()

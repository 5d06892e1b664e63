"""The Quantize tab in headless Chromium: the shipped demo chat model quantized to Q4_K_M, the report table,
then "Load in Chat" and a reply from the quantized file through llama.cpp."""
import re
import shutil

import pytest
from playwright.sync_api import expect

from modules.paths import REPO_DIR
from server_utils import CHROMIUM_ARGS, chromium_path, start_server

pytest.importorskip("llama_cpp", reason="llama-cpp-python is a requirement; its build is broken here")

MODEL = "atelier-tiny-chat"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("quantize-ui")
    shutil.copytree(REPO_DIR / "models" / "LLM" / MODEL, data / "models" / "LLM" / MODEL)
    srv = start_server(data)
    srv.llm_dir = data / "models" / "LLM"
    yield srv
    srv.stop()


def test_quantize_to_q4_k_m_then_chat_with_it(server):
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1100})
        page.set_default_timeout(60_000)
        page.goto(server.url, wait_until="load", timeout=120_000)
        page.get_by_role("tab", name="Quantize", exact=True).click()
        expect(page.locator("#quantize_source input")).to_have_value(MODEL)
        formats = page.locator("#quantize_formats")
        for name in ("Q8_0", "int8"):                         # ticked by default
            formats.get_by_label(name, exact=True).uncheck()
        formats.get_by_label("Q4_K_M", exact=True).check()
        page.locator("#quantize_run").click()
        table = page.locator("#quantize_table")
        expect(table).to_contain_text(f"{MODEL}.Q4_K_M.gguf", timeout=180_000)
        expect(page.locator("#quantize_message")).to_contain_text("Done: 1 format(s)", timeout=60_000)
        assert (server.llm_dir / f"{MODEL}.Q4_K_M.gguf").is_file()
        # the grid's cells in reading order: format, model, backend, size MB, bits/weight, perplexity, change
        row = re.search(rf"Q4_K_M\s+{MODEL}\.Q4_K_M\.gguf\s+llama\.cpp\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+"
                        r"([+-]\d+\.\d+%)", table.inner_text())
        assert row, table.inner_text()
        assert float(row.group(1)) < 8 and 4 < float(row.group(2)) < 8 and float(row.group(3)) > 1

        expect(page.locator("#quantize_row input")).to_have_value(f"{MODEL}.Q4_K_M.gguf")
        page.locator("#quantize_load_in_chat").click()
        expect(page.locator("#quantize_message")).to_contain_text("llama.cpp", timeout=60_000)
        page.locator("#chat_send").wait_for(state="visible")            # "Load in Chat" switched tabs
        expect(page.locator("#chat_model input")).to_have_value(f"{MODEL}.Q4_K_M.gguf")
        page.locator("#chat_input textarea").fill("please draw a small green square in the middle on a white "
                                                  "background")
        page.locator("#chat_send").click()
        reply = page.locator("#chat_chatbot .message.bot").last
        expect(reply).to_contain_text("tokens/s", timeout=60_000)
        assert "background" in reply.inner_text()
        browser.close()

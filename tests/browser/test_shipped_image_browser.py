"""A fresh clone's txt2img tab: with nothing but the repository's own models, the shipped atelier-shapes is
selected and draws a captioned-shapes prompt, whose background the shapes classifier reads back (the model
gets backgrounds right 99% of the time, shapes and cells far less: see its card), in headless Chromium."""
import datetime as dt
import re

import pytest
from PIL import Image
from playwright.sync_api import expect

from modules.paths import REPO_DIR
from modules.shapes.classifier import load_classifier
from modules.shapes.vocabulary import parse_caption
from server_utils import open_page, start_server

PROMPT = "large red circle, center, blue background"
SEED = 7


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("fresh-clone")
    srv = start_server(data, "--models-dir", str(REPO_DIR / "models"))
    yield srv, data
    srv.stop()


def test_fresh_clone_txt2img_draws_with_the_shipped_model(server):
    srv, data = server
    with open_page(srv.url) as page:
        page.get_by_role("tab", name="txt2img", exact=True).click()
        expect(page.locator("#txt2img_checkpoint input")).to_have_value("atelier-shapes")
        page.locator("#txt2img_prompt textarea").fill(PROMPT)
        for name, value in (("width", 64), ("height", 64), ("steps", 20)):
            box = page.locator(f"#txt2img_{name} input[type=number]")
            box.fill(str(value))
            box.press("Enter")
        page.locator("#txt2img_seed input").fill(str(SEED))
        page.locator("#txt2img_generate").click()
        infotext = page.locator("#txt2img_infotext textarea")
        expect(infotext).to_have_value(re.compile(f"Seed: {SEED},"), timeout=120_000)
        assert "Model: atelier-shapes" in infotext.input_value()
        expect(page.locator("#txt2img_gallery img").first).to_be_visible()
    day = dt.date.today().strftime("%Y-%m-%d")
    saved = sorted((data / "outputs" / "txt2img-images" / day).glob(f"[0-9][0-9][0-9][0-9][0-9]-{SEED}.png"))
    assert saved, "the picture is saved in outputs/txt2img-images"
    with Image.open(saved[-1]) as image:
        reading = load_classifier().read([image.convert("RGB")])[0]
    wanted = parse_caption(PROMPT)
    assert reading.background == wanted.background and reading.objects, reading

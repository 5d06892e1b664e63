"""Headless Chromium: the Extras tab upscales an uploaded image with Lanczos (and saves it), and a prompt style
picked in txt2img ends up in the generated image's parameters."""
from __future__ import annotations

import re
import shutil

import pytest
from PIL import Image
from playwright.sync_api import expect

from server_utils import open_page, start_server


@pytest.fixture(scope="module")
def server(fixture_data_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("browser-extras")
    shutil.copytree(fixture_data_dir / "models", data / "models")
    (data / "styles.csv").write_text('name,prompt,negative_prompt\nwatercolor,"{prompt}, watercolor painting",'
                                     "blurry\n", encoding="utf-8")
    srv = start_server(data)
    yield srv, data
    srv.stop()


def test_extras_upscales_an_upload_with_lanczos(server, tmp_path):
    srv, data = server
    source = tmp_path / "small.png"
    Image.new("RGB", (24, 16), (200, 40, 90)).save(source)
    with open_page(srv.url) as page:
        page.get_by_role("tab", name="Extras").click()
        page.locator("#extras_image input[type=file]").set_input_files(str(source))
        box = page.locator("#extras_upscaling_resize input[type=number]")
        box.fill("2")
        box.press("Enter")
        page.locator("#extras_upscaler_1 input").click()
        page.get_by_role("option", name="Lanczos", exact=True).click()
        page.locator("#extras_generate").click()
        expect(page.locator("#extras_gallery img").first).to_be_visible(timeout=120_000)
    saved = list((data / "outputs" / "extras-images").rglob("*.png"))
    assert saved, "the upscaled image is saved in outputs/extras-images"
    with Image.open(saved[-1]) as image:
        assert image.size == (48, 32)


def test_a_style_picked_in_txt2img_reaches_the_parameters(server):
    srv, _data = server
    with open_page(srv.url) as page:
        page.get_by_role("tab", name="txt2img").click()
        page.locator("#txt2img_prompt textarea").fill("a red circle")
        for name, value in (("width", 64), ("height", 64), ("steps", 2)):
            box = page.locator(f"#txt2img_{name} input[type=number]")
            box.fill(str(value))
            box.press("Enter")
        page.locator("#txt2img_styles_accordion").click()
        page.locator("#txt2img_styles input").click()
        page.get_by_role("option", name="watercolor").click()
        page.locator("#txt2img_generate").click()
        infotext = page.locator("#txt2img_infotext textarea")
        expect(infotext).to_have_value(re.compile("a red circle, watercolor painting"), timeout=120_000)
        assert "Negative prompt: blurry" in infotext.input_value()

"""Headless Chromium against the real server with the fixture models: txt2img generates an image,
img2img inpaints a mask painted with the brush, and PNG Info round-trips the parameters."""
from __future__ import annotations

import datetime as dt
import io
import re
import shutil
import time

import numpy as np
import pytest
from PIL import Image
from playwright.sync_api import expect

from server_utils import open_page, start_server


@pytest.fixture(scope="module")
def server(fixture_data_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("browser-images")
    shutil.copytree(fixture_data_dir / "models", data / "models")
    srv = start_server(data)
    yield srv, data
    srv.stop()


@pytest.fixture(scope="module")
def page(server):
    with open_page(server[0].url) as pg:
        yield pg


def set_number(page, elem_id: str, value) -> None:
    box = page.locator(f"#{elem_id} input[type=number]")
    box.fill(str(value))
    box.press("Enter")


def fill_common(page, tab: str, prompt: str, seed: int) -> None:
    page.locator(f"#{tab}_prompt textarea").fill(prompt)
    for name, value in (("width", 64), ("height", 64), ("steps", 3)):
        set_number(page, f"{tab}_{name}", value)
    page.locator(f"#{tab}_seed input").fill(str(seed))


def wait_for_infotext(page, tab: str, needle: str) -> str:
    infotext = page.locator(f"#{tab}_infotext textarea")
    expect(infotext).to_have_value(re.compile(re.escape(needle)), timeout=120_000)
    return infotext.input_value()


def upload_to_editor(page, path, attempts: int = 3, wait_s: float = 15) -> None:
    """Upload *path* into the img2img editor and wait until its canvas shows the (noisy) image.

    Gradio's ImageEditor draws an upload some time after its canvas appears, and on a busy machine it
    now and then drops the upload altogether (the canvas stays blank; painting then paints on nothing).
    A user would reload the page and upload again; so does this helper, at most *attempts* times."""
    editor = page.locator("#img2img_editor")
    for attempt in range(attempts):
        if attempt:
            page.reload(wait_until="load")
            page.wait_for_selector("#tabs")
            page.get_by_role("tab", name="img2img", exact=True).click()
        editor.locator("input[type=file]").set_input_files(str(path))
        canvas = editor.locator("canvas").first
        expect(canvas).to_be_visible()
        deadline = time.monotonic() + wait_s
        while time.monotonic() < deadline:
            shot = Image.open(io.BytesIO(canvas.screenshot())).convert("L")
            if np.asarray(shot, dtype=np.float32).std() > 20:
                return
            page.wait_for_timeout(250)
    raise AssertionError(f"the uploaded image never appeared in the img2img editor ({attempts} uploads)")


def test_txt2img_inpaint_and_png_info_round_trip(page, server, tmp_path):
    srv, data = server
    # -- txt2img --------------------------------------------------------------------------------
    page.get_by_role("tab", name="txt2img", exact=True).click()
    page.locator("#txt2img_checkpoint input").fill("tiny-sd15.safetensors")
    page.keyboard.press("Enter")
    fill_common(page, "txt2img", "a photo of a cat", 4242)
    page.locator("#txt2img_generate").click()
    text = wait_for_infotext(page, "txt2img", "Seed: 4242")
    assert text.startswith("a photo of a cat\nSteps: 3, Sampler: Euler a, Schedule type: Automatic, CFG scale: 7, "
                           "Seed: 4242, Size: 64x64")
    expect(page.locator("#txt2img_gallery img").first).to_be_visible()
    day = dt.date.today().strftime("%Y-%m-%d")
    # the file is NNNNN-SEED.png; NNNNN depends on what other tests of this module generated before
    found = sorted((data / "outputs" / "txt2img-images" / day).glob("[0-9][0-9][0-9][0-9][0-9]-4242.png"))
    assert found, "the txt2img image is saved as NNNNN-4242.png"
    saved = found[-1]
    with Image.open(saved) as image:
        assert image.info["parameters"] == text

    # -- img2img: paint a mask with the brush, inpaint -----------------------------------------------
    init = Image.fromarray(np.random.default_rng(1).integers(0, 255, (64, 64, 3), dtype=np.uint8), "RGB")
    init_path = tmp_path / "init.png"
    init.save(init_path)
    page.get_by_role("tab", name="img2img", exact=True).click()
    upload_to_editor(page, init_path)  # may reload the page: fill the form afterwards
    canvas = page.locator("#img2img_editor canvas").first
    # Select the brush and wait until it is really active (its "Brush Size" control appears): on a busy
    # machine a stroke that starts earlier drags the image instead of painting. Undo turns on once the
    # stroke has registered.
    editor = page.locator("#img2img_editor")
    editor.get_by_role("button", name="Brush").first.click(timeout=5_000)
    expect(editor.locator("button[aria-label='Brush Size']")).to_be_visible(timeout=30_000)
    page.wait_for_timeout(300)
    box = canvas.bounding_box()
    # the image fills the middle of the canvas; stroke down its left quarter
    cx, cy = box["x"] + box["width"] / 2, box["y"] + box["height"] / 2
    side = min(box["width"], box["height"]) * 0.8
    x = cx - side * 0.3
    page.mouse.move(x, cy - side * 0.4)
    page.mouse.down()
    for i in range(1, 21):
        page.mouse.move(x, cy - side * 0.4 + side * 0.8 * i / 20)
    page.mouse.up()
    expect(editor.locator("button[aria-label='Undo']")).to_be_enabled(timeout=30_000)
    fill_common(page, "img2img", "a red house", 77)
    page.locator("#img2img_mask_blur input[type=number]").fill("0")
    page.locator("#img2img_mask_blur input[type=number]").press("Enter")
    page.locator("#img2img_generate").click()
    text2 = wait_for_infotext(page, "img2img", "Seed: 77")
    assert "Denoising strength: 0.75, Mask blur: 0" in text2
    out_path = sorted((data / "outputs" / "img2img-images" / day).glob("[0-9][0-9][0-9][0-9][0-9]-77.png"))[-1]
    with Image.open(out_path) as out_image:
        out = np.asarray(out_image.convert("RGB"), dtype=np.int16)
    src = np.asarray(init, dtype=np.int16)
    changed = np.abs(out - src).sum(axis=2) > 0
    assert changed[:, :32].mean() > changed[:, 40:].mean()  # repainted where the brush went
    assert changed[:, 48:].mean() < 0.05  # the right side is the original image

    # -- PNG Info: read it back and send it to txt2img -------------------------------------------------
    # Empty txt2img's prompt first, from its own tab: when upload_to_editor had to reload the page, the
    # txt2img tab has not been shown since, and Gradio renders a tab's components only once it is shown.
    page.get_by_role("tab", name="txt2img", exact=True).click()
    page.locator("#txt2img_prompt textarea").fill("")
    expect(page.locator("#txt2img_prompt textarea")).to_have_value("")
    page.get_by_role("tab", name="PNG Info", exact=True).click()
    page.locator("#pnginfo_image input[type=file]").set_input_files(str(saved))
    expect(page.locator("#pnginfo_parameters textarea")).to_have_value(text, timeout=30_000)
    page.locator("#pnginfo_send_txt2img").click()
    expect(page.locator("#txt2img_prompt textarea")).to_have_value("a photo of a cat", timeout=30_000)
    expect(page.locator("#txt2img_prompt textarea")).to_be_visible()  # switched to the txt2img tab
    expect(page.locator("#txt2img_seed input")).to_have_value("4242")
    expect(page.locator("#txt2img_steps input[type=number]")).to_have_value("3")
    expect(page.locator("#txt2img_width input[type=number]")).to_have_value("64")


def test_interrupt_reaches_only_the_sessions_own_image(page, server):
    """Issue 7.1: the UI's Interrupt acts on the image that browser session asked for, not on another's."""
    browser = page.context.browser
    mine, other = (browser.new_page(viewport={"width": 1400, "height": 1000}) for _ in range(2))
    try:
        for pg in (mine, other):
            pg.set_default_timeout(60_000)
            pg.goto(server[0].url, wait_until="load", timeout=120_000)
            pg.wait_for_selector("#tabs", timeout=120_000)
            pg.get_by_role("tab", name="txt2img", exact=True).click()
            pg.locator("#txt2img_checkpoint input").fill("tiny-sd15.safetensors")
            pg.keyboard.press("Enter")
            fill_common(pg, "txt2img", "a long job", 5)
            set_number(pg, "txt2img_steps", 25)
            set_number(pg, "txt2img_batch_count", 3)
        status = other.locator("#txt2img_status")
        other.locator("#txt2img_generate").click()
        expect(status).to_contain_text("Step", timeout=120_000)  # the other session's image is being made
        mine.locator("#txt2img_interrupt").click()  # this session has nothing running: nothing to stop
        expect(status).to_contain_text("Done: 3 image(s)", timeout=180_000)
        assert "Interrupted" not in status.inner_text()
        other.locator("#txt2img_generate").click()
        expect(status).to_contain_text("Step", timeout=120_000)
        other.locator("#txt2img_interrupt").click()  # its own Interrupt does stop it
        expect(status).to_contain_text("Interrupted", timeout=120_000)
    finally:
        mine.close()
        other.close()

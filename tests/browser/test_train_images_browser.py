"""The Train tab's image section in headless Chromium against the real server: train a LoRA on the SD 1.5
fixture from a small folder, watch samples appear while it trains, Stop, Resume to the end, "Use in
txt2img", and generate in txt2img with the LoRA (its hash in the infotext shows it was applied)."""
import re
import shutil
import sys
import time
from pathlib import Path

import pytest
from playwright.sync_api import expect

from server_utils import open_page, start_server

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "training_images"))
from shapes_data import write_shapes  # noqa: E402

RUN = "browser-img"
LORA = "browser-lora"


@pytest.fixture(scope="module")
def server(fixture_data_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("browser-train-images")
    shutil.copytree(fixture_data_dir / "models", data / "models")
    write_shapes(data / "datasets" / "shapes", count=6)
    srv = start_server(data)
    yield srv, data
    srv.stop()


def pick(page, dropdown, option):
    page.locator(f"{dropdown} input").click()
    page.get_by_role("option", name=option, exact=True).click()


def set_number(page, name, value):
    page.locator(f"#train_img_{name} input[type=number]").fill(str(value))


def progress(page) -> str:
    return page.locator("#train_img_progress").inner_text()


def wait_progress(page, pattern: str, timeout: float = 120) -> str:
    deadline = time.monotonic() + timeout
    text = ""
    while time.monotonic() < deadline:
        text = progress(page)
        if re.search(pattern, text):
            return text
        time.sleep(0.25)
    raise AssertionError(f"progress never matched {pattern!r}; last: {text!r}")


def step_of(text: str) -> int:
    return int(re.search(r"step (\d+)/", text).group(1))


def samples(page) -> int:
    return page.locator("#train_img_samples img").count()


def test_train_a_lora_stop_resume_and_generate_with_it(server):
    srv, data = server
    extra = "enable_bucket=false"
    with open_page(srv.url) as page:
        page.get_by_role("tab", name="Train", exact=True).click()
        page.get_by_role("tab", name="Images", exact=True).click()
        page.locator("#train_img_start").wait_for()
        pick(page, "#train_img_base", "tiny-sd15 (sd1)")
        pick(page, "#train_img_dataset", "shapes")
        expect(page.locator("#train_img_preview_text")).to_contain_text("6 images", timeout=60_000)
        expect(page.locator("#train_img_preview_gallery img").first).to_be_visible()

        page.locator("#train_img_params_box").get_by_text("Parameters", exact=True).click()
        for name, value in dict(rank=4, alpha=4, unet_lr=0.001, max_steps=100000, batch_size=2, resolution=64,
                                sample_every=3, sample_steps=2, save_every_steps=0).items():
            set_number(page, name, value)
        page.locator("#train_img_sample_prompts textarea").fill("a red square")
        page.locator("#train_img_output_name input, #train_img_output_name textarea").first.fill(LORA)
        page.locator("#train_img_extra textarea").fill(extra)
        page.locator("#train_img_run_name input, #train_img_run_name textarea").first.fill(RUN)
        page.locator("#train_img_start").click()

        first = wait_progress(page, rf"{RUN}: training — step [1-9]\d*/100000 .*it/s.*ETA")
        deadline = time.monotonic() + 120                 # the gallery grows while it trains
        while samples(page) < 1 and time.monotonic() < deadline:
            time.sleep(0.25)
        seen = samples(page)
        assert seen >= 1, "no sample appeared while training"
        while samples(page) <= seen and time.monotonic() < deadline:
            time.sleep(0.25)
        assert samples(page) > seen, "the samples gallery did not grow while training"
        assert page.locator("#train_img_plot_loss canvas, #train_img_plot_loss svg").count() > 0
        assert step_of(progress(page)) > step_of(first)

        page.locator("#train_img_stop").click()
        stopped = wait_progress(page, rf"{RUN}: stopped")
        page.locator("#train_img_extra textarea").fill(f"{extra}\nmax_steps={step_of(stopped) + 2}")
        page.locator("#train_img_resume").click()
        done = wait_progress(page, rf"{RUN}: finished")
        assert step_of(done) == step_of(stopped) + 2
        assert (data / "models" / "Lora" / f"{LORA}.safetensors").is_file()

        page.locator("#train_img_use").click()              # switches to txt2img with the LoRA in the prompt
        prompt = page.locator("#txt2img_prompt textarea")
        expect(prompt).to_have_value(re.compile(re.escape(f"<lora:{LORA}:1>")), timeout=60_000)
        expect(page.locator("#txt2img_checkpoint input")).to_have_value(re.compile(r"^tiny-sd15\.safetensors"))
        prompt.fill(f"a red square <lora:{LORA}:1>")
        for name, value in (("width", 64), ("height", 64), ("steps", 3)):
            box = page.locator(f"#txt2img_{name} input[type=number]")
            box.fill(str(value))
            box.press("Enter")
        page.locator("#txt2img_seed input").fill("7")
        page.locator("#txt2img_generate").click()
        infotext = page.locator("#txt2img_infotext textarea")
        expect(infotext).to_have_value(re.compile(rf'Lora hashes: "{LORA}: [0-9a-f]+'), timeout=120_000)
        expect(page.locator("#txt2img_gallery img").first).to_be_visible()

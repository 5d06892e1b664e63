"""The A1111 image API on the real server (``launch.py --api``), driven by the ``webuiapi`` client."""
from __future__ import annotations

import base64
import io
import json
import shutil

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from server_utils import start_server

SD15 = "tiny-sd15.safetensors"


@pytest.fixture(scope="module")
def server(fixture_data_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("sdapi")
    shutil.copytree(fixture_data_dir / "models", data / "models")
    srv = start_server(data, "--api")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(server):
    port = int(server.url.rsplit(":", 1)[1])
    client = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=3)
    client.util_set_model(SD15)
    return client


def _pattern(size=64) -> Image.Image:
    rng = np.random.default_rng(0)
    return Image.fromarray(rng.integers(0, 255, (size, size, 3), dtype=np.uint8), "RGB")


def test_listings(api, server):
    titles = [m["title"] for m in api.get_sd_models()]
    assert any(t.startswith("tiny-sd15.safetensors") for t in titles)
    assert any(t.startswith("tiny-sdxl-diffusers") for t in titles)
    samplers = {s["name"]: s for s in api.get_samplers()}
    assert {"Euler a", "Euler", "DPM++ 2M", "DDIM", "UniPC"} <= set(samplers)
    assert samplers["DPM++ 2M"]["options"]["scheduler"] == "karras"
    assert [s["label"] for s in api.get_schedulers()][:3] == ["Automatic", "Uniform", "Karras"]
    assert any(v["model_name"] == "tiny-vae.safetensors" for v in api.get_sd_vae())
    loras = {item["name"] for item in api.get_loras()}
    assert "tiny-sd15-kohya" in loras
    assert "tiny-emb" in api.get_embeddings()["loaded"]
    for path in ("refresh-checkpoints", "refresh-loras", "refresh-vae"):
        assert httpx.post(f"{server.url}/sdapi/v1/{path}", timeout=30).status_code == 200


def test_txt2img_images_info_and_png_info_round_trip(api):
    result = api.txt2img(prompt="a photo of a cat", negative_prompt="blurry", seed=7, steps=3, width=64, height=64,
                         cfg_scale=6.5, sampler_name="Euler", batch_size=2)
    assert len(result.images) == 2 and result.images[0].size == (64, 64)
    info = result.info
    assert info["all_seeds"] == [7, 8] and info["seed"] == 7
    assert info["sd_model_name"] == "tiny-sd15"
    text = info["infotexts"][0]
    assert text.startswith("a photo of a cat\nNegative prompt: blurry\nSteps: 3, Sampler: Euler, "
                           "Schedule type: Automatic, CFG scale: 6.5, Seed: 7, Size: 64x64, Model hash: ")
    assert "Model: tiny-sd15" in text
    assert result.images[0].info["parameters"] == text  # the PNG carries its parameters chunk
    assert result.parameters["prompt"] == "a photo of a cat"
    again = api.png_info(result.images[1])
    assert again.info == info["infotexts"][1]
    assert json.loads(json.dumps(again.json["parameters"]))["Seed"] == "8"


def test_img2img_inpaint_with_mask_keeps_unmasked_pixels(api):
    init = _pattern()
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (0, 0, 32, 64))  # repaint the left half
    result = api.img2img(images=[init], mask_image=mask, mask_blur=0, inpainting_fill=1, inpaint_full_res=False,
                         denoising_strength=0.8, prompt="a red house", seed=3, steps=3, width=64, height=64,
                         sampler_name="Euler")
    out = np.asarray(result.images[0].convert("RGB"))
    src = np.asarray(init)
    assert np.array_equal(out[:, 32:], src[:, 32:])
    assert not np.array_equal(out[:, :32], src[:, :32])
    assert "Denoising strength: 0.8, Mask blur: 0" in result.info["infotexts"][0]
    # a mask of another size is resized, and the response says so
    small = mask.resize((32, 32))
    resized = api.img2img(images=[init], mask_image=small, mask_blur=0, inpainting_fill=1, inpaint_full_res=True,
                          inpaint_full_res_padding=8, prompt="x", seed=3, steps=3, width=64, height=64)
    assert any("mask is 32x32" in w for w in resized.info["warnings"])
    assert resized.images[0].size == (64, 64)


def test_options_switch_checkpoint_and_override_settings(api, server):
    api.util_set_model("tiny-sd15-diffusers")
    assert api.get_options()["sd_model_checkpoint"].startswith("tiny-sd15-diffusers")
    result = api.txt2img(prompt="a cat", seed=1, steps=2, width=64, height=64)
    assert result.info["sd_model_name"] == "tiny-sd15-diffusers"
    over = api.txt2img(prompt="a cat", seed=1, steps=2, width=64, height=64,
                       override_settings={"sd_model_checkpoint": "tiny-sdxl-diffusers"})
    assert over.info["sd_model_name"] == "tiny-sdxl-diffusers"
    assert api.get_options()["sd_model_checkpoint"].startswith("tiny-sd15-diffusers")  # per request only
    bad = httpx.post(f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": "no-such-model"}, timeout=30)
    assert bad.status_code == 400 and "no-such-model" in bad.text and "available" in bad.text
    api.util_set_model(SD15)


def test_xyz_plot_through_the_api(server):
    payload = {"prompt": "a cat", "seed": 5, "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler",
               "script_name": "x/y/z plot", "script_args": {"x_type": "Steps", "x_values": "1, 2"}}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=payload, timeout=120)
    assert r.status_code == 200, r.text
    body = r.json()
    assert len(body["images"]) == 3  # the grid, then each cell
    grid = Image.open(io.BytesIO(base64.b64decode(body["images"][0])))
    assert grid.width >= 128 and grid.height > 64


@pytest.mark.parametrize("payload, status, needle", [
    ({"prompt": "x", "width": 65, "height": 64, "steps": 2}, 422, "multiple of 8"),
    ({"prompt": "x", "width": 0, "height": 64, "steps": 2}, 422, "width=0"),
    ({"prompt": "x", "sampler_name": "Bogus", "steps": 2, "width": 64, "height": 64}, 422, "valid samplers"),
    ({"prompt": "x", "width": 64, "height": 64, "script_args": [1, 2], "script_name": "x/y/z plot"}, 422,
     "the order is [x_type"),
])
def test_txt2img_errors_are_json_4xx(server, payload, status, needle):
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=payload, timeout=60)
    assert r.status_code == status, r.text
    assert needle in r.json()["detail"] and r.json()["error"]


def test_img2img_bad_images_are_json_4xx_and_server_survives(server):
    cases = [({"init_images": ["%%%not base64%%%"]}, "not valid base64"),
             ({"init_images": [base64.b64encode(b"hello, not an image").decode()]}, "not a readable image"),
             ({"init_images": []}, "at least one"),
             ({"init_images": [base64.b64encode(b"\x89PNG\r\n\x1a\n truncated").decode()]}, "not a readable image")]
    for extra, needle in cases:
        r = httpx.post(f"{server.url}/sdapi/v1/img2img", json={"prompt": "x", "steps": 2, "width": 64,
                                                               "height": 64, **extra}, timeout=60)
        assert r.status_code == 422, r.text
        assert needle in r.json()["detail"]
    assert httpx.get(f"{server.url}/sdapi/v1/samplers", timeout=10).status_code == 200

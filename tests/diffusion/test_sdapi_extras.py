"""Every GET route A1111 1.10 serves, in A1111's shape, driven by the real ``webuiapi`` client against the
real server; prompt styles in requests; Extras with an ESRGAN model saved as safetensors into
models/ESRGAN; SD upscale and positional script_args through img2img / txt2img."""
from __future__ import annotations

import base64
import io
import shutil

import httpx
import numpy as np
import pytest
import webuiapi
from PIL import Image

from server_utils import start_server
from test_upscalers import old_layout, tiny_rrdb

SD15 = "tiny-sd15.safetensors"


@pytest.fixture(scope="module")
def server(fixture_data_dir, tmp_path_factory):
    from safetensors.torch import save_file
    data = tmp_path_factory.mktemp("sdapi-extras")
    shutil.copytree(fixture_data_dir / "models", data / "models")
    (data / "models" / "ESRGAN").mkdir(exist_ok=True)
    save_file({k: v.contiguous() for k, v in old_layout(tiny_rrdb(4)).items()},
              str(data / "models" / "ESRGAN" / "tiny-esrgan-4x.safetensors"))
    (data / "models" / "ESRGAN" / "broken.safetensors").write_bytes(b"\x00" * 12)
    (data / "styles.csv").write_text('name,prompt,negative_prompt\nCine,"cinematic, {prompt}",blurry\n',
                                     encoding="utf-8")
    srv = start_server(data, "--api")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def api(server):
    port = int(server.url.rsplit(":", 1)[1])
    client = webuiapi.WebUIApi(host="127.0.0.1", port=port, sampler="Euler", steps=2)  # calls get_scripts()
    client.util_set_model(SD15)
    return client


def _image(size=(32, 32), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (size[1], size[0], 3), dtype=np.uint8), "RGB")


def test_every_a1111_get_route_answers_in_its_shape(api, server):
    assert isinstance(api.get_options(), dict) and isinstance(api.get_cmd_flags(), dict)
    assert {"progress", "state"} <= set(api.get_progress())
    for method in (api.get_samplers, api.get_schedulers, api.get_sd_vae, api.get_upscalers,
                   api.get_latent_upscale_modes, api.get_loras, api.get_sd_models, api.get_hypernetworks,
                   api.get_face_restorers, api.get_realesrgan_models, api.get_prompt_styles):
        assert isinstance(method(), list), method.__name__
    assert api.get_hypernetworks() == [] and api.get_face_restorers() == [] and api.get_realesrgan_models() == []
    scripts = api.get_scripts()
    assert "x/y/z plot" in scripts["txt2img"] and "sd upscale" in scripts["img2img"]
    assert "sd upscale" not in scripts["txt2img"]
    assert {"loaded", "skipped"} <= set(api.get_embeddings()) and "ram" in api.get_memory()
    assert SD15 in " ".join(api.util_get_model_names()) and "Euler" in api.util_get_sampler_names()
    assert api.util_get_scheduler_names() and api.util_get_current_model()
    for path in ("extensions", "sd-modules"):
        assert isinstance(httpx.get(f"{server.url}/sdapi/v1/{path}", timeout=30).json(), list)
    info = {(s["name"], s["is_img2img"]): s for s in httpx.get(f"{server.url}/sdapi/v1/script-info", timeout=30).json()}
    assert [a["label"] for a in info[("x/y/z plot", False)]["args"]][:2] == ["x_type", "x_values"]
    assert [a["label"] for a in info[("sd upscale", True)]["args"]] == ["overlap", "upscaler", "scale_factor"]
    upscalers = {u["name"]: u for u in api.get_upscalers()}
    assert list(upscalers)[:3] == ["None", "Lanczos", "Nearest"]
    assert upscalers["tiny-esrgan-4x"]["scale"] == 4 and upscalers["tiny-esrgan-4x"]["model_path"].endswith(".safetensors")
    assert "broken" not in upscalers  # unusable: left out of the API listing, logged with its reason


def test_prompt_styles_listed_and_applied(api):
    assert api.get_prompt_styles() == [{"name": "Cine", "prompt": "cinematic, {prompt}", "negative_prompt": "blurry"}]
    result = api.txt2img(prompt="a cat", negative_prompt="ugly", styles=["Cine"], seed=1, steps=1, width=64,
                         height=64)
    assert result.info["prompt"] == "cinematic, a cat" and result.info["negative_prompt"] == "ugly, blurry"
    assert result.info["styles"] == ["Cine"]
    with pytest.raises(RuntimeError) as err:
        api.txt2img(prompt="a cat", styles=["Nope"], steps=1, width=64, height=64)
    assert err.value.args[0] == 422 and "unknown style" in err.value.args[1]


def test_extras_single_and_batch_with_an_esrgan_model(api, server):
    image = _image((16, 12))
    single = api.extra_single_image(image, upscaler_1="tiny-esrgan-4x", upscaling_resize=2)
    assert single.image.size == (32, 24) and "tiny-esrgan-4x" in single.info
    batch = api.extra_batch_images([image, _image((10, 10), 1)], upscaler_1="Lanczos", resize_mode=1,
                                   upscaling_resize_w=20, upscaling_resize_h=20, upscaling_crop=True)
    assert [i.size for i in batch.images] == [(20, 20), (20, 20)]
    blended = api.extra_single_image(image, upscaler_1="Nearest", upscaler_2="tiny-esrgan-4x",
                                     extras_upscaler_2_visibility=0.5)
    assert blended.image.size == (32, 24)
    b64 = base64.b64encode(_png(image)).decode()
    for body, field in (({"image": b64, "upscaler_1": "nope"}, "unknown upscaler"),
                        ({"image": b64, "upscaler_1": "broken"}, "upscaler 'broken' cannot be used"),
                        ({"image": b64, "upscaling_resize": 100}, "upscaling_resize"),
                        ({"image": "!!"}, "image: not valid base64")):
        r = httpx.post(f"{server.url}/sdapi/v1/extra-single-image", json=body, timeout=60)
        assert r.status_code == 422 and field in r.json()["detail"], r.text
    r = httpx.post(f"{server.url}/sdapi/v1/extra-batch-images", json={"imageList": "x"}, timeout=60)
    assert r.status_code == 422 and "imageList" in r.json()["detail"]


def _png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def test_sd_upscale_script_with_positional_args(api):
    # 32x32 upscaled 2x to 64x64, tiles of 48x48 overlapping 16: 2x2 tiles redrawn by img2img
    result = api.img2img(images=[_image()], prompt="a cat", width=48, height=48, steps=2, denoising_strength=0.3,
                         seed=5, script_name="SD upscale", script_args=[16, "Lanczos", 2.0])
    assert [i.size for i in result.images] == [(64, 64)]


def test_positional_script_args_for_xyz_and_their_errors(api):
    result = api.txt2img(prompt="a cat", steps=1, width=64, height=64, seed=2, script_name="x/y/z plot",
                         script_args=["Steps", "1, 2", "Nothing", "", "Nothing", "", False])
    assert len(result.images) == 1 + 2  # the grid, then the two cells
    with pytest.raises(RuntimeError) as err:
        api.txt2img(prompt="a cat", steps=1, width=64, height=64, script_name="x/y/z plot", script_args=[4, "1, 2"])
    assert err.value.args[0] == 422
    assert "X/Y/Z plot" in err.value.args[1] and "x_type, x_values, y_type" in err.value.args[1]

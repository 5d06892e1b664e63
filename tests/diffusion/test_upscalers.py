"""ESRGAN-family upscalers: a tiny RRDB state dict written at test time in each published key layout,
loaded, listed and run; the built-in PIL upscalers; the Extras upscale step; the SD upscale tiling."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from modules.upscale.extras import ExtrasOptions, upscale_image
from modules.upscale.rrdb import RRDBLayoutError, RRDBNet, RRDBShape, build_rrdb, canonical_state_dict
from modules.upscale.upscalers import UpscalerError, Upscalers

REPO = Path(__file__).resolve().parents[2]


def tiny_rrdb(scale: int = 4, nb: int = 2, nf: int = 8, gc: int = 4, seed: int = 0) -> RRDBNet:
    torch.manual_seed(seed)
    return RRDBNet(RRDBShape(in_nc=3, out_nc=3, nf=nf, gc=gc, nb=nb, n_upsample={1: 0, 2: 1, 4: 2}[scale])).eval()


def old_layout(net: RRDBNet) -> dict[str, torch.Tensor]:
    """The original ESRGAN key layout (``model.0``, ``model.1.sub.N.RDBk.convj.0``...), built by hand."""
    s = net.state_dict()
    nb, n_up = net.shape.nb, net.shape.n_upsample
    out = {f"model.0.{k}": s[f"conv_first.{k}"] for k in ("weight", "bias")}
    for i in range(nb):
        for r in (1, 2, 3):
            for c in range(1, 6):
                for k in ("weight", "bias"):
                    out[f"model.1.sub.{i}.RDB{r}.conv{c}.0.{k}"] = s[f"body.{i}.rdb{r}.conv{c}.{k}"]
    last = 4 + 3 * n_up
    for k in ("weight", "bias"):
        out[f"model.1.sub.{nb}.{k}"] = s[f"conv_body.{k}"]
        for u in range(n_up):
            out[f"model.{3 + 3 * u}.{k}"] = s[f"conv_up.{u}.{k}"]
        out[f"model.{last - 2}.{k}"] = s[f"conv_hr.{k}"]
        out[f"model.{last}.{k}"] = s[f"conv_last.{k}"]
    return out


def basicsr_layout(net: RRDBNet) -> dict[str, torch.Tensor]:
    names = {"conv_body": "trunk_conv", "conv_up.0": "upconv1", "conv_up.1": "upconv2", "conv_hr": "HRconv"}
    out = {}
    for key, value in net.state_dict().items():
        if key.startswith("body."):
            _, i, rdb, conv, kind = key.split(".")
            out[f"RRDB_trunk.{i}.RDB{rdb[-1]}.{conv}.{kind}"] = value
        else:
            head, kind = key.rsplit(".", 1)
            out[f"{names.get(head, head)}.{kind}"] = value
    return out


@pytest.mark.parametrize("scale", [1, 2, 4])
def test_old_esrgan_layout_detects_scale_and_matches_the_network(scale):
    net = tiny_rrdb(scale)
    state = old_layout(net)
    assert "model.0.weight" in state and f"model.{4 + 3 * {1: 0, 2: 1, 4: 2}[scale]}.weight" in state
    loaded = build_rrdb(state)
    assert loaded.scale == scale and loaded.shape.nb == 2 and loaded.shape.nf == 8 and loaded.shape.gc == 4
    x = torch.rand(1, 3, 12, 10)
    with torch.inference_mode():
        out = loaded(x)
        assert out.shape == (1, 3, 12 * scale, 10 * scale)
        assert torch.allclose(out, net(x), atol=1e-6)  # same weights in the same places


def test_basicsr_and_realesrgan_layouts_load_the_same_weights():
    net = tiny_rrdb(4)
    x = torch.rand(1, 3, 8, 8)
    with torch.inference_mode():
        expected = net(x)
        assert torch.allclose(build_rrdb(basicsr_layout(net))(x), expected, atol=1e-6)
        real = {k.replace("conv_up.0", "conv_up1").replace("conv_up.1", "conv_up2"): v
                for k, v in net.state_dict().items()}
        assert torch.allclose(build_rrdb({"params_ema": real})(x), expected, atol=1e-6)


def test_realesrgan_x2_pixel_unshuffle_variant():
    torch.manual_seed(1)
    net = RRDBNet(RRDBShape(in_nc=12, out_nc=3, nf=8, gc=4, nb=1, n_upsample=2, unshuffle=2)).eval()
    loaded = build_rrdb(dict(net.state_dict()))
    assert loaded.scale == 2
    with torch.inference_mode():
        assert loaded(torch.rand(1, 3, 8, 6)).shape == (1, 3, 16, 12)


def test_not_an_rrdb_is_a_clear_error():
    with pytest.raises(RRDBLayoutError, match="not an ESRGAN"):
        canonical_state_dict({"unet.weight": torch.zeros(1)})
    state = old_layout(tiny_rrdb(4))
    state["model.0.weight"] = torch.zeros(8, 3, 5, 5)  # wrong kernel size
    with pytest.raises(RRDBLayoutError, match="do not fit"):
        build_rrdb(state)


def _write_models(folder: Path) -> None:
    from safetensors.torch import save_file
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in old_layout(tiny_rrdb(4)).items()}, str(folder / "tiny-esrgan-4x.safetensors"))
    save_file({k: v.contiguous() for k, v in basicsr_layout(tiny_rrdb(2, seed=3)).items()},
              str(folder / "tiny-esrgan-2x.safetensors"))
    torch.save(old_layout(tiny_rrdb(2)), folder / "pickled-2x.pth")
    (folder / "broken.safetensors").write_bytes(b"\xff" * 64)


def test_listing_safe_loading_and_broken_files(tmp_path):
    _write_models(tmp_path / "ESRGAN")
    ups = Upscalers(tmp_path / "ESRGAN")
    items = {i.name: i for i in ups.list()}
    assert list(items)[:4] == ["None", "Lanczos", "Nearest", "Bicubic"]
    assert items["tiny-esrgan-4x"].scale == 4 and items["tiny-esrgan-2x"].scale == 2
    assert "--allow-unsafe-pickle" in items["pickled-2x"].error
    assert items["broken"].error  # listed with its reason, never raised
    assert "pickled-2x" not in ups.names() and "broken" not in ups.names()
    with pytest.raises(UpscalerError, match="--allow-unsafe-pickle"):
        ups.find("pickled-2x")
    with pytest.raises(UpscalerError, match="unknown upscaler 'nope'.*Lanczos"):
        ups.find("nope")
    unsafe = Upscalers(tmp_path / "ESRGAN", allow_unsafe_pickle=True)
    assert unsafe.find("pickled-2x").scale == 2  # torch.load(weights_only=True)
    assert unsafe.upscale(Image.new("RGB", (8, 8), "red"), "pickled-2x", 16, 16).size == (16, 16)


def test_model_upscale_passes_tiles_and_fits_the_target(tmp_path):
    _write_models(tmp_path / "ESRGAN")
    ups = Upscalers(tmp_path / "ESRGAN")
    image = Image.effect_noise((20, 12), 64).convert("RGB")
    # 2x model, target 5x: three passes (2, 4, 8x) at most, then Lanczos down to the exact size
    out = ups.upscale(image, "tiny-esrgan-2x", 100, 60)
    assert out.size == (100, 60)
    # tiling: a tile smaller than the image gives the same result as one pass over the whole image
    from modules.upscale.upscalers import run_tiled
    net = ups.load(ups.find("tiny-esrgan-4x"))
    whole = run_tiled(net, image, tile=64)
    tiled = run_tiled(net, image, tile=8, overlap=8)
    assert whole.size == (80, 48)
    diff = np.asarray(whole, dtype=np.float32) - np.asarray(tiled, dtype=np.float32)
    assert np.abs(diff).mean() < 2.0
    assert ups.upscale(image, "Nearest", 40, 24).getpixel((1, 1)) == image.getpixel((0, 0))


def test_extras_options_and_step(tmp_path):
    ups = Upscalers(tmp_path / "none")
    image = Image.effect_noise((30, 20), 64).convert("RGB")
    opts = ExtrasOptions.from_request({"upscaling_resize": 2, "upscaler_1": "Lanczos"})
    assert upscale_image(ups, image, opts).size == (60, 40)
    opts = ExtrasOptions.from_request({"resize_mode": 1, "upscaling_resize_w": 50, "upscaling_resize_h": 50,
                                       "upscaler_1": "Nearest", "upscaler_2": "Lanczos",
                                       "extras_upscaler_2_visibility": 0.5})
    assert upscale_image(ups, image, opts).size == (50, 50)  # cover 75x50, centre crop
    assert "Postprocess upscaler 2: Lanczos" in opts.infotext()
    assert upscale_image(ups, image, ExtrasOptions.from_request({})).size == image.size  # upscaler_1 None
    for bad, match in (({"upscaling_resize": "x"}, "upscaling_resize='x'"),
                       ({"gfpgan_visibility": 1}, "face restoration"),
                       ({"resize_mode": 2}, "resize_mode=2"),
                       ({"upscaling_crop": "yes"}, "upscaling_crop")):
        with pytest.raises(UpscalerError, match=match):
            ExtrasOptions.from_request(bad)
    with pytest.raises(UpscalerError, match="unknown upscaler"):
        upscale_image(ups, image, ExtrasOptions.from_request({"upscaler_1": "ESRGAN_4x"}))


@pytest.fixture(scope="module")
def sd_upscale():
    spec = importlib.util.spec_from_file_location("sd_upscale_under_test", REPO / "scripts" / "sd_upscale.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_split_and_combine_grid_round_trip(sd_upscale):
    image = Image.effect_noise((100, 70), 64).convert("RGB")
    grid = sd_upscale.split_grid(image, 48, 40, 16)
    assert len(grid.tiles) == 3 and len(grid.tiles[0]) == 3  # A1111: ceil((70-16)/(40-16)), ceil((100-16)/(48-16))
    assert grid.tiles[-1][-1].x + 48 == 100 and grid.tiles[-1][-1].y + 40 == 70
    assert (np.asarray(sd_upscale.combine_grid(grid)) == np.asarray(image)).all()  # unchanged tiles: exact
    with pytest.raises(ValueError, match="smaller than one tile"):
        sd_upscale.split_grid(image, 128, 40, 16)
    with pytest.raises(ValueError, match="overlap"):
        sd_upscale.split_grid(image, 48, 40, 48)

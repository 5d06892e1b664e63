"""The Extras tab's and the Styles picker's functions, without a browser, on a real app context; and the
whole UI builds with both in it."""
from __future__ import annotations

from PIL import Image

from modules.diffusion.styles import style_store


def test_styles_picker_apply_and_save(make_ctx):
    from modules.ui.styles_picker import styles_apply, styles_save
    ctx = make_ctx()
    store = style_store(ctx)
    names, message = styles_save(store, "Cine", "cinematic, {prompt}", "blurry", False)
    assert names == ["Cine"] and "Saved" in message and store.path == ctx.paths.data_dir / "styles.csv"
    names, message = styles_save(store, "Cine", "other", "", False)
    assert message.startswith("**Error:**") and "already exists" in message
    assert store.get("Cine").prompt == "cinematic, {prompt}"  # not overwritten
    assert styles_apply(store, "a cat", "", ["Cine"]) == ("cinematic, a cat", "blurry", "Applied Cine.")
    prompt, negative, message = styles_apply(store, "a cat", "x", ["Gone"])
    assert (prompt, negative) == ("a cat", "x") and "unknown style" in message


def test_extras_tab_upscales_and_saves_to_extras_images(make_ctx):
    from modules.ui.tabs.extras import upscale_files
    ctx = make_ctx()
    image = Image.effect_noise((16, 16), 64).convert("RGB")
    items, status = upscale_files(ctx, [image, image], {"resize_mode": "Scale by", "upscaling_resize": 2,
                                                        "upscaler_1": "Lanczos", "upscaler_2": "None"})
    assert len(items) == 2 and "Saved 2 image(s)" in status
    saved = [Image.open(path) for path in items]
    assert all(img.size == (32, 32) for img in saved)
    assert all("extras-images" in path for path in items)
    assert "Postprocess upscaler: Lanczos" in saved[0].info["parameters"]
    items, status = upscale_files(ctx, [image], {"upscaler_1": "nope"})
    assert items == [] and "unknown upscaler 'nope'" in status
    assert upscale_files(ctx, [], {})[1].startswith("**Error:** upload")


def test_ui_builds_with_the_extras_tab_and_style_pickers(make_ctx):
    from modules.ui.app import build_ui
    ctx = make_ctx()
    demo = build_ui(ctx)
    ids = {getattr(block, "elem_id", None) for block in demo.blocks.values()}
    assert {"txt2img_styles", "img2img_styles", "txt2img_style_save", "extras_upscaler_1",
            "extras_generate"} <= ids
    assert "styles" in ctx.ui.forms["txt2img"].components

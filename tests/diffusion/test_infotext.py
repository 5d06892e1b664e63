"""Infotext: A1111's exact strings out, A1111's parsing semantics in, and reading images' metadata."""
from __future__ import annotations

import io

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from modules.diffusion.infotext import (create_infotext, params_from_infotext, parse_generation_parameters,
                                        read_info_from_image)

A1111_REFERENCE = (
    "a cat, (masterpiece:1.2) <lora:foo:0.8>\n"
    "Negative prompt: blurry\n"
    "Steps: 20, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7, Seed: 1234, Size: 512x512, "
    "Model hash: 6ce0161689, Model: v1-5, Lora hashes: \"foo: 1a2b3c4d5e6f\", Version: v1.10.1"
)

#: As A1111 v1.10 writes a hires-fix image with a LoRA and an embedding, clip skip 2.
A1111_HIRES = (
    "masterpiece, best quality, 1girl, (blue eyes:1.2)\n"
    "portrait\n"
    "Negative prompt: lowres, bad anatomy\n"
    "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 3456789012, Size: 512x768, "
    "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.55, Clip skip: 2, "
    "Hires upscale: 2, Hires steps: 15, Hires upscaler: Latent, "
    "Lora hashes: \"add_detail: 7c6bad76eb54, epi_noiseoffset: d1131f7207d6\", "
    "TI hashes: \"easynegative: c74b4e810b03\", Version: v1.10.1"
)


def test_create_matches_a1111_reference_exactly():
    params = {"Steps": 20, "Sampler": "DPM++ 2M", "Schedule type": "Karras", "CFG scale": 7.0, "Seed": 1234,
              "Size": "512x512", "Model hash": "6ce0161689", "Model": "v1-5", "Lora hashes": "foo: 1a2b3c4d5e6f",
              "Version": "v1.10.1"}
    assert create_infotext("a cat, (masterpiece:1.2) <lora:foo:0.8>", "blurry", params) == A1111_REFERENCE


def test_create_orders_keys_quotes_and_drops_none():
    # given out of order, with hires and extra keys and None values
    params = {"Version": "v1.10.1", "Hires upscaler": "Latent", "Seed": 5, "Steps": 28, "Sampler": "DPM++ 2M",
              "TI hashes": "easynegative: c74b4e810b03", "Schedule type": "Karras", "CFG scale": 7.5,
              "Size": "512x768", "Model hash": "6ce0161689", "Model": "v1-5-pruned-emaonly",
              "Denoising strength": 0.55, "Clip skip": 2, "VAE": None, "Hires upscale": 2, "Hires steps": 15,
              "Lora hashes": "add_detail: 7c6bad76eb54, epi_noiseoffset: d1131f7207d6"}
    text = create_infotext("p", "", params)
    assert text.splitlines()[-1] == (
        "Steps: 28, Sampler: DPM++ 2M, Schedule type: Karras, CFG scale: 7.5, Seed: 5, Size: 512x768, "
        "Model hash: 6ce0161689, Model: v1-5-pruned-emaonly, Denoising strength: 0.55, Clip skip: 2, "
        "Hires upscaler: Latent, TI hashes: \"easynegative: c74b4e810b03\", Hires upscale: 2, Hires steps: 15, "
        "Lora hashes: \"add_detail: 7c6bad76eb54, epi_noiseoffset: d1131f7207d6\", Version: v1.10.1")
    assert "Negative prompt" not in text  # omitted when empty
    assert create_infotext("x", "", {"Steps": 1, "Sampler": "Euler", "Note": "a\nb"}).endswith('Note: "a\\nb"')


def test_parse_a1111_sample_with_hires_and_multiline_prompt():
    res = parse_generation_parameters(A1111_HIRES)
    assert res["Prompt"] == "masterpiece, best quality, 1girl, (blue eyes:1.2)\nportrait"
    assert res["Negative prompt"] == "lowres, bad anatomy"
    assert res["Steps"] == "28" and res["CFG scale"] == "7.5" and res["Seed"] == "3456789012"
    assert (res["Size-1"], res["Size-2"]) == ("512", "768")
    assert res["Lora hashes"] == "add_detail: 7c6bad76eb54, epi_noiseoffset: d1131f7207d6"
    assert res["TI hashes"] == "easynegative: c74b4e810b03"
    assert res["Clip skip"] == "2" and res["Hires upscale"] == "2" and res["Hires upscaler"] == "Latent"
    # defaults for what the text does not carry
    assert res["Hires sampler"] == "Use same sampler" and res["Mask mode"] == "Inpaint masked"
    assert res["Masked content"] == "original" and res["Inpaint area"] == "Whole picture"
    assert res["RNG"] == "GPU" and res["Emphasis"] == "Original"


def test_parse_short_last_line_is_prompt_and_defaults():
    res = parse_generation_parameters("just a prompt\nwith two lines: ok")
    assert res["Prompt"] == "just a prompt\nwith two lines: ok"
    assert res["Clip skip"] == "1" and res["Schedule type"] == "Automatic"
    assert "Steps" not in res


def test_parse_legacy_sampler_names_split_schedule():
    res = parse_generation_parameters("x\nSteps: 20, Sampler: DPM++ 2M Karras, CFG scale: 7, Seed: 1, Size: 64x64")
    assert (res["Sampler"], res["Schedule type"]) == ("DPM++ 2M", "Karras")


def test_round_trip_and_field_mapping():
    res = parse_generation_parameters(A1111_REFERENCE)
    values = params_from_infotext(res)
    assert values["prompt"] == "a cat, (masterpiece:1.2) <lora:foo:0.8>"
    assert values["negative_prompt"] == "blurry"
    assert values["steps"] == 20 and values["cfg_scale"] == 7.0 and values["seed"] == 1234
    assert (values["width"], values["height"]) == (512, 512)
    assert values["sampler_name"] == "DPM++ 2M" and values["scheduler"] == "Karras"
    assert values["sd_model_checkpoint"] == "v1-5" and values["sd_model_hash"] == "6ce0161689"
    inpaint = params_from_infotext(parse_generation_parameters(
        "x\nSteps: 4, Sampler: Euler, Seed: 1, Size: 64x64, Denoising strength: 0.6, Mask blur: 8, "
        "Mask mode: Inpaint not masked, Masked content: latent noise, Inpaint area: Only masked, "
        "Masked area padding: 16"))
    assert inpaint["mask_blur"] == 8 and inpaint["inpainting_fill"] == 2 and inpaint["inpaint_full_res"] is True
    assert inpaint["inpainting_mask_invert"] == 1 and inpaint["inpaint_full_res_padding"] == 16
    assert inpaint["denoising_strength"] == 0.6


def _reopen(image: Image.Image, fmt: str, **kwargs) -> Image.Image:
    buf = io.BytesIO()
    image.save(buf, format=fmt, **kwargs)
    buf.seek(0)
    return Image.open(buf)


def test_read_info_from_png_chunk_and_exif_usercomment():
    info = PngInfo()
    info.add_text("parameters", A1111_HIRES)
    text, items = read_info_from_image(_reopen(Image.new("RGB", (8, 8)), "PNG", pnginfo=info))
    assert text == A1111_HIRES and "parameters" not in items
    # A1111 writes JPEG/WebP parameters as EXIF UserComment, "UNICODE\0" + UTF-16-BE (piexif's layout)
    exif = Image.Exif()
    exif[0x8769] = {0x9286: b"UNICODE\x00" + A1111_REFERENCE.encode("utf-16-be")}
    for fmt in ("JPEG", "WEBP"):
        text, _ = read_info_from_image(_reopen(Image.new("RGB", (8, 8)), fmt, exif=exif.tobytes()))
        assert text == A1111_REFERENCE
    text, items = read_info_from_image(_reopen(Image.new("RGB", (8, 8)), "PNG"))
    assert text is None

"""txt2img / img2img / inpainting on the tiny fixture models: equality with plain diffusers, seeds,
A1111's img2img step count, masks and masked-content modes, 9-channel models, hires fix, progress,
previews, skip and interrupt, NaN detection, LoRA hashes and script hooks."""
from __future__ import annotations

import datetime as dt
import shutil
import time
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from modules.diffusion import denoise as dn
from modules.diffusion.checkpoints import list_checkpoints
from modules.diffusion.generation import Run, Tools, process_images
from modules.diffusion.loading import load_sd_model
from modules.diffusion.masks import overlay_alpha, prepare_mask
from modules.diffusion.processing import (GenerationParams, InvalidGenerationParams, check_params,
                                          parameter_problems)
from modules.extensions.scripts import AlwaysVisible, Script, ScriptRunner
from modules.jobs import JobInterrupted


@pytest.fixture(scope="module")
def models(fixture_data_dir):
    infos = {i.name: i for i in list_checkpoints(fixture_data_dir / "models" / "Stable-diffusion",
                                                 compute_hashes=False)}
    emb = fixture_data_dir / "models" / "embeddings"
    load = lambda name: load_sd_model(infos[name], embeddings_dir=emb)  # noqa: E731
    return SimpleNamespace(sd15=load("tiny-sd15-diffusers"), sdxl=load("tiny-sdxl-diffusers"),
                           inpaint=load("tiny-sd15-inpainting.safetensors"),
                           lora_dir=fixture_data_dir / "models" / "Lora", emb_dir=emb)


class FakeJob:
    """Records progress; raises JobInterrupted at *interrupt_at*; answers Skip once at *skip_at*."""

    def __init__(self, interrupt_at: int | None = None, skip_at: int | None = None):
        self.reports, self.interrupt_at, self.skip_at = [], interrupt_at, skip_at

    def report(self, step, total, *, text="", preview=None):
        self.reports.append((step, total, text, preview))
        if self.interrupt_at is not None and len(self.reports) >= self.interrupt_at:
            raise JobInterrupted("interrupted by the test")

    def take_skip(self):
        if self.skip_at is not None and len(self.reports) == self.skip_at:
            self.skip_at = None
            return True
        return False


def run_for(sd, models, **kw) -> Run:
    return Run(sd=sd, tools=Tools.default(), lora_dir=models.lora_dir, embeddings_dir=models.emb_dir, **kw)


def params(**kw) -> GenerationParams:
    base = dict(prompt="a photo of a cat", negative_prompt="blurry", steps=4, sampler_name="Euler",
                width=64, height=64, seed=42, cfg_scale=7.0)
    return GenerationParams(**{**base, **kw})


def arr(image) -> np.ndarray:
    return np.asarray(image.convert("RGB"), dtype=np.int16)


def pattern(size=64, seed=0) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 255, (size, size, 3), dtype=np.uint8), "RGB")


def count_unet_calls(sd):
    calls = []
    handle = sd.pipe.unet.register_forward_hook(lambda *a: calls.append(1))
    return calls, handle


@pytest.mark.parametrize("which", ["sd15", "sdxl"])
def test_txt2img_euler_equals_plain_diffusers_pipeline(models, which):
    from diffusers import EulerDiscreteScheduler
    sd = getattr(models, which)
    ours = process_images(run_for(sd, models), params(batch_size=2))
    pipe = sd.pipe
    original = pipe.scheduler
    pipe.scheduler = EulerDiscreteScheduler.from_config(original.config)
    try:
        ref = pipe("a photo of a cat", negative_prompt="blurry", num_inference_steps=4, guidance_scale=7.0,
                   width=64, height=64, num_images_per_prompt=2,
                   generator=[torch.Generator("cpu").manual_seed(42 + i) for i in range(2)]).images
    finally:
        pipe.scheduler = original
    assert ours.seeds == [42, 43]
    for a, b in zip(ours.images, ref):
        assert np.abs(arr(a) - arr(b)).max() <= 1  # identical up to uint8 rounding


def test_seeds_random_consecutive_and_per_item(models):
    result = process_images(run_for(models.sd15, models), params(seed=100, batch_size=2, n_iter=2, steps=2))
    assert result.seeds == [100, 101, 102, 103]
    assert [t.split("Seed: ")[1].split(",")[0] for t in result.infotexts] == ["100", "101", "102", "103"]
    single = process_images(run_for(models.sd15, models), params(seed=101, steps=2))
    # item i of a batch == seed + i alone (up to batched-matmul rounding)
    assert np.abs(arr(result.images[1]) - arr(single.images[0])).max() <= 2
    assert not np.array_equal(arr(result.images[0]), arr(result.images[1]))
    rand = process_images(run_for(models.sd15, models), params(seed=-1, steps=1))
    assert 0 <= rand.seeds[0] < 2**32 and rand.params.seed == rand.seeds[0]


@pytest.mark.parametrize("strength, expected", [(0.75, 8), (1.0, 10), (0.05, 1), (0.5, 6)])
def test_img2img_runs_a1111_step_count(models, strength, expected):
    calls, handle = count_unet_calls(models.sd15)
    job = FakeJob()
    try:
        result = process_images(run_for(models.sd15, models, job=job),
                                params(steps=10, init_images=[pattern()], denoising_strength=strength))
    finally:
        handle.remove()
    assert len(calls) == expected  # int(min(strength, 0.999) * steps) + 1, CFG batched in one call
    assert job.reports[-1][:2] == (expected, expected)
    assert f"Denoising strength: {strength:g}," in result.infotexts[0]
    assert result.images[0].size == (64, 64)


def test_resize_modes(models):
    wide = pattern(96).resize((96, 48))
    for mode in range(4):
        result = process_images(run_for(models.sd15, models),
                                params(steps=2, init_images=[wide], resize_mode=mode, denoising_strength=0.5))
        assert result.images[0].size == (64, 64)


def left_half_mask(size=64) -> Image.Image:
    mask = Image.new("L", (size, size), 0)
    mask.paste(255, (0, 0, size // 2, size))
    return mask


@pytest.mark.parametrize("fill", [0, 1, 2, 3])
def test_inpainting_keeps_pixels_outside_the_blurred_mask(models, fill):
    init, mask = pattern(), left_half_mask()
    result = process_images(run_for(models.sd15, models),
                            params(steps=3, init_images=[init], mask=mask, mask_blur=4, inpainting_fill=fill,
                                   denoising_strength=0.9))
    out, src = arr(result.images[0]), arr(init)
    alpha = np.asarray(overlay_alpha(prepare_mask(mask, init.size, False, 4)[0]))
    assert (alpha == 0).sum() > 64 * 20
    assert np.array_equal(out[alpha == 0], src[alpha == 0])
    assert np.abs(out[alpha == 255] - src[alpha == 255]).mean() > 1  # the masked area was repainted
    text = result.infotexts[0]
    assert "Mask blur: 4" in text
    assert ("Masked content: " in text) == (fill != 1)


def test_inpainting_invert_and_only_masked(models):
    init, mask = pattern(96).resize((96, 64)), Image.new("L", (96, 64), 0)
    mask.paste(255, (60, 20, 80, 40))
    result = process_images(run_for(models.sd15, models),
                            params(steps=3, init_images=[init], mask=mask, mask_blur=0, inpaint_full_res=True,
                                   inpaint_full_res_padding=8, denoising_strength=0.9))
    out, src = arr(result.images[0]), arr(init)
    assert result.images[0].size == (96, 64)  # "Only masked" keeps the original size
    keep = np.asarray(mask) == 0
    assert np.array_equal(out[keep], src[keep])
    assert not np.array_equal(out[~keep], src[~keep])
    assert "Inpaint area: Only masked, Masked area padding: 8" in result.infotexts[0]
    inverted = process_images(run_for(models.sd15, models),
                              params(steps=2, init_images=[init], mask=mask, mask_blur=0, inpainting_mask_invert=1,
                                     width=96, height=64, denoising_strength=0.9))
    out = arr(inverted.images[0])
    assert np.array_equal(out[~keep], src[~keep])  # now the painted square is what is kept
    assert "Mask mode: Inpaint not masked" in inverted.infotexts[0]


def test_nine_channel_inpainting_model(models):
    assert models.inpaint.is_inpaint and models.inpaint.pipe.unet.config.in_channels == 9
    init, mask = pattern(), left_half_mask()
    result = process_images(run_for(models.inpaint, models),
                            params(steps=3, init_images=[init], mask=mask, mask_blur=0, denoising_strength=1.0))
    out, src = arr(result.images[0]), arr(init)
    assert np.array_equal(out[:, 32:], src[:, 32:])
    assert not np.array_equal(out[:, :32], src[:, :32])
    txt = process_images(run_for(models.inpaint, models), params(steps=2))  # txt2img on an inpainting model
    assert txt.images[0].size == (64, 64)


def test_hires_fix(models):
    calls, handle = count_unet_calls(models.sd15)
    job = FakeJob()
    try:
        result = process_images(run_for(models.sd15, models, job=job),
                                params(steps=4, enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                                       hr_second_pass_steps=6, denoising_strength=0.5))
    finally:
        handle.remove()
    assert result.images[0].size == (128, 128)
    assert len(calls) == 4 + 4  # first pass + int(0.5 * 6) + 1
    assert job.reports[-1][:2] == (8, 8)
    assert ("Size: 64x64, Denoising strength: 0.5" in result.infotexts[0]
            and "Hires upscale: 2, Hires steps: 6, Hires upscaler: Latent" in result.infotexts[0])
    pil = process_images(run_for(models.sd15, models), params(steps=2, enable_hr=True, hr_scale=1.5,
                                                              hr_upscaler="Lanczos", denoising_strength=0.4))
    assert pil.images[0].size == (96, 96)
    sized = GenerationParams(width=64, height=48, enable_hr=True, hr_resize_x=128)
    assert sized.hr_size == (128, 96)


def test_progress_previews_skip_and_interrupt(models):
    job = FakeJob()
    process_images(run_for(models.sd15, models, job=job, preview_every=2), params(steps=4))
    assert [r[:2] for r in job.reports] == [(1, 4), (2, 4), (3, 4), (4, 4)]
    assert [r[3] is not None for r in job.reports] == [False, True, False, True]
    assert job.reports[1][3].size == (8, 8) and "it/s" in job.reports[1][2]

    calls, handle = count_unet_calls(models.sd15)
    skip = FakeJob(skip_at=1)
    try:
        skipped = process_images(run_for(models.sd15, models, job=skip), params(steps=4, n_iter=2))
    finally:
        handle.remove()
    assert len(skipped.images) == 2 and len(calls) == 1 + 4  # batch 1 stopped after one step, batch 2 ran

    stop = FakeJob(interrupt_at=6)  # during the second of three batches
    interrupted = process_images(run_for(models.sd15, models, job=stop), params(steps=4, n_iter=3))
    assert interrupted.interrupted and len(interrupted.images) == 1


def test_nan_output_suggests_fp32_vae():
    class NanVae(torch.nn.Module):
        config = SimpleNamespace(scaling_factor=0.18215, force_upcast=False, latents_mean=None, latents_std=None)
        dtype = torch.float32

        def decode(self, z, return_dict=False):
            return (torch.full((z.shape[0], 3, z.shape[2] * 8, z.shape[3] * 8), float("nan")),)

    pipe = SimpleNamespace(vae=NanVae())
    with pytest.raises(dn.NanOutput, match="fp32"):
        dn.decode(pipe, torch.zeros(1, 4, 8, 8))
    with pytest.raises(dn.NanOutput, match="UNet"):
        dn.decode(pipe, torch.full((1, 4, 8, 8), float("nan")))


def test_validation_collects_problems():
    p = GenerationParams(width=65, height=0, steps=0, sampler_name="Nope", batch_size=2, init_images=[1, 2, 3])
    with pytest.raises(InvalidGenerationParams) as err:
        check_params(p, samplers=["Euler", "Euler a"], img2img=True)
    message = str(err.value)
    for needle in ("width=65", "multiple of 8 (try 64)", "height=0", "steps=0", "sampler_name='Nope'",
                   "valid samplers: Euler, Euler a", "init_images"):
        assert needle in message
    assert len(err.value.problems) == 5
    with pytest.raises(ValueError, match="GiB is free"):
        check_params(GenerationParams(width=2048, height=2048), memory_budget=2**30)
    check_params(GenerationParams(width=64, height=64), memory_budget=2**30)


def test_validation_names_the_field_for_wrong_types():
    """A string where a number belongs, or a JSON true for a count, is a problem naming the field (it used
    to raise "could not convert string to float", or pass as steps=1)."""
    p = GenerationParams(denoising_strength="x", subseed_strength="y", steps=True, cfg_scale="7", n_iter=False)
    problems = parameter_problems(p)
    assert [q.split("=")[0] for q in problems] == ["steps", "cfg_scale", "n_iter", "subseed_strength",
                                                   "denoising_strength"]
    assert "denoising_strength='x': must be a number from 0 to 1" in problems


def test_service_check_inputs_raises_one_error_for_everything(fixture_data_dir, tmp_path, make_ctx):
    """Sampler, checkpoint override, script and field problems arrive together, in one error."""
    data = tmp_path / "data"
    shutil.copytree(fixture_data_dir / "models", data / "models")
    service = make_ctx(data_dir=data).diffusion
    p = params(sampler_name="Nope", width=70, script_name="No such script",
               override_settings={"sd_model_checkpoint": 123})
    with pytest.raises(InvalidGenerationParams) as err:
        service.check_inputs(p)
    fields = [q.split("=")[0] for q in err.value.problems]
    assert fields == ["sampler_name", "override_settings.sd_model_checkpoint", "width", "script_name"]
    checked = service.check_inputs(params(sampler_name="DPM++ 2M Karras", override_settings={"CLIP_stop_at_last_layers": 2}))
    assert (checked.params.sampler_name, checked.params.scheduler, checked.params.clip_skip) == \
        ("DPM++ 2M", "Karras", 2)
    assert checked.checkpoint.title == service.find(None).title


def test_lora_hashes_embeddings_and_unknown_lora_warning(models):
    result = process_images(run_for(models.sd15, models),
                            params(steps=2, prompt="a cat, tiny-emb <lora:tiny-sd15-kohya:0.8> <lora:missing:1>"))
    text = result.infotexts[0]
    assert text.startswith("a cat, tiny-emb <lora:tiny-sd15-kohya:0.8> <lora:missing:1>\n")
    assert 'Lora hashes: "tiny-sd15-kohya: ' in text and 'TI hashes: "tiny-emb: ' in text
    assert any("missing" in w for w in result.warnings)
    assert not models.sd15.pipe.get_list_adapters()  # removed again after the job


def test_alwayson_script_hooks(models):
    seen = []

    class Hooked(Script):
        def title(self):
            return "Hooked"

        def show(self, tab):
            return AlwaysVisible

        def process(self, p, strength=0):
            seen.append(("process", strength))
            p.extra_generation_params["Hooked"] = strength

        def postprocess_image(self, p, image, strength=0):
            seen.append(("image", image.size))
            return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)

        def postprocess(self, p, processed, strength=0):
            seen.append(("done", len(processed.images)))

    scripts = ScriptRunner()
    scripts.scripts.append(Hooked())
    plain = process_images(run_for(models.sd15, models), params(steps=2))
    result = process_images(run_for(models.sd15, models, scripts=scripts),
                            params(steps=2, alwayson_scripts={"Hooked": {"strength": 3}}))
    assert seen == [("process", 3), ("image", (64, 64)), ("done", 1)]
    assert "Hooked: 3" in result.infotexts[0]
    assert np.array_equal(arr(result.images[0]), arr(plain.images[0])[:, ::-1])


def test_service_generates_saves_and_fires_callbacks(fixture_data_dir, tmp_path, make_ctx):
    data = tmp_path / "data"
    shutil.copytree(fixture_data_dir / "models", data / "models")
    ctx = make_ctx(data_dir=data)
    saved = []
    ctx.callbacks.add("on_image_saved", lambda image, path, infotext, ctx: saved.append((path, infotext)))
    service = ctx.diffusion
    service.select_checkpoint("tiny-sd15.safetensors")
    result = service.generate(params(steps=2, seed=9, save_images=True))
    day = dt.date.today().strftime("%Y-%m-%d")
    path = data / "outputs" / "txt2img-images" / day / "00000-9.png"
    assert result.paths == [str(path)] and saved[0][0] == str(path)
    with Image.open(path) as image:
        assert image.info["parameters"] == result.infotexts[0] == saved[0][1]
    assert "Model: tiny-sd15" in result.infotexts[0]
    assert [m["key"] for m in ctx.models.loaded("diffusion")] == ["sd:" + service.find("tiny-sd15.safetensors").title]
    job = service.submit(params(steps=20, n_iter=4, save_images=False))
    while job.progress.step < 2 and not job.done:
        time.sleep(0.01)
    assert not service.interrupt("session:someone-else")  # another owner's Interrupt misses it
    assert service.interrupt(None)  # submitted without an owner: matched by owner None
    stopped = job.result(timeout=60)
    assert stopped.interrupted and len(stopped.images) < 4
    with pytest.raises(ValueError, match="valid samplers"):
        service.submit(params(sampler_name="Nope"))
    with pytest.raises(ValueError, match="not found"):
        service.submit(params(override_settings={"sd_model_checkpoint": "nope"}))


def test_resize_mode_geometry_and_fill():
    from modules.diffusion.images import resize_image
    from modules.diffusion.masks import fill_masked
    src = Image.new("RGB", (40, 20), "blue")
    src.paste((255, 0, 0), (0, 0, 10, 20))  # red left quarter
    stretched = resize_image(0, src, 20, 20)
    cropped = resize_image(1, src, 20, 20)  # cover 40x20 -> scale to 40x20 high=20, crop the centre 20 columns
    filled = resize_image(2, src, 20, 20)  # fit -> 20x10 in the middle, rows stretched above and below
    assert stretched.getpixel((2, 10))[0] > 240 and stretched.getpixel((18, 10))[2] > 240
    assert cropped.getpixel((1, 10))[2] > 200 and cropped.getpixel((1, 10))[0] < 60  # the red quarter was cut
    assert filled.size == (20, 20) and filled.getpixel((1, 0))[0] > 200 and filled.getpixel((18, 19))[2] > 200
    image = Image.new("RGB", (32, 32), (0, 200, 0))
    image.paste((255, 255, 255), (8, 8, 24, 24))
    mask = Image.new("L", (32, 32), 0)
    mask.paste(255, (8, 8, 24, 24))
    out = np.asarray(fill_masked(image, mask), dtype=np.int16)
    assert np.array_equal(out[0], np.asarray(image)[0])  # outside the mask untouched
    assert abs(out[16, 16, 1] - 200) < 20 and out[16, 16, 0] < 30  # the hole took the surrounding green


def test_variation_seed_blends_toward_the_subseed(models):
    run = lambda **kw: arr(process_images(run_for(models.sd15, models), params(steps=1, **kw)).images[0])  # noqa: E731
    plain, other = run(seed=5), run(seed=6)
    assert np.array_equal(run(seed=5, subseed=6, subseed_strength=0.0), plain)
    assert np.abs(run(seed=5, subseed=6, subseed_strength=1.0) - other).max() <= 1
    half = process_images(run_for(models.sd15, models), params(steps=1, seed=5, subseed=6, subseed_strength=0.5))
    assert "Variation seed: 6, Variation seed strength: 0.5" in half.infotexts[0]
    assert not np.array_equal(arr(half.images[0]), plain)

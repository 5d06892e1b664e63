"""Each device flag changes what runs: --lowvram vs --medvram (weights resident during a forward),
--no-half-vae / --no-half (dtypes), --xformers (attention processors, LLM attention), and the truthful
``sd_vae_name`` / ``is_using_inpainting_conditioning`` in the A1111 info."""
from __future__ import annotations

import shutil
import sys
import types

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode

from modules.diffusion.checkpoints import list_checkpoints
from modules.diffusion.generation import Run, Tools, process_images
from modules.diffusion.loading import load_sd_model
from modules.diffusion.processing import GenerationParams


@pytest.fixture(scope="module")
def infos(fixture_data_dir):
    return {i.name: i for i in list_checkpoints(fixture_data_dir / "models" / "Stable-diffusion",
                                                compute_hashes=False)}


def params(**kw) -> GenerationParams:
    return GenerationParams(**{**dict(prompt="a cat", steps=2, sampler_name="Euler", width=64, height=64, seed=3),
                               **kw})


class ResidentBytes(TorchFunctionMode):
    """While *module* runs a forward, at every weight-consuming op: the bytes of its weights that hold real
    data (not accelerate's meta placeholders) on the execution device; keeps the peak."""
    WEIGHT_OPS = {F.linear, F.conv2d, F.group_norm, F.layer_norm}

    def __init__(self, module):
        super().__init__()
        self.module, self.peak, self.active = module, 0, False
        module.register_forward_pre_hook(lambda *a: setattr(self, "active", True))
        module.register_forward_hook(lambda *a: setattr(self, "active", False))

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if self.active and func in self.WEIGHT_OPS:
            resident = sum(p.numel() * p.element_size() for p in self.module.parameters() if p.device.type == "cpu")
            self.peak = max(self.peak, resident)
        return func(*args, **(kwargs or {}))


def test_lowvram_keeps_only_a_layer_of_the_unet_on_the_device_medvram_the_whole_model(infos, fixture_data_dir):
    lora_dir = fixture_data_dir / "models" / "Lora"
    images, peaks = {}, {}
    for mode in ("medvram", "lowvram"):
        sd = load_sd_model(infos["tiny-sd15-diffusers"], offload=mode)
        unet = sd.pipe.unet
        total = sum(p.numel() * p.element_size() for p in unet.parameters())
        with ResidentBytes(unet) as meter:
            result = process_images(Run(sd=sd, tools=Tools.default(), lora_dir=lora_dir),
                                    params(prompt="a cat <lora:tiny-sd15-kohya:0.8>"))
        images[mode], peaks[mode] = np.asarray(result.images[0]), meter.peak
        # after the job every weight is back in the module, in CPU RAM
        assert all(p.device.type == "cpu" for p in unet.parameters())
        assert sum(p.numel() * p.element_size() for p in unet.parameters()) == total
    assert peaks["medvram"] >= total  # the whole UNet (plus the LoRA layers PEFT adds for the job)
    assert 0 < peaks["lowvram"] < total / 4, (peaks, total)
    assert np.array_equal(images["medvram"], images["lowvram"])  # same computation, other residency


def test_lowvram_model_is_not_moved_by_the_model_manager(infos):
    sd = load_sd_model(infos["tiny-sd15-diffusers"], offload="lowvram")
    sd.to("meta")  # what parking would do on an accelerator: under lowvram the weights stay in CPU RAM
    assert next(sd.pipe.unet.parameters()).device.type == "cpu"
    medvram = load_sd_model(infos["tiny-sd15-diffusers"], offload="medvram")
    medvram.to("meta")
    assert next(medvram.pipe.unet.parameters()).device.type == "meta"


@pytest.mark.parametrize("flags, vae, unet", [(("--no-half-vae",), torch.float32, torch.bfloat16),
                                              ((), torch.bfloat16, torch.bfloat16),
                                              (("--no-half",), torch.float32, torch.float32)])
def test_no_half_vae_keeps_the_vae_in_fp32(fixture_data_dir, tmp_path, make_ctx, flags, vae, unet):
    data = tmp_path / "data"
    shutil.copytree(fixture_data_dir / "models", data / "models")
    ctx = make_ctx("--device", "cpu", "--precision", "bf16", *flags, data_dir=data)
    service = ctx.diffusion
    with service._lease(service.find("tiny-sd15.safetensors")) as sd:
        assert (sd.pipe.vae.dtype, sd.pipe.unet.dtype, sd.pipe.text_encoder.dtype) == (vae, unet, unet)
    result = service.generate(params(override_settings={"sd_model_checkpoint": "tiny-sd15.safetensors"}))
    assert result.images[0].size == (64, 64)


def test_info_reports_the_vae_and_inpainting_conditioning(fixture_data_dir, tmp_path, make_ctx):
    from PIL import Image
    data = tmp_path / "data"
    shutil.copytree(fixture_data_dir / "models", data / "models")
    ctx = make_ctx(data_dir=data)
    service = ctx.diffusion
    plain = service.generate(params(override_settings={"sd_model_checkpoint": "tiny-sd15.safetensors"}))
    assert plain.info()["sd_vae_name"] is None and plain.info()["is_using_inpainting_conditioning"] is False
    with_vae = service.generate(params(override_settings={"sd_model_checkpoint": "tiny-sd15.safetensors",
                                                          "sd_vae": "tiny-vae.safetensors"}))
    assert with_vae.info()["sd_vae_name"] == "tiny-vae.safetensors"
    mask = Image.new("L", (64, 64), 0)
    mask.paste(255, (16, 16, 48, 48))
    inpainted = service.generate(params(init_images=[Image.new("RGB", (64, 64), "red")], mask=mask,
                                        override_settings={"sd_model_checkpoint": "tiny-sd15-inpainting"}),
                                 img2img=True)
    assert inpainted.info()["is_using_inpainting_conditioning"] is True


def fake_xformers(monkeypatch, calls: list):
    """An importable ``xformers`` whose memory_efficient_attention is SDPA in xformers' (B, T, H, hd) layout."""
    ops = types.ModuleType("xformers.ops")

    class LowerTriangularMask:
        pass

    def memory_efficient_attention(q, k, v, attn_bias=None):
        calls.append(q.shape)
        causal = isinstance(attn_bias, LowerTriangularMask)
        mask = None if causal or attn_bias is None else attn_bias
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                             attn_mask=mask, is_causal=causal)
        return out.transpose(1, 2)

    ops.LowerTriangularMask, ops.memory_efficient_attention = LowerTriangularMask, memory_efficient_attention
    module = types.ModuleType("xformers")
    module.ops = ops
    monkeypatch.setitem(sys.modules, "xformers", module)
    monkeypatch.setitem(sys.modules, "xformers.ops", ops)


def test_xformers_processors_are_installed_when_xformers_is_importable(infos, monkeypatch):
    default = load_sd_model(infos["tiny-sd15-diffusers"], attention="xformers")
    fake_xformers(monkeypatch, [])
    chosen = load_sd_model(infos["tiny-sd15-diffusers"], attention="xformers")
    before = {type(p).__name__ for p in default.pipe.unet.attn_processors.values()}
    after = {type(p).__name__ for p in chosen.pipe.unet.attn_processors.values()}
    vae_after = {type(p).__name__ for p in chosen.pipe.vae.attn_processors.values()}
    assert before == {"AttnProcessor2_0"} and after == vae_after == {"XFormersAttnProcessor"}
    assert default.attention == "sdpa" and chosen.attention == "xformers"


def test_llm_attention_uses_xformers_when_chosen(monkeypatch, fixture_data_dir):
    from modules.llm.loader import load_llm
    calls: list = []
    fake_xformers(monkeypatch, calls)
    folder = next(p for p in (fixture_data_dir / "models" / "LLM").iterdir() if p.is_dir())
    sdpa = load_llm(folder)
    xf = load_llm(folder, attention="xformers")
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        expected, got = sdpa.model(ids), xf.model(ids)
    assert len(calls) == xf.config.num_hidden_layers
    torch.testing.assert_close(got, expected)

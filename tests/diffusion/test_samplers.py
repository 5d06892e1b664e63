"""Sampler × schedule names → diffusers schedulers that really run."""
from __future__ import annotations

import pytest
import torch

from modules.diffusion.samplers import (SAMPLERS, SCHEDULE_TYPES, effective_schedule, make_scheduler,
                                        resolve_sampler, sampler_aliases, schedulers_api)

SD_CONFIG = {"_class_name": "PNDMScheduler", "beta_end": 0.012, "beta_schedule": "scaled_linear",
             "beta_start": 0.00085, "num_train_timesteps": 1000, "set_alpha_to_one": False, "skip_prk_steps": True,
             "steps_offset": 1, "timestep_spacing": "leading", "prediction_type": "epsilon", "clip_sample": False}


def _run_steps(scheduler, steps: int = 4) -> torch.Tensor:
    import inspect
    gen = torch.Generator().manual_seed(0)
    extra = {"generator": gen} if "generator" in inspect.signature(scheduler.step).parameters else {}
    scheduler.set_timesteps(steps)
    sample = torch.randn(1, 4, 8, 8, generator=gen) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_in = scheduler.scale_model_input(sample, t)
        noise_pred = 0.1 * model_in  # a stand-in epsilon prediction
        sample = scheduler.step(noise_pred, t, sample, **extra).prev_sample
    return sample


@pytest.mark.parametrize("sampler", SAMPLERS)
@pytest.mark.parametrize("schedule", SCHEDULE_TYPES)
def test_every_sampler_and_schedule_runs(sampler, schedule):
    scheduler = make_scheduler(SD_CONFIG, sampler, schedule)
    out = _run_steps(scheduler)
    assert out.shape == (1, 4, 8, 8)
    assert torch.isfinite(out).all()
    label = effective_schedule(sampler, schedule)
    config = scheduler.config
    if "use_karras_sigmas" in config:
        assert config.use_karras_sigmas == (label == "Karras")
        assert config.use_exponential_sigmas == (label == "Exponential")
    if label == "SGM Uniform":
        assert config.timestep_spacing == "trailing"


def test_class_and_options_mapping():
    expect = {"Euler a": "EulerAncestralDiscreteScheduler", "Euler": "EulerDiscreteScheduler",
              "LMS": "LMSDiscreteScheduler", "Heun": "HeunDiscreteScheduler", "DPM2": "KDPM2DiscreteScheduler",
              "DPM2 a": "KDPM2AncestralDiscreteScheduler", "DPM++ 2M": "DPMSolverMultistepScheduler",
              "DPM++ 2M SDE": "DPMSolverMultistepScheduler", "DPM++ SDE": "DPMSolverSDEScheduler",
              "DDIM": "DDIMScheduler", "PLMS": "PNDMScheduler", "UniPC": "UniPCMultistepScheduler",
              "LCM": "LCMScheduler", "DDPM": "DDPMScheduler"}
    assert set(expect) == set(SAMPLERS)
    for name, cls in expect.items():
        assert type(make_scheduler(SD_CONFIG, name)).__name__ == cls
    assert make_scheduler(SD_CONFIG, "DPM++ 2M").config.algorithm_type == "dpmsolver++"
    assert make_scheduler(SD_CONFIG, "DPM++ 2M SDE").config.algorithm_type == "sde-dpmsolver++"
    assert make_scheduler(SD_CONFIG, "PLMS").config.skip_prk_steps is True
    # Automatic resolves per sampler as A1111 does
    assert make_scheduler(SD_CONFIG, "DPM++ 2M").config.use_karras_sigmas is True
    assert make_scheduler(SD_CONFIG, "DPM++ 2M SDE").config.use_exponential_sigmas is True
    assert make_scheduler(SD_CONFIG, "Euler").config.use_karras_sigmas is False


def test_euler_automatic_equals_plain_diffusers_euler():
    from diffusers import EulerDiscreteScheduler
    ours = make_scheduler(SD_CONFIG, "Euler", "Automatic")
    plain = EulerDiscreteScheduler.from_config(SD_CONFIG)
    ours.set_timesteps(7)
    plain.set_timesteps(7)
    assert torch.equal(ours.sigmas, plain.sigmas)
    assert torch.equal(ours.timesteps, plain.timesteps)


def test_karras_changes_sigmas():
    uniform = make_scheduler(SD_CONFIG, "Euler", "Uniform")
    karras = make_scheduler(SD_CONFIG, "Euler", "Karras")
    uniform.set_timesteps(10)
    karras.set_timesteps(10)
    assert not torch.allclose(uniform.sigmas, karras.sigmas)
    assert karras.sigmas[0] == pytest.approx(uniform.sigmas[0], rel=1e-3)  # same sigma_max


@pytest.mark.parametrize("legacy,expected", [
    ("DPM++ 2M Karras", ("DPM++ 2M", "Karras")),
    ("DPM++ 2M SDE Exponential", ("DPM++ 2M SDE", "Exponential")),
    ("DPM++ 2M SDE Karras", ("DPM++ 2M SDE", "Karras")),
    ("DPM++ SDE Karras", ("DPM++ SDE", "Karras")),
    ("LMS Karras", ("LMS", "Karras")),
    ("DPM2 a Karras", ("DPM2 a", "Karras")),
    ("Euler a", ("Euler a", "Automatic")),
    ("k_euler_a", ("Euler a", "Automatic")),
    ("k_dpmpp_2m", ("DPM++ 2M", "Automatic")),
    ("euler", ("Euler", "Automatic")),
])
def test_legacy_names(legacy, expected):
    assert resolve_sampler(legacy) == expected


def test_schedule_api_names_and_explicit_schedule():
    assert resolve_sampler("Euler", "karras") == ("Euler", "Karras")
    assert resolve_sampler("Euler", "sgm_uniform") == ("Euler", "SGM Uniform")
    assert resolve_sampler("DPM++ 2M Karras", "Exponential") == ("DPM++ 2M", "Exponential")


def test_unknown_names_list_valid_ones():
    with pytest.raises(ValueError) as err:
        resolve_sampler("Magic Sampler")
    assert "DPM++ 2M" in str(err.value) and "Euler a" in str(err.value)
    with pytest.raises(ValueError) as err:
        resolve_sampler("Euler", "Cosine")
    assert "Karras" in str(err.value) and "SGM Uniform" in str(err.value)


def test_timestep_samplers_ignore_sigma_schedules():
    assert effective_schedule("DDIM", "Karras") == "Uniform"
    assert effective_schedule("Euler a", "Exponential") == "Uniform"
    assert effective_schedule("DPM++ 2M", "Automatic") == "Karras"
    assert effective_schedule("DDIM", "SGM Uniform") == "SGM Uniform"


def test_api_listings():
    items = sampler_aliases()
    assert [i["name"] for i in items] == list(SAMPLERS)
    dpm = next(i for i in items if i["name"] == "DPM++ 2M")
    assert dpm["aliases"] == ["k_dpmpp_2m"] and dpm["options"]["scheduler"] == "karras"
    names = [s["name"] for s in schedulers_api()]
    assert names == ["automatic", "uniform", "karras", "exponential", "sgm_uniform"]


def test_dpmpp_sde_is_reproducible_with_seed():
    a = _run_steps(make_scheduler(SD_CONFIG, "DPM++ SDE", seed=5))
    b = _run_steps(make_scheduler(SD_CONFIG, "DPM++ SDE", seed=5))
    c = _run_steps(make_scheduler(SD_CONFIG, "DPM++ SDE", seed=6))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)

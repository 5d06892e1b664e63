"""The denoising loss pieces: per-sample noise independent of the batch, v targets, min-SNR-γ weights."""
import torch
from diffusers import DDPMScheduler

from modules.training.images import loss as L


def _scheduler():
    return DDPMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


def test_a_samples_noise_depends_only_on_its_own_seed_epoch_and_slot():
    gens = lambda slots: [L.sample_generator(7, 0, s) for s in slots]  # noqa: E731
    noise, steps = L.draw_noise((4, 8, 8), gens([0, 1, 2, 3]), 1000)
    half, half_steps = L.draw_noise((4, 8, 8), gens([2, 3]), 1000)      # another process's half of the batch
    assert torch.equal(noise[2:], half) and torch.equal(steps[2:], half_steps)
    other, _ = L.draw_noise((4, 8, 8), [L.sample_generator(7, 1, 0)], 1000)
    assert not torch.equal(other[0], noise[0])                          # the next epoch draws anew


def test_noise_offset_shifts_each_channel_by_a_constant():
    plain, _ = L.draw_noise((4, 8, 8), [L.sample_generator(1, 0, 0)], 1000)
    offset, _ = L.draw_noise((4, 8, 8), [L.sample_generator(1, 0, 0)], 1000, noise_offset=0.1)
    diff = offset - plain
    assert torch.allclose(diff, diff[:, :, :1, :1].expand_as(diff)) and diff.abs().max() > 0


def test_min_snr_weights_follow_the_papers_formulas():
    scheduler = _scheduler()
    t = torch.tensor([10, 500, 990])
    alpha = scheduler.alphas_cumprod[t]
    snr = alpha / (1 - alpha)
    eps = L.snr_weights(scheduler, t, 5.0, "epsilon")
    v = L.snr_weights(scheduler, t, 5.0, "v_prediction")
    assert torch.allclose(eps, torch.clamp(snr, max=5) / snr, rtol=1e-5)
    assert torch.allclose(v, torch.clamp(snr, max=5) / (snr + 1), rtol=1e-5)
    assert eps[0] < 1 and eps[2] == 1                                   # only high-SNR steps are damped
    assert torch.equal(L.snr_weights(scheduler, t, 0.0, "epsilon"), torch.ones(3))


def test_the_v_target_is_the_schedulers_velocity():
    scheduler = _scheduler()
    latents, noise, t = torch.randn(2, 4, 8, 8), torch.randn(2, 4, 8, 8), torch.tensor([100, 800])
    a = scheduler.alphas_cumprod[t].sqrt()[:, None, None, None]
    s = (1 - scheduler.alphas_cumprod[t]).sqrt()[:, None, None, None]
    assert torch.allclose(L.target_for(scheduler, latents, noise, t, "v_prediction"), a * noise - s * latents,
                          atol=1e-6)
    assert L.target_for(scheduler, latents, noise, t, "epsilon") is noise


def test_x0_weighting_turns_the_loss_into_the_clean_latents_error():
    scheduler = _scheduler()
    latents, noise, t = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.tensor([5, 500, 999])
    noisy = scheduler.add_noise(latents, noise, t)
    a = scheduler.alphas_cumprod[t].sqrt()[:, None, None, None]
    s = (1 - scheduler.alphas_cumprod[t]).sqrt()[:, None, None, None]
    guess = torch.randn(3, 4, 8, 8)                                     # some model's x0 estimate
    x0_mse = (guess - latents).pow(2).mean(dim=(1, 2, 3))
    # the epsilon and v predictions that imply that x0 estimate
    eps_pred, v_pred = (noisy - a * guess) / s, (a * noisy - guess) / s
    for prediction_type, pred in (("epsilon", eps_pred), ("v_prediction", v_pred)):
        target = L.target_for(scheduler, latents, noise, t, prediction_type)
        weights = L.snr_weights(scheduler, t, 0.0, prediction_type, "x0")
        assert torch.allclose(L.per_sample_mse(pred, target, weights), x0_mse, rtol=1e-3), prediction_type
    assert L.snr_weights(scheduler, t, 0.0, "v_prediction", "x0")[0] < 0.01      # low noise is damped


def test_timesteps_are_drawn_from_the_chosen_range_only():
    generators = [L.sample_generator(0, 0, slot) for slot in range(400)]
    _, steps = L.draw_noise((4, 2, 2), generators, 1000, min_timestep=700, max_timestep=1000)
    assert steps.min() >= 700 and steps.max() <= 999 and len(set(steps.tolist())) > 150
    _, low = L.draw_noise((4, 2, 2), [L.sample_generator(0, 0, s) for s in range(400)], 1000, max_timestep=10)
    assert set(low.tolist()) == set(range(10))
    import pytest
    with pytest.raises(ValueError, match="within the scheduler's 1000 training timesteps"):
        L.draw_noise((4, 2, 2), generators[:1], 1000, min_timestep=0, max_timestep=1001)

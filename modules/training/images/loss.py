"""The denoising loss of SD training: noise (with offset), the target (epsilon or v), min-SNR-γ weights.

Why per-sample generators for noise and timesteps: a sample's noise then depends only on (seed, epoch,
slot), not on which process draws it or what ran before, so a run split over N processes sees exactly the
noise one process sees for the same global batch, and a resumed run the noise the uninterrupted one saw.

Formulas (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting"; kohya's
``apply_snr_weight`` and diffusers' train_text_to_image): with SNR(t) = ᾱ_t / (1 - ᾱ_t), the per-sample
MSE is weighted by min(SNR, γ) / SNR for an epsilon target and min(SNR, γ) / (SNR + 1) for a v target.
The "x0" weighting is the same algebra without the clip: x̂0 - x0 equals -σ/α (ε̂ - ε) and -σ (v̂ - v), so
1 / SNR (epsilon) and 1 / (SNR + 1) (v) turn the per-sample MSE into the clean latent's MSE.
"""
from __future__ import annotations

import numpy as np
import torch


def sample_generator(seed: int, epoch: int, slot: int) -> torch.Generator:
    """The generator of one training sample's noise and timestep."""
    state = np.random.SeedSequence([seed, epoch, slot, 0x5D]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


def draw_noise(latent_shape: tuple[int, ...], generators: list[torch.Generator], num_timesteps: int, *,
               noise_offset: float = 0.0, min_timestep: int | None = None,
               max_timestep: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(noise (B, C, h, w), timesteps (B,)) on the CPU, one generator per sample.

    *noise_offset* adds a per-channel constant (crosslabs' offset noise, kohya's ``--noise_offset``), which
    lets the model learn overall brightness. Timesteps are uniform in [*min_timestep*, *max_timestep*)
    (default: every one of the *num_timesteps*).
    """
    low = 0 if min_timestep is None else min_timestep
    high = num_timesteps if max_timestep is None else max_timestep
    if not 0 <= low < high <= num_timesteps:
        raise ValueError(f"the timestep range [{low}, {high}) must lie within the scheduler's "
                         f"{num_timesteps} training timesteps: set min_timestep/max_timestep inside it")
    channels, height, width = latent_shape
    noise, steps = [], []
    for generator in generators:
        n = torch.randn((channels, height, width), generator=generator)
        if noise_offset:
            n = n + noise_offset * torch.randn((channels, 1, 1), generator=generator)
        noise.append(n)
        steps.append(torch.randint(low, high, (1,), generator=generator))
    return torch.stack(noise), torch.cat(steps)


def target_for(scheduler, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               prediction_type: str) -> torch.Tensor:
    """What the UNet should predict: the noise (epsilon) or the velocity (v-prediction)."""
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        return scheduler.get_velocity(latents, noise, timesteps)
    raise ValueError(f"prediction_type must be epsilon or v_prediction, got {prediction_type!r}")


def snr_weights(scheduler, timesteps: torch.Tensor, gamma: float, prediction_type: str,
                weighting: str = "constant") -> torch.Tensor:
    """Loss weight per sample: min-SNR-γ when *gamma* > 0, the clean-latent ("x0") weight when *weighting*
    says so, else all ones."""
    if not gamma and weighting == "constant":
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)
    from diffusers.training_utils import compute_snr
    snr = compute_snr(scheduler, timesteps)
    clipped = torch.clamp(snr, max=gamma) if gamma else torch.ones_like(snr)
    return clipped / (snr + 1) if prediction_type == "v_prediction" else clipped / snr


def per_sample_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """weight × MSE of each sample, shape (B,) (computed in fp32 under mixed precision)."""
    per_sample = (prediction.float() - target.float()).pow(2).mean(dim=(1, 2, 3))
    return per_sample * weights.to(per_sample.device)


def weighted_mse(prediction: torch.Tensor, target: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of weight × per-sample MSE (computed in fp32 under mixed precision)."""
    return per_sample_mse(prediction, target, weights).mean()

"""img2img and inpainting inputs: init images resized per A1111's resize modes, masks, overlays,
init latents with the masked-content modes, and the two inpainting mechanisms.

* 4-channel models: after every step the unmasked latents are reset to the original latents noised to
  the next timestep (latent blending), and to the clean original after the last step.
* 9-channel inpainting models: the UNet also sees [mask, masked-image latents] and needs no blending.

Either way the decoded image is laid over the original through the blurred mask (see ``masks.Overlay``).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

from modules.diffusion import denoise as dn
from modules.diffusion.images import resize_image, round_to_8, to_tensor
from modules.diffusion.masks import (Overlay, crop_region, expand_to_ratio, fill_masked, overlay_alpha,
                                     prepare_mask)


def a1111_steps(steps: int, strength: float) -> tuple[int, int]:
    """(index of the first step, steps run) for img2img at *strength*: A1111 runs
    ``int(min(strength, 0.999) * steps) + 1`` steps, the last ones of a *steps*-step schedule."""
    t_enc = int(min(float(strength), 0.999) * steps)
    return steps - t_enc - 1, t_enc + 1


@dataclass
class InitState:
    """Everything about the init images that does not change between batches of one job."""
    images: list[Image.Image]  # processing-size RGB images (1 or batch_size of them)
    latents: torch.Tensor  # (1 or B, 4, h, w) clean init latents
    overlays: list[Overlay | None]
    latent_mask: torch.Tensor | None = None  # (1, 1, h, w), 1 = repaint
    image_cond: torch.Tensor | None = None  # 9-channel models: (1 or B, 5, h, w)
    warnings: list[str] = field(default_factory=list)

    def for_batch(self, tensor: torch.Tensor, batch: int) -> torch.Tensor:
        return tensor if tensor.shape[0] == batch else tensor[:1].repeat(batch, *([1] * (tensor.dim() - 1)))


def prepare_init(pipe, p, *, is_inpaint_model: bool, device, dtype) -> InitState:
    """Resize, mask and encode ``p.init_images`` once for the whole job."""
    warnings: list[str] = []
    processed, overlays, masks = [], [], []
    for image in p.init_images:
        image = image.convert("RGB")
        overlay, mask = None, None
        if p.mask is not None:
            mask, mask_warnings = prepare_mask(p.mask, image.size, bool(p.inpainting_mask_invert), p.mask_blur)
            warnings.extend(w for w in mask_warnings if w not in warnings)
            box = crop_region(mask, p.inpaint_full_res_padding) if p.inpaint_full_res else None
            if box is not None:
                box = expand_to_ratio(box, p.width, p.height, image.width, image.height)
                overlay = Overlay(original=image, alpha=overlay_alpha(mask), paste_box=box)
                image = image.crop(box).resize((p.width, p.height), Image.Resampling.LANCZOS)
                mask = mask.crop(box).resize((p.width, p.height), Image.Resampling.LANCZOS)
            else:
                image = resize_image(p.resize_mode, image, p.width, p.height)
                mask = resize_image(p.resize_mode, mask, p.width, p.height)
                overlay = Overlay(original=image, alpha=overlay_alpha(mask))
            if p.inpainting_fill == 0:
                image = fill_masked(image, mask)
        elif p.resize_mode == 3:
            image = image.resize((round_to_8(image.width), round_to_8(image.height)), Image.Resampling.LANCZOS)
        else:
            image = resize_image(p.resize_mode, image, p.width, p.height)
        processed.append(image)
        overlays.append(overlay)
        masks.append(mask)
    pixels = to_tensor(processed).to(device, dtype)
    latents = dn.encode(pipe, pixels)
    scale = dn.latent_scale(pipe)
    if latents.shape[-2:] != (p.height // scale, p.width // scale):  # "Just resize (latent upscale)"
        latents = F.interpolate(latents, size=(p.height // scale, p.width // scale), mode="bilinear")
    state = InitState(processed, latents, overlays, warnings=warnings)
    if masks[0] is not None:
        mask_px = torch.stack([torch.from_numpy(np.asarray(m, dtype=np.float32) / 255.0)
                               for m in masks])[:, None].to(device, dtype)  # (N, 1, H, W)
        state.latent_mask = torch.round(F.interpolate(mask_px, size=latents.shape[-2:], mode="bilinear"))
        if is_inpaint_model:
            masked = pixels * (mask_px < 0.5)
            state.image_cond = torch.cat([state.latent_mask, dn.encode(pipe, masked)], dim=1)
    elif is_inpaint_model:
        state.image_cond = full_mask_conditioning(pipe, latents)
    return state


def full_mask_conditioning(pipe, latents: torch.Tensor) -> torch.Tensor:
    """9-channel models without a mask (txt2img, plain img2img): everything is "masked", so the
    masked image is all grey (0 in [-1, 1]) and the mask all ones."""
    b, _, h, w = latents.shape
    scale = dn.latent_scale(pipe)
    grey = torch.zeros((1, 3, h * scale, w * scale), device=latents.device, dtype=latents.dtype)
    grey_latents = dn.encode(pipe, grey).repeat(b, 1, 1, 1)
    return torch.cat([torch.ones((b, 1, h, w), device=latents.device, dtype=latents.dtype), grey_latents], dim=1)


def apply_masked_content(init: torch.Tensor, mask: torch.Tensor | None, mode: int,
                         noise: torch.Tensor) -> torch.Tensor:
    """Masked content in latent space: 2 "latent noise" puts seeded noise in the masked area, 3 "latent
    nothing" zeros. ("fill" was applied to the pixels; "original" keeps the latents.)"""
    if mask is None:
        return init
    if mode == 2:
        return init * (1 - mask) + noise * mask
    if mode == 3:
        return init * (1 - mask)
    return init


def make_blend(scheduler, init: torch.Tensor, noise: torch.Tensor, mask: torch.Tensor, timesteps: torch.Tensor):
    """4-channel inpainting: keep the unmasked latents on the original's noise trajectory."""
    last = len(timesteps) - 1

    def blend(latents: torch.Tensor, i: int) -> torch.Tensor:
        if i >= last:
            kept = init
        else:
            kept = scheduler.add_noise(init, noise, timesteps[i + 1:i + 2])
        return (1 - mask) * kept + mask * latents

    return blend

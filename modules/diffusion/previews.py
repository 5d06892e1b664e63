"""Fast live previews: latents to a small RGB image without running the VAE.

Each latent channel contributes linearly to R, G and B; the factors below are
the widely used least-squares fits for the SD 1.x/2.x and SDXL VAEs. The result
is blurry and slightly off in colour but costs a matrix product, so it can run
every few steps without slowing sampling down.
"""
from __future__ import annotations

import torch
from PIL import Image

_SD1_FACTORS = (
    (0.298, 0.207, 0.208),
    (0.187, 0.286, 0.173),
    (-0.158, 0.189, 0.264),
    (-0.184, -0.271, -0.473),
)
_SDXL_FACTORS = (
    (0.3920, 0.4054, 0.4549),
    (-0.2634, -0.0196, 0.0653),
    (0.0568, 0.1687, -0.0755),
    (-0.3112, -0.2359, -0.2076),
)


def latent_preview(latents: torch.Tensor, kind: str = "sd1", index: int = 0) -> Image.Image:
    """RGB preview of batch item *index* of *latents* ``(B, 4, h, w)``; the image is ``w x h`` pixels."""
    factors = torch.tensor(_SDXL_FACTORS if kind == "sdxl" else _SD1_FACTORS, dtype=torch.float32)
    latent = latents[index, :4].detach().to("cpu", torch.float32)  # (4, h, w)
    rgb = torch.einsum("chw,cr->hwr", latent, factors)  # (h, w, 3) in about [-1, 1]
    rgb = ((rgb + 1.0) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    return Image.fromarray(rgb, "RGB")

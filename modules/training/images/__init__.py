"""The image trainer (LoRA, DreamBooth, full fine-tuning of SD 1.5 / SDXL) and its data: kohya-style dataset
folders, aspect-ratio buckets, captions, latent caching and a resumable bucket batch sampler."""

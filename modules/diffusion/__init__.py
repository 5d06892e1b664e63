"""Image generation: Stable Diffusion 1.x/2.x/SDXL through diffusers, with A1111's names and syntax.

Model side: ``checkpoints`` (listing, hashes, type detection), ``loading`` (offline pipelines),
``samplers`` (A1111 sampler × schedule names), ``prompt_parser`` and ``conditioning`` (prompt
syntax and CLIP encoding), ``lora`` and ``embeddings`` (extra networks), ``ldm_keys`` (writing
single-file checkpoints). Nothing heavy is imported here, so importing the package is cheap.
"""

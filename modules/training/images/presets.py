"""Memory presets for image training: a starting point per GPU size, as kohya_ss and OneTrainer ship them.

A preset only fills defaults: :func:`modules.training.images.config.load_image_config` starts from the
preset's values and the user's config file and ``key=value`` overrides win over every one of them.

The numbers follow the community presets for SD 1.5 LoRA (kohya_ss' "SD15 - LoRA" presets, OneTrainer's
"#sd 1.5 LoRA" and its 8 GB variant): small GPUs trade speed for memory with gradient checkpointing,
fp16 autocast (cards without bf16) and latents cached on disk; big ones raise rank, batch and resolution.
``cpu`` is for trying a config out on a machine without a GPU (fp32, tiny rank, latents in memory).
"""
from __future__ import annotations

PRESETS: dict[str, dict] = {
    "cpu": {"rank": 4, "alpha": 4.0, "batch_size": 1, "resolution": 512, "mixed_precision": "no",
            "gradient_checkpointing": False, "cache_latents": "memory"},
    "6gb": {"rank": 8, "alpha": 4.0, "batch_size": 1, "resolution": 512, "mixed_precision": "fp16",
            "gradient_checkpointing": True, "cache_latents": "disk"},
    "8gb": {"rank": 16, "alpha": 8.0, "batch_size": 1, "resolution": 512, "mixed_precision": "fp16",
            "gradient_checkpointing": True, "cache_latents": "disk"},
    "12gb": {"rank": 32, "alpha": 16.0, "batch_size": 2, "resolution": 768, "mixed_precision": "bf16",
             "gradient_checkpointing": True, "cache_latents": "disk"},
    "24gb": {"rank": 32, "alpha": 16.0, "batch_size": 4, "resolution": 1024, "mixed_precision": "bf16",
             "gradient_checkpointing": False, "cache_latents": "disk"},
}

"""The image model shipped in models/Stable-diffusion/atelier-shapes/ is listed and loaded as txt2img loads it,
keeps its model card, and still meets a quick quality floor on held-out prompts read back by the shapes
classifier (Euler a, 20 steps, the model card's settings).

The floor sits well below what the model card reports for 200 prompts (the recipe's install step measures
that), so this fails when the shipped weights are damaged or replaced by worse ones, not on noise."""
from __future__ import annotations

from pathlib import Path

import pytest

from modules.paths import REPO_DIR

FOLDER = REPO_DIR / "models" / "Stable-diffusion" / "atelier-shapes"
#: per-attribute floors on N held-out prompts (the card reports 99% background and 61% object colour on 200;
#: every attribute right is rare, 0.5%, so that is no floor to hold)
FLOORS, N = {"background": 0.85, "colour": 0.35}, 24


def test_txt2img_lists_and_loads_the_shipped_model():
    from modules.diffusion import checkpoints as ck
    from modules.diffusion.loading import load_sd_model
    infos = ck.list_checkpoints(FOLDER.parent, compute_hashes=False)
    info = next(i for i in infos if Path(i.filename) == FOLDER)
    assert info.error is None and info.kind == "sd1" and info.model_name == "atelier-shapes"
    sd = load_sd_model(info)
    assert sd.pipe.unet.config.sample_size == 16                    # 64 px through its 4x VAE
    card = (FOLDER / "README.md").read_text(encoding="utf-8")
    assert "python -m modules.training demo-image-model" in card and "## Measured" in card


def test_the_shipped_model_meets_its_quality_floor():
    from modules.training.images.eval_images import EvalSettings, evaluate
    results, _ = evaluate(EvalSettings(model=str(FOLDER), n=N, samplers=("Euler a",), steps=20, seed=1, size=64))
    attributes = results[0].score.attributes
    for name, floor in FLOORS.items():
        assert attributes[name] >= floor, (name, attributes)

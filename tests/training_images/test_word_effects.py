"""word-effects: the loss increase per swapped caption word is what the predictor gets from that word (an oracle
that knows every word loses with each swap; one blind to position loses nothing with a position swap), a real
pipeline conditions through its text encoder (zeroed cross-attention: every increase exactly 0), the command
end to end on the tiny SD 1.5 fixture, and bad input named."""
from __future__ import annotations

import json
import math
import random

import pytest
import torch
from diffusers import DDPMScheduler

from modules.shapes.vocabulary import BASE_SHAPES, COLOURS, POSITIONS, SIZES, parse_caption
from modules.training.__main__ import main
from modules.training.images.eval_images import held_out_scenes
from modules.training.images.word_effects import (ALTERED, WordEffectsError, altered_scene, measure,
                                                  pipeline_predictor)


def scene_latent(scene, blind_to: str | None = None) -> torch.Tensor:
    """A made-up clean latent (5, 4, 4) that spells the scene's attributes, one channel each."""
    obj = scene.objects[0]
    values = [BASE_SHAPES.index(obj.shape), COLOURS.index(obj.colour), SIZES.index(obj.size),
              POSITIONS.index(obj.position), COLOURS.index(scene.background)]
    if blind_to is not None:
        values[("shape", "colour", "size", "position", "background").index(blind_to)] = 0
    return torch.tensor(values, dtype=torch.float32).div(4).view(5, 1, 1).expand(5, 4, 4).clone()


def oracle(scheduler, blind_to: str | None = None):
    """An epsilon predictor that reads the clean latent off the caption (zeros for no caption) and solves x_t
    for the noise."""
    def predict(noisy, steps, texts):
        x0 = torch.stack([scene_latent(parse_caption(t), blind_to) if t else torch.zeros(5, 4, 4) for t in texts])
        ab = scheduler.alphas_cumprod[steps].view(-1, 1, 1, 1)
        return (noisy - ab.sqrt() * x0) / (1 - ab).sqrt()
    return predict


@pytest.fixture
def scheduler():
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)


def test_every_swapped_word_costs_an_oracle_that_reads_every_word(scheduler):
    scenes = held_out_scenes(12, 3, objects="1")
    latents = torch.stack([scene_latent(s) for s in scenes])
    rows = measure(oracle(scheduler), scheduler, latents, scenes, timesteps=(100, 900), batch_size=5)
    assert [r.timestep for r in rows] == [100, 900]
    for row in rows:
        assert row.loss < 1e-8                                  # the true caption predicts the noise exactly
        for attribute in ALTERED:
            assert row.increase[attribute] > 1e-5, (row, attribute)
    # an epsilon target weighs a wrong clean latent by sqrt(SNR): less at the higher noise level
    assert rows[0].increase["shape"] > rows[1].increase["shape"]


def test_a_word_the_predictor_ignores_costs_exactly_nothing(scheduler):
    scenes = held_out_scenes(12, 3, objects="1")
    latents = torch.stack([scene_latent(s, blind_to="position") for s in scenes])
    rows = measure(oracle(scheduler, blind_to="position"), scheduler, latents, scenes, timesteps=(500,))
    assert rows[0].increase["position"] == pytest.approx(0.0, abs=1e-9)
    assert all(rows[0].increase[a] > 1e-5 for a in ALTERED if a != "position")


def test_altered_scenes_change_one_word_to_another_allowed_value():
    rng = random.Random(0)
    for scene in held_out_scenes(40, 9, objects="1"):
        for attribute in ALTERED:
            other = altered_scene(scene, attribute, rng)
            before, after = scene.objects[0], other.objects[0]
            if attribute == "background":
                assert other.background != scene.background and before == after
            else:
                assert getattr(after, attribute) != getattr(before, attribute)
                assert other.background == scene.background
                assert all(getattr(after, a) == getattr(before, a)
                           for a in ("shape", "colour", "size", "position") if a != attribute)
            assert after.colour != other.background                  # still a drawable scene
    two = held_out_scenes(30, 9, objects="2")[0]
    with pytest.raises(WordEffectsError, match="one-object"):
        altered_scene(two, "shape", rng)


def test_bad_timesteps_and_mismatched_inputs_are_named(scheduler):
    scenes = held_out_scenes(2, 3, objects="1")
    latents = torch.stack([scene_latent(s) for s in scenes])
    with pytest.raises(WordEffectsError, match=r"outside the model's 0\.\.999"):
        measure(oracle(scheduler), scheduler, latents, scenes, timesteps=(1000,))
    with pytest.raises(WordEffectsError, match="one latent per scene"):
        measure(oracle(scheduler), scheduler, latents[:1], scenes)


def _load(fixture_data_dir):
    from modules.diffusion.loading import load_sd_model
    from modules.training.images.base_model import find_base
    return load_sd_model(find_base("tiny-sd15", fixture_data_dir / "models" / "Stable-diffusion")).pipe


def test_a_pipeline_conditions_through_its_text_encoder(fixture_data_dir):
    from modules.training.images.word_effects import encode_scenes
    pipe = _load(fixture_data_dir)
    scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    scenes = held_out_scenes(4, 5, objects="1")
    latents = encode_scenes(pipe.vae, scenes, 64, torch.device("cpu"))
    predict = pipeline_predictor(pipe, torch.device("cpu"))
    live = measure(predict, scheduler, latents, scenes, timesteps=(600,))[0]
    assert any(abs(v) > 1e-7 for v in live.increase.values())     # a random model's output moves with the text
    for name, module in pipe.unet.named_modules():
        if name.endswith("attn2.to_out.0"):                    # cut the text out of the UNet
            torch.nn.init.zeros_(module.weight)
            torch.nn.init.zeros_(module.bias)
    cut = measure(predict, scheduler, latents, scenes, timesteps=(600,))[0]
    assert cut.loss == pytest.approx(live.loss, rel=0.5)
    assert all(v == 0.0 for v in cut.increase.values()), cut


def test_command_end_to_end_on_the_tiny_model(fixture_data_dir, tmp_path, capsys):
    out = tmp_path / "effects.json"
    code = main(["word-effects", "--model", "tiny-sd15", "--data-dir", str(fixture_data_dir), "--n", "3",
                 "--timesteps", "300,999", "--out", str(out)])
    printed = capsys.readouterr().out
    assert code == 0
    report = json.loads(out.read_text())
    assert report["model"] == "tiny-sd15" and report["n"] == 3
    assert [r["timestep"] for r in report["rows"]] == [300, 999]
    for row in report["rows"]:
        assert set(row["increase"]) == {*ALTERED, "empty"}
        assert all(math.isfinite(v) for v in [row["loss"], *row["increase"].values()])
    assert "| 999 |" in printed and "+ other position" in printed
    # an existing --out is never overwritten
    assert main(["word-effects", "--model", "tiny-sd15", "--data-dir", str(fixture_data_dir), "--n", "1",
                 "--out", str(out)]) == 2
    assert "exists already" in capsys.readouterr().err


@pytest.mark.parametrize("args, message", [
    (["--model", "no-such-model"], "is not in"),
    (["--model", "tiny-sd15", "--timesteps", "10,1000"], "outside the model's 0..999"),
    (["--model", "tiny-sd15", "--timesteps", "ten"], "whole numbers"),
    (["--model", "tiny-sd15", "--n", "0"], "--n must be at least 1"),
    (["--model", "tiny-sd15", "--size", "30"], "--size"),
])
def test_bad_input_is_refused_with_what_to_do(fixture_data_dir, capsys, args, message):
    assert main(["word-effects", "--data-dir", str(fixture_data_dir), "--n", "2", *args]) == 2
    assert message in capsys.readouterr().err

"""The shapes attribute classifier: labels encode and decode losslessly, a few training steps lower the loss,
fp16 save/load keeps its readings, bad folders and inputs get clear errors, and the shipped classifier in
``models/shapes-classifier/`` reads fresh generator images (a seed it never saw) and judges prompts right."""
from __future__ import annotations

import argparse
import json

import pytest
import torch
from PIL import Image

from modules.shapes.classifier import CONFIG_FILE, DEFAULT_DIR, HEADS_WIDTH, WEIGHTS_FILE, ClassifierConfig, \
    ClassifierError, Reading, ShapesClassifier, ShapesNet, decode, images_to_tensor, load_classifier, read_scene, \
    save_classifier, scene_matches, scene_targets
from modules.shapes.classifier_training import TrainSettings, TrainSettingsError, classifier_accuracy, \
    classifier_loss, render_batch, train_classifier
from modules.shapes.render import render
from modules.shapes.vocabulary import PALETTE, SHAPES, STYLES, CaptionError, parse_caption

TINY = ClassifierConfig(input_size=24, channels=(8, 8, 16), hidden=16)


@pytest.fixture(scope="module")
def shipped() -> ShapesClassifier:
    return load_classifier()


def one_hot_logits(targets: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    background = torch.nn.functional.one_hot(targets["background"], 8).float()
    parts = [torch.nn.functional.one_hot(targets[head].clamp(min=0), width).float()
             for head, width in HEADS_WIDTH.items()]
    return background, torch.cat(parts, dim=-1)


def test_scene_targets_decode_back_to_the_same_scenes():
    _, scenes = render_batch(0, 0, 50, (32,))
    readings = decode(*one_hot_logits(scene_targets(scenes)))
    assert all(r.matches(s) and r.scene() is not None for r, s in zip(readings, scenes))
    assert not readings[0].matches(scenes[1]) or readings[0] == readings[1]


def test_a_few_training_steps_lower_the_loss_on_held_out_images():
    images, scenes = render_batch(99, 0, 64, (64,))
    x, targets = images_to_tensor(images, TINY.input_size), scene_targets(scenes)
    torch.manual_seed(0)
    before = ShapesNet(TINY).eval()
    trained = train_classifier(TrainSettings(steps=40, batch_size=32, warmup_steps=5, lr=1e-2), TINY).net
    with torch.no_grad():
        assert classifier_loss(trained, x, targets) < 0.8 * classifier_loss(before, x, targets)


def test_fp16_save_and_load_keep_the_readings_and_the_default_model_is_small(tmp_path):
    classifier = train_classifier(TrainSettings(steps=3, batch_size=8, warmup_steps=1))
    save_classifier(classifier, tmp_path / "c")
    assert (tmp_path / "c" / WEIGHTS_FILE).stat().st_size <= 2 * 1024 * 1024
    loaded = load_classifier(tmp_path / "c")
    images, _ = render_batch(5, 0, 16, (64, 128))
    x = images_to_tensor(images, 72)
    with torch.no_grad():
        for ours, theirs in zip(classifier.net.eval()(x), loaded.net(x)):
            assert torch.allclose(ours, theirs, atol=0.02 * ours.abs().max().item())
    assert loaded.record["training"]["steps"] == 3 and len(loaded.read(images)) == 16


def test_broken_classifier_folders_say_how_to_make_a_good_one(tmp_path):
    with pytest.raises(ClassifierError, match="train-shapes-classifier"):
        load_classifier(tmp_path)
    classifier = ShapesClassifier(ShapesNet(TINY), {})
    save_classifier(classifier, tmp_path)
    record = json.loads((tmp_path / CONFIG_FILE).read_text())
    record["vocabulary"]["shapes"].append("blob")
    (tmp_path / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(ClassifierError, match="another shapes vocabulary"):
        load_classifier(tmp_path)
    record["vocabulary"]["shapes"].pop()
    record["architecture"]["hidden"] = 32
    (tmp_path / CONFIG_FILE).write_text(json.dumps(record))
    with pytest.raises(ClassifierError, match="does not fit"):
        load_classifier(tmp_path)
    (tmp_path / WEIGHTS_FILE).write_bytes(b"not safetensors")
    with pytest.raises(ClassifierError, match="does not fit"):
        load_classifier(tmp_path)
    (tmp_path / CONFIG_FILE).write_text("{")
    with pytest.raises(ClassifierError, match="not a shapes-classifier config"):
        load_classifier(tmp_path)


def test_bad_settings_and_inputs_are_named():
    with pytest.raises(TrainSettingsError, match=r"steps must be.*; lr must be > 0, not 0; sizes: image size"):
        TrainSettings(steps=0, lr=0, sizes=(60,))
    with pytest.raises(ClassifierError, match="multiple of 24"):
        ClassifierConfig(input_size=64)
    with pytest.raises(ClassifierError, match="square"):
        images_to_tensor([Image.new("RGB", (64, 32))], 72)
    with pytest.raises(ClassifierError, match="not a PIL image"):
        images_to_tensor([torch.zeros(3, 64, 64)], 72)
    with pytest.raises(ClassifierError, match="no images"):
        images_to_tensor([], 72)


def test_the_shipped_classifier_reads_fresh_images_fully_right(shipped):
    assert shipped.record["training"]["seed"] != 7
    accuracy = classifier_accuracy(shipped, seed=7, n=200)
    assert accuracy["images"] >= 0.97, accuracy
    assert (DEFAULT_DIR / WEIGHTS_FILE).stat().st_size <= 2 * 1024 * 1024


def test_read_scene_gives_the_drawn_scene_and_none_for_an_empty_canvas(shipped):
    texts = ["large red circle, top left, blue background",
             "small yellow star, bottom right, large outlined green hexagon, center, black background"]
    scenes = read_scene([render(t) for t in texts] + [Image.new("RGB", (64, 64), PALETTE["white"])], shipped)
    assert scenes[0] == parse_caption(texts[0])
    assert set(scenes[1].objects) == set(parse_caption(texts[1]).objects)   # read back in grid order
    assert scenes[2] is None and shipped.read([Image.new("RGB", (64, 64), PALETTE["white"])]) == \
        [Reading("white", ())]


def test_scene_matches_only_the_prompt_it_was_drawn_from(shipped):
    prompt = "small outlined yellow star, bottom right, large green ring, center, black background"
    image = render(prompt, 128, jitter_seed=4)
    assert scene_matches(prompt, image, shipped)
    assert scene_matches("large green ring, center, small outlined yellow star, bottom right, black background",
                         image, shipped)                                     # object order does not matter
    for wrong in ["small yellow star, bottom right, large green ring, center, black background",        # style
                  "small outlined yellow cross, bottom right, large green ring, center, black background",
                  "small outlined orange star, bottom right, large green ring, center, black background",
                  "large outlined yellow star, bottom right, large green ring, center, black background",
                  "small outlined yellow star, bottom left, large green ring, center, black background",
                  "small outlined yellow star, bottom right, large green ring, center, blue background",
                  "large green ring, center, black background"]:                                    # one missing
        assert not scene_matches(wrong, image, shipped), wrong
    assert not scene_matches("large green ring, center, black background", render(prompt), shipped)
    with pytest.raises(CaptionError, match="blob"):
        scene_matches("large green blob, center, black background", image, shipped)


def test_train_command_writes_weights_config_and_card_and_keeps_an_existing_one(tmp_path, capsys):
    from modules.shapes import classifier_command
    from modules.training.__main__ import COMMANDS
    assert COMMANDS["train-shapes-classifier"] == "modules.shapes.classifier_command"
    parser = argparse.ArgumentParser()
    classifier_command.add_arguments(parser)
    argv = ["--out", str(tmp_path / "c"), "--steps", "2", "--batch-size", "4", "--eval-images", "8",
            "--eval-sizes", "64", "32"]
    assert classifier_command.run(parser.parse_args(argv)) == 0
    card = (tmp_path / "c" / "README.md").read_text(encoding="utf-8")
    assert "train-shapes-classifier --steps 2 --batch-size 4" in card and "--eval-sizes 64 32" in card
    assert "images" in card and "32 px" in card
    record = load_classifier(tmp_path / "c").record
    assert [(a["n"], a["seed"], a["image_size"]) for a in record["accuracy"]] == [(8, 1, 64), (8, 1, 32)]
    assert set(record["accuracy"][0]) >= {"images", "background", "cells", "shape", "colour", "size", "style"}
    weights = (tmp_path / "c" / WEIGHTS_FILE).read_bytes()
    assert classifier_command.run(parser.parse_args(argv)) == 2
    assert "--force" in capsys.readouterr().err and (tmp_path / "c" / WEIGHTS_FILE).read_bytes() == weights
    assert classifier_command.run(parser.parse_args(argv[:2] + ["--seed", "1"])) == 2
    assert "must differ" in capsys.readouterr().err


def test_classifier_training_covers_the_held_out_shape_and_style():
    _, scenes = render_batch(0, 0, 400, (64,))
    objects = [o for s in scenes for o in s.objects]
    assert {o.shape for o in objects} == set(SHAPES) and {o.style for o in objects} == set(STYLES)

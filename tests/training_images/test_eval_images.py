"""eval-images: the command end to end on the tiny SD 1.5 fixture (2 samplers, a LoRA at two weights), the
scoring against generator images (right ones score ~100%, mismatched ones low), held-out prompts, and bad
input named with what exists."""
from __future__ import annotations

import json
import random

import pytest

from modules.shapes.classifier import Reading, load_classifier
from modules.shapes.dataset import example_rng, render_example
from modules.shapes.render import render
from modules.shapes.vocabulary import SHAPES, ShapeObject, Scene, caption, parse_caption
from modules.training.__main__ import main
from modules.training.images.eval_images import (ATTRIBUTES, EvalImagesError, EvalSettings, evaluate,
                                                 held_out_scenes, pair_objects, prompt_for, score_images,
                                                 score_readings)


@pytest.fixture(scope="module")
def classifier():
    return load_classifier()


def run_command(capsys, *args: str) -> tuple[int, str, str]:
    code = main(["eval-images", *args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_command_runs_two_samplers_end_to_end_and_writes_json(fixture_data_dir, tmp_path, capsys):
    out = tmp_path / "eval.json"
    code, printed, _ = run_command(capsys, "--model", "tiny-sd15", "--data-dir", str(fixture_data_dir), "--n", "4",
                                   "--steps", "2", "--samplers", "Euler a,DPM++ 2M", "--out", str(out))
    assert code == 0
    report = json.loads(out.read_text())
    assert report["model"] == "tiny-sd15" and report["settings"]["n"] == 4
    assert [r["sampler"] for r in report["results"]] == ["Euler a", "DPM++ 2M"]
    wanted = [caption(s) for s in held_out_scenes(4, 12345)]
    for row in report["results"]:
        assert row["n"] == 4 and row["lora_weight"] is None
        assert set(row["attributes"]) == set(ATTRIBUTES)
        assert all(0 <= v <= 1 for v in [row["all_right"], row["shape_found"], row["outlined"],
                                         *row["attributes"].values()])
        assert row["s_per_image"] > 0 and row["seconds"] >= row["s_per_image"]
        assert [i["prompt"] for i in row["images"]] == wanted
        assert row["all_right"] == sum(i["right"] for i in row["images"]) / 4
        # each image came from txt2img with the asked sampler, steps and per-image seed
        for number, image in enumerate(row["images"]):
            assert f"Sampler: {row['sampler']}" in image["infotext"] and "Steps: 2" in image["infotext"]
            assert f"Seed: {1 + number}," in image["infotext"]
    assert "| Euler a |" in printed and "| DPM++ 2M |" in printed and "all right" in printed


def test_a_lora_is_measured_at_each_weight_through_the_prompt_tag(fixture_data_dir):
    settings = EvalSettings(model="tiny-sd15", data_dir=str(fixture_data_dir), n=2, steps=2, samplers=("Euler",),
                            lora="tiny-sd15-kohya", lora_weights=(0.0, 1.0))
    rows, _ = evaluate(settings)
    assert [r.lora_weight for r in rows] == [0.0, 1.0]
    assert all("<lora:tiny-sd15-kohya:1>" in i["infotext"] and "Lora hashes" in i["infotext"]
               for i in rows[1].images)
    plain, _ = evaluate(EvalSettings(model="tiny-sd15", data_dir=str(fixture_data_dir), n=2, steps=2,
                                     samplers=("Euler",)))
    assert [i["read"] for i in rows[0].images] == [i["read"] for i in plain[0].images]   # weight 0 = no LoRA


def test_generator_images_score_about_100_percent_and_mismatched_ones_low(classifier):
    pairs = [render_example(7, i, 64) for i in range(60)]
    images, scenes = [p[0] for p in pairs], [p[1] for p in pairs]
    perfect = score_images(scenes, images, classifier)
    assert perfect.all_right >= 0.95
    assert all(v >= 0.97 for v in perfect.attributes.values())
    assert perfect.shape_found >= 0.97 and perfect.outlined == 0
    shifted = score_images(scenes, images[1:] + images[:1], classifier)       # each image another prompt's
    assert shifted.all_right <= 0.05
    assert shifted.attributes["background"] <= 0.4 and shifted.attributes["colour"] <= 0.4


def test_held_out_prompts_drawn_as_the_generator_draws_them_score_right(classifier):
    scenes = held_out_scenes(40, 99, shapes=tuple(SHAPES), styles=("filled", "outlined"))
    images = [render(s, 64, jitter_seed=i) for i, s in enumerate(scenes)]
    score = score_images(scenes, images, classifier)
    assert score.all_right >= 0.95
    outlined = sum(o.style == "outlined" for s in scenes for o in s.objects) / sum(len(s.objects) for s in scenes)
    assert abs(score.outlined - outlined) <= 0.05


def test_held_out_stream_is_deterministic_and_not_a_training_generator():
    a, b = held_out_scenes(20, 5), held_out_scenes(20, 5)
    assert a == b and held_out_scenes(20, 6) != a
    training = [render_example(5, i)[1] for i in range(20)]
    assert training != a and example_rng(5, 0).random() != random.Random("atelier-shapes-eval:5").random()
    assert all(len(s.objects) == 1 for s in held_out_scenes(10, 1, objects="1"))
    assert {o.shape for s in held_out_scenes(10, 1, shapes=("hexagon",)) for o in s.objects} == {"hexagon"}


def test_prompts_with_identifier_and_template():
    scene = parse_caption("large red hexagon, top left, small blue star, center, black background")
    assert prompt_for(scene) == caption(scene)
    assert prompt_for(scene, identifier="sks") == \
        "large red sks hexagon, top left, small blue sks star, center, black background"
    one = parse_caption("small outlined green hexagon, right, white background")
    assert prompt_for(one, identifier="sks", template="a {object}, {position}, {background} background") == \
        "a small outlined green sks hexagon, right, white background"
    assert prompt_for(one, template="sks {shape}, {position}") == "sks hexagon, right"


def test_objects_are_paired_by_cell_then_by_agreement():
    red_circle = ShapeObject("circle", "red", "large", "top left")
    scene = Scene((red_circle, ShapeObject("star", "blue", "small", "center")), "white")
    one_cell_off = Reading("white", (ShapeObject("circle", "red", "large", "top"),
                                     ShapeObject("star", "blue", "small", "center")))
    assert pair_objects(scene.objects, one_cell_off.objects)[0].position == "top"
    score = score_readings([scene], [one_cell_off])
    assert score.all_right == 0 and score.attributes["position"] == 0.5
    assert score.attributes["shape"] == score.attributes["colour"] == 1 and score.shape_found == 1
    missing = score_readings([scene], [Reading("white", (red_circle,))])
    assert missing.attributes["count"] == 0 and missing.attributes["shape"] == 0.5 and missing.shape_found == 0
    extra = score_readings([scene], [Reading("white", scene.objects + (ShapeObject("ring", "green", "small",
                                                                                     "bottom"),))])
    assert extra.all_right == 0 and extra.attributes["shape"] == 1 and extra.attributes["count"] == 0


def test_bad_settings_are_named_all_at_once_with_what_exists(fixture_data_dir):
    bad = EvalSettings(model="tiny-sd15", data_dir=str(fixture_data_dir), n=0, samplers=("Euler b",), size=63)
    with pytest.raises(EvalImagesError) as err:
        evaluate(bad)
    text = str(err.value)
    assert "--n 0" in text and "'Euler b'" in text and "Euler a" in text and "DPM++ 2M" in text and "--size 63" in text
    with pytest.raises(EvalImagesError, match=r"no-such-model.*tiny-sd15"):
        evaluate(EvalSettings(model="no-such-model", data_dir=str(fixture_data_dir), n=1))
    with pytest.raises(EvalImagesError, match=r"--lora 'nope' is not in .*tiny-sd15-kohya"):
        evaluate(EvalSettings(model="tiny-sd15", data_dir=str(fixture_data_dir), n=1, lora="nope"))
    with pytest.raises(EvalImagesError, match="made for sdxl"):
        evaluate(EvalSettings(model="tiny-sd15", data_dir=str(fixture_data_dir), n=1, lora="tiny-sdxl-kohya"))
    with pytest.raises(EvalImagesError, match="--objects 1"):
        evaluate(EvalSettings(model="tiny-sd15", n=1, prompt_template="sks {shape}"))


def test_command_reports_bad_input_and_keeps_an_existing_out_file(fixture_data_dir, tmp_path, capsys):
    code, _, err = run_command(capsys, "--model", "tiny-sd15", "--data-dir", str(fixture_data_dir), "--n", "-3",
                               "--samplers", "Euler a,Nope")
    assert code == 2 and "--n -3" in err and "'Nope'" in err and "valid samplers" in err
    code, _, err = run_command(capsys, "--model", "tiny-sd15", "--shapes", "octagon")
    assert code == 2 and "octagon" in err and "hexagon" in err
    code, _, err = run_command(capsys, "--model", "tiny-sd15", "--lora", "x:heavy")
    assert code == 2 and "numeric weights" in err
    out = tmp_path / "kept.json"
    out.write_text("mine")
    code, _, err = run_command(capsys, "--model", "tiny-sd15", "--data-dir", str(fixture_data_dir), "--out", str(out))
    assert code == 2 and "never overwritten" in err and out.read_text() == "mine"


def test_pictures_are_saved_with_their_prompts_and_never_over_files(fixture_data_dir, tmp_path, capsys):
    folder = tmp_path / "class-images"
    code, _, _ = run_command(capsys, "--model", "tiny-sd15", "--data-dir", str(fixture_data_dir), "--n", "2",
                             "--steps", "2", "--samplers", "Euler a", "--save-images", str(folder))
    assert code == 0
    from PIL import Image
    wanted = [caption(s) for s in held_out_scenes(2, 12345)]
    assert [(folder / f"{i:05d}.txt").read_text() for i in range(2)] == wanted
    with Image.open(folder / "00000.png") as image:
        assert "Seed: 1," in image.info["parameters"] and image.size == (64, 64)
    before = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}
    code, _, err = run_command(capsys, "--model", "tiny-sd15", "--data-dir", str(fixture_data_dir), "--n", "2",
                               "--steps", "2", "--save-images", str(folder))
    assert code == 2 and "never overwritten" in err
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == before

"""X/Y/Z plot: value parsing, axes, the labelled grid, and run() driving generation through p.process()."""
from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest
from PIL import Image

from modules.diffusion.processing import GenerationParams, Processed
from modules.extensions.scripts import ScriptRunner

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def xyz():
    spec = importlib.util.spec_from_file_location("xyz_grid_under_test", REPO / "scripts" / "xyz_grid.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the file executes
    spec.loader.exec_module(module)
    yield module
    sys.modules.pop(spec.name, None)


def test_loads_as_selectable_builtin_script():
    runner = ScriptRunner()
    runner.load_file(REPO / "scripts" / "xyz_grid.py")
    assert not runner.load_errors
    assert [s.title() for s in runner.selectable("txt2img")] == ["X/Y/Z plot"]
    assert runner.by_title("x/y/z plot", "img2img").title() == "X/Y/Z plot"


def test_value_parsing_and_ranges(xyz):
    assert xyz.split_values('1, 2,"a, b", ,3') == ["1", "2", "a, b", "3"]
    assert xyz.expand_numbers(["1-5"], int) == [1, 2, 3, 4, 5]
    assert xyz.expand_numbers(["1-10 (+3)"], int) == [1, 4, 7, 10]
    assert xyz.expand_numbers(["1-10 [4]"], int) == [1, 4, 7, 10]
    assert xyz.expand_numbers(["5-3"], int) == [5, 4, 3]
    assert xyz.expand_numbers(["5-7 (+0.5)", "9"], float) == [5.0, 5.5, 6.0, 6.5, 7.0, 9.0]
    with pytest.raises(ValueError, match="'seven' is not a whole number"):
        xyz.expand_numbers(["seven"], int)
    axis, values = xyz.parse_axis("Sampler", "Euler a, DPM++ 2M Karras", "X")
    assert values == ["Euler a", "DPM++ 2M"]
    with pytest.raises(ValueError, match="X \\(Sampler\\).*unknown sampler 'Nope'.*Euler a"):
        xyz.parse_axis("Sampler", "Nope", "X")
    with pytest.raises(ValueError, match="unknown axis type 'Width'"):
        xyz.parse_axis("Width", "64", "Y")
    with pytest.raises(ValueError, match="give at least one value"):
        xyz.parse_axis("Steps", " ", "Z")


def _fake_runner(calls):
    def run(q: GenerationParams) -> Processed:
        calls.append(q)
        image = Image.new("RGB", (32, 32), (q.steps * 20 % 256, int(q.cfg_scale) * 30 % 256, 0))
        return Processed(images=[image], infotexts=[f"{q.prompt}\nSteps: {q.steps}"], seeds=[q.seed],
                         subseeds=[q.subseed], prompts=[q.prompt], negative_prompts=[q.negative_prompt], params=q,
                         model_name="m", model_hash="h")
    return run


def test_run_builds_every_cell_and_a_labelled_grid(xyz):
    calls = []
    p = GenerationParams(prompt="a red cat", negative_prompt="red", seed=-1, steps=4)
    p.runner = _fake_runner(calls)
    result = xyz.XYZPlot().run(p, x_type="Steps", x_values="1-3", y_type="CFG Scale", y_values="2, 7",
                               z_type="Prompt S/R", z_values="red, blue")
    assert len(calls) == 3 * 2 * 2
    assert [(q.steps, q.cfg_scale) for q in calls[:6]] == [(1, 2.0), (2, 2.0), (3, 2.0), (1, 7.0), (2, 7.0), (3, 7.0)]
    assert calls[6].prompt == "a blue cat" and calls[6].negative_prompt == "blue"
    assert len({q.seed for q in calls}) == 1 and calls[0].seed != -1  # one random seed shared by all cells
    assert all(q.script_name is None for q in calls)  # cells do not recurse into the script
    assert result.grid is result.images[0] and result.index_of_first_image == 1
    assert len(result.images) == 1 + 12 and len(result.infotexts) == 13
    grid = result.grid
    # two z-grids side by side, each: label column + 3 columns of 32 px, title + label row + 2 rows
    assert grid.width > 2 * 3 * 32 and grid.height > 2 * 32
    # the cell at steps=3, cfg=7 of the first z-grid carries its colour; labels are drawn (dark pixels)
    cell_colours = {grid.getpixel((x, y)) for x in range(grid.width) for y in range(grid.height)}
    assert (60, 210, 0) in cell_colours
    label_strip = grid.crop((0, 0, grid.width // 2, 40)).convert("L")
    assert label_strip.getextrema()[0] < 100


def test_checkpoint_axis_uses_override_settings(xyz):
    calls = []
    p = GenerationParams(prompt="x", seed=3)
    p.runner = _fake_runner(calls)
    xyz.XYZPlot().run(p, x_type="Checkpoint name", x_values="a.safetensors, b [0123456789]", draw_legend=False)
    assert [q.override_settings["sd_model_checkpoint"] for q in calls] == ["a.safetensors", "b [0123456789]"]
    assert [q.seed for q in calls] == [3, 3]

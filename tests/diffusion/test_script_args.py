"""A1111's positional script_args: mapped onto a script's declared ``args`` order and type-checked against
run()'s defaults; keyword objects still work; a script without an order takes names only."""
from __future__ import annotations

from pathlib import Path

import pytest

from modules.extensions.scripts import Script, ScriptRunner

REPO = Path(__file__).resolve().parents[2]


class ByName(Script):
    def title(self):
        return "By name"

    def run(self, p, strength: float = 0.5, **_):
        return None


@pytest.fixture
def runner():
    r = ScriptRunner()
    r.load_file(REPO / "scripts" / "xyz_grid.py")
    r.load_file(REPO / "scripts" / "sd_upscale.py")
    r.scripts.append(ByName())
    assert not r.load_errors
    return r


def test_positional_list_maps_onto_declared_order(runner):
    xyz = runner.by_title("x/y/z plot", "txt2img")
    assert runner.named_args(xyz, ["Steps", "1, 2", "CFG Scale", "3, 7"]) == {
        "x_type": "Steps", "x_values": "1, 2", "y_type": "CFG Scale", "y_values": "3, 7"}
    assert runner.named_args(xyz, {"x_type": "Seed"}) == {"x_type": "Seed"}  # keywords preferred, unchanged
    up = runner.by_title("SD upscale", "img2img")
    assert runner.named_args(up, [32, "Lanczos", 2]) == {"overlap": 32, "upscaler": "Lanczos", "scale_factor": 2}


def test_wrong_count_or_type_names_script_and_order(runner):
    xyz = runner.by_title("x/y/z plot", "txt2img")
    with pytest.raises(ValueError, match="'X/Y/Z plot' takes at most 7.*\\[x_type, x_values, y_type"):
        runner.named_args(xyz, ["Steps"] * 8)
    with pytest.raises(ValueError, match="script_args\\[0\\] \\(x_type\\): expected text, got 4.*order is \\[x_type"):
        runner.named_args(xyz, [4, "1, 2"])
    with pytest.raises(ValueError, match="script_args\\[6\\] \\(draw_legend\\): expected true or false"):
        runner.named_args(xyz, ["Steps", "1", "Nothing", "", "Nothing", "", 1])
    up = runner.by_title("SD upscale", "img2img")
    with pytest.raises(ValueError, match="\\(overlap\\): expected a whole number, got 'wide'"):
        runner.named_args(up, ["wide"])
    with pytest.raises(ValueError, match="'By name' takes its values by name"):
        runner.named_args(runner.by_title("By name", "txt2img"), [0.3])
    assert runner.named_args(runner.by_title("By name", "txt2img"), []) == {}

"""X/Y/Z plot: generate one image per combination of up to three axes and lay them out in a labelled grid.

A built-in script written only on the public Script API: ``ui()`` returns named components, ``run(p,
**values)`` receives their values by name and generates each cell with ``p.copy(...).process()``.

Axis values are comma separated (quotes allowed, as in CSV). Numeric axes also take ranges as A1111
does: ``1-5`` (every integer), ``1-10 (+3)`` (step), ``1-10 [4]`` (that many evenly spaced values).
"Prompt S/R" replaces its first value, wherever it occurs in the prompts, by each value in turn.
"""
from __future__ import annotations

import csv
import io
import re
from dataclasses import dataclass
from typing import Any, Callable

from PIL import Image, ImageDraw, ImageFont

from modules.extensions.scripts import Script

_RANGE = re.compile(r"^\s*([+-]?\d+(?:\.\d*)?)\s*-\s*([+-]?\d+(?:\.\d*)?)\s*(?:\(\s*\+?\s*([+-]?\d+(?:\.\d*)?)\s*\)|\[\s*(\d+)\s*\])?\s*$")


def split_values(text: str) -> list[str]:
    """Comma-separated values, honouring double quotes; blanks dropped."""
    if not text or not text.strip():
        return []
    row = next(csv.reader(io.StringIO(text), skipinitialspace=True))
    return [v.strip() for v in row if v.strip()]


def expand_numbers(values: list[str], kind: type) -> list:
    """Numbers with A1111's range forms expanded; ValueError names the value that is not a number."""
    out: list = []
    for value in values:
        m = _RANGE.match(value)
        if m and kind is int and all(re.fullmatch(r"[+-]?\d+", g) for g in m.groups()[:2]):
            start, end = int(m.group(1)), int(m.group(2))
            if m.group(4):
                count = max(1, int(m.group(4)))
                out += [round(start + (end - start) * i / max(1, count - 1)) for i in range(count)]
            else:
                step = int(m.group(3) or (1 if end >= start else -1))
                if step == 0:
                    raise ValueError(f"range {value!r}: the step cannot be 0")
                out += list(range(start, end + (1 if step > 0 else -1), step))
            continue
        if m and kind is float:
            start, end = float(m.group(1)), float(m.group(2))
            if m.group(4):
                count = max(1, int(m.group(4)))
                out += [start + (end - start) * i / max(1, count - 1) for i in range(count)]
                continue
            if m.group(3):
                step, x = float(m.group(3)), start
                if step == 0:
                    raise ValueError(f"range {value!r}: the step cannot be 0")
                while (x <= end + 1e-9) if step > 0 else (x >= end - 1e-9):
                    out.append(round(x, 6))
                    x += step
                continue
        try:
            out.append(kind(float(value)) if kind is int else kind(value))
        except ValueError:
            raise ValueError(f"{value!r} is not a {'whole ' if kind is int else ''}number") from None
    return out


@dataclass(frozen=True)
class AxisType:
    label: str
    parse: Callable[[list[str]], list]
    apply: Callable[[Any, Any, list], Any]  # (p, value, all values) -> changed copy of p
    describe: Callable[[Any], str] = str


def _sampler_values(values: list[str]) -> list[str]:
    from modules.diffusion.samplers import resolve_sampler
    return [resolve_sampler(v, "Automatic")[0] for v in values]


def _schedule_values(values: list[str]) -> list[str]:
    from modules.diffusion.samplers import SCHEDULE_TYPES
    out = []
    for v in values:
        match = next((s for s in SCHEDULE_TYPES if s.lower() == v.lower()), None)
        if match is None:
            raise ValueError(f"unknown schedule type {v!r}; valid: {', '.join(SCHEDULE_TYPES)}")
        out.append(match)
    return out


def _prompt_sr(p, value: str, values: list) -> Any:
    search = values[0]
    return p.copy(prompt=p.prompt.replace(search, value), negative_prompt=p.negative_prompt.replace(search, value))


def _checkpoint(p, value: str, values: list) -> Any:
    return p.copy(override_settings={**p.override_settings, "sd_model_checkpoint": value})


AXES: dict[str, AxisType] = {a.label: a for a in (
    AxisType("Nothing", lambda v: [None], lambda p, x, vs: p, lambda x: ""),
    AxisType("Seed", lambda v: expand_numbers(v, int), lambda p, x, vs: p.copy(seed=x)),
    AxisType("Steps", lambda v: expand_numbers(v, int), lambda p, x, vs: p.copy(steps=x)),
    AxisType("CFG Scale", lambda v: expand_numbers(v, float), lambda p, x, vs: p.copy(cfg_scale=x)),
    AxisType("Sampler", _sampler_values, lambda p, x, vs: p.copy(sampler_name=x)),
    AxisType("Schedule type", _schedule_values, lambda p, x, vs: p.copy(scheduler=x)),
    AxisType("Checkpoint name", lambda v: list(v), _checkpoint),
    AxisType("Prompt S/R", lambda v: list(v), _prompt_sr),
)}


def parse_axis(kind: str, text: str, name: str) -> tuple[AxisType, list]:
    """(axis, values) for one axis; ValueError naming the axis and the problem."""
    axis = AXES.get(kind)
    if axis is None:
        raise ValueError(f"{name}: unknown axis type {kind!r}; valid: {', '.join(AXES)}")
    if kind == "Nothing":
        return axis, [None]
    values = split_values(text)
    if not values:
        raise ValueError(f"{name} ({kind}): give at least one value, comma separated")
    try:
        parsed = axis.parse(values)
    except ValueError as exc:
        raise ValueError(f"{name} ({kind}): {exc}") from None
    return axis, parsed


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has only the fixed bitmap font
        return ImageFont.load_default()


def draw_grid(cells: list[list[Image.Image]], x_labels: list[str], y_labels: list[str],
              title: str = "") -> Image.Image:
    """A grid of ``cells[row][col]`` with the x labels above the columns, the y labels left of the rows
    and an optional title on top (the z value)."""
    cell_w, cell_h = cells[0][0].size
    font_size = max(10, min(32, cell_w // 8))
    font = _font(font_size)
    probe = ImageDraw.Draw(Image.new("RGB", (1, 1)))
    left = 0 if not any(y_labels) else min(cell_w * 2, max(probe.textlength(t, font=font) for t in y_labels) + 16)
    top = 0 if not any(x_labels) else font_size * 2
    head = font_size * 2 if title else 0
    rows, cols = len(cells), len(cells[0])
    grid = Image.new("RGB", (int(left) + cols * cell_w, head + top + rows * cell_h), "white")
    draw = ImageDraw.Draw(grid)
    if title:
        draw.text((grid.width / 2, head / 2), title, fill="black", font=font, anchor="mm")
    for c, label in enumerate(x_labels):
        draw.text((left + c * cell_w + cell_w / 2, head + top / 2), label, fill="black", font=font, anchor="mm")
    for r, label in enumerate(y_labels):
        draw.text((left / 2, head + top + r * cell_h + cell_h / 2), label, fill="black", font=font, anchor="mm")
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            grid.paste(cell.convert("RGB").resize((cell_w, cell_h)), (int(left) + c * cell_w, head + top + r * cell_h))
    return grid


def combine_horizontally(grids: list[Image.Image], gap: int = 16) -> Image.Image:
    if len(grids) == 1:
        return grids[0]
    width = sum(g.width for g in grids) + gap * (len(grids) - 1)
    out = Image.new("RGB", (width, max(g.height for g in grids)), "white")
    x = 0
    for g in grids:
        out.paste(g, (x, 0))
        x += g.width + gap
    return out


class XYZPlot(Script):
    #: positional ``script_args`` order (A1111 clients); axis types are given by name, e.g. "Steps"
    args = ("x_type", "x_values", "y_type", "y_values", "z_type", "z_values", "draw_legend")

    def title(self) -> str:
        return "X/Y/Z plot"

    def show(self, tab: str) -> bool:
        return True

    def ui(self, tab: str) -> dict[str, Any]:
        import gradio as gr
        names = list(AXES)
        out = {}
        for axis, default in (("x", "Seed"), ("y", "Nothing"), ("z", "Nothing")):
            with gr.Row():
                out[f"{axis}_type"] = gr.Dropdown(names, value=default, label=f"{axis.upper()} type",
                                                  elem_id=f"{tab}_xyz_{axis}_type")
                out[f"{axis}_values"] = gr.Textbox(label=f"{axis.upper()} values", elem_id=f"{tab}_xyz_{axis}_values")
        out["draw_legend"] = gr.Checkbox(True, label="Draw legend", elem_id=f"{tab}_xyz_draw_legend")
        return out

    def run(self, p: Any, x_type: str = "Nothing", x_values: str = "", y_type: str = "Nothing",
            y_values: str = "", z_type: str = "Nothing", z_values: str = "", draw_legend: bool = True,
            **_: Any) -> Any:
        from modules.diffusion.processing import Processed, resolve_seed
        axes = [parse_axis(x_type, x_values, "X"), parse_axis(y_type, y_values, "Y"), parse_axis(z_type, z_values, "Z")]
        (xa, xs), (ya, ys), (za, zs) = axes
        base = p.copy(seed=resolve_seed(p.seed), script_name=None, script_args={})
        base.runner = p.runner
        cell_images, cell_texts, seeds, grids = [], [], [], []
        result = None
        for z in zs:
            rows = []
            for y in ys:
                row = []
                for x in xs:
                    q = za.apply(ya.apply(xa.apply(base, x, xs), y, ys), z, zs)
                    q.runner = p.runner
                    result = q.process()
                    if not result.images:  # interrupted before the cell finished
                        return self._result(p, cell_images, cell_texts, seeds, grids, result, Processed)
                    row.append(result.images[0])
                    cell_images.extend(result.images)
                    cell_texts.extend(result.infotexts)
                    seeds.extend(result.seeds)
                rows.append(row)
            labels = (lambda a, vs: [f"{a.label}: {a.describe(v)}" for v in vs] if a.label != "Nothing" else [""])
            grids.append(draw_grid(rows, labels(xa, xs) if draw_legend else [], labels(ya, ys) if draw_legend else [],
                                   title=f"{za.label}: {za.describe(z)}" if draw_legend and za.label != "Nothing" else ""))
        return self._result(p, cell_images, cell_texts, seeds, grids, result, Processed)

    @staticmethod
    def _result(p, images, texts, seeds, grids, last, processed_cls):
        grid = combine_horizontally(grids) if grids else None
        out = processed_cls(images=([grid] if grid else []) + images, infotexts=(texts[:1] if grid else []) + texts,
                            seeds=(seeds[:1] if grid else []) + seeds, subseeds=[], prompts=[], negative_prompts=[],
                            params=p, model_name=getattr(last, "model_name", ""),
                            model_hash=getattr(last, "model_hash", ""),
                            warnings=list(getattr(last, "warnings", []) or []),
                            interrupted=bool(getattr(last, "interrupted", False)), grid=grid,
                            index_of_first_image=1 if grid else 0)
        return out

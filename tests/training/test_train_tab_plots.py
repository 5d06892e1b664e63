"""The Train tab's plot data: a split plot holds every split from its first point on, so points of a split
that arrives later (validation) are drawn by the live chart, which keeps the colour domain of its first draw."""
import math

from modules.ui.tabs.train import SPLIT_COLORS, _frame


def test_a_split_without_points_yet_is_in_the_data_with_an_empty_value():
    frame = _frame([{"step": 3, "loss": 5.0, "split": "train"}, {"step": 4, "loss": 4.5, "split": "train"},
                    {"step": 4, "loss": None, "split": "validation"}], "loss", "split")
    assert set(frame["split"]) == set(SPLIT_COLORS)
    validation = frame[frame["split"] == "validation"]
    assert len(validation) == 1 and math.isnan(validation["loss"].iloc[0]) and validation["step"].iloc[0] == 3
    assert frame["loss"].dtype.kind == "f"                       # stays a number column: the y axis is quantitative
    assert list(frame[frame["split"] == "train"]["loss"]) == [5.0, 4.5]


def test_real_points_are_kept_and_nothing_is_added_when_every_split_has_points_or_there_is_no_data():
    rows = [{"step": 1, "loss": 5.0, "split": "train"}, {"step": 25, "loss": 4.0, "split": "validation"}]
    assert _frame(rows, "loss", "split").to_dict("records") == rows
    assert _frame([], "loss", "split").empty
    assert _frame([{"step": 1, "lr": 1e-3}], "lr", None).to_dict("records") == [{"step": 1, "lr": 1e-3}]

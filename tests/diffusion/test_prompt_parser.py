"""A1111 prompt syntax: every case of the reference tables (a1111.md section 4) and more."""
from __future__ import annotations

import pytest

from modules.diffusion.prompt_parser import (ExtraNetworkParams, extract_extra_networks, parse_prompt_attention,
                                             prompt_schedule)

ALT = lambda a, b: [[i, a if i % 2 else b] for i in range(1, 11)]  # noqa: E731

SCHEDULES = [
    ("test", [[10, "test"]]),
    ("a [b:3]", [[3, "a "], [10, "a b"]]),
    ("a [b: 3]", [[3, "a "], [10, "a b"]]),
    ("a [[[b]]:2]", [[2, "a "], [10, "a [[b]]"]]),
    ("[(a:2):3]", [[3, ""], [10, "(a:2)"]]),
    ("a [b : c : 1] d", [[1, "a b  d"], [10, "a  c  d"]]),
    ("a[b:[c:d:2]:1]e", [[1, "abe"], [2, "ace"], [10, "ade"]]),
    ("a [unbalanced", [[10, "a [unbalanced"]]),
    ("a [b:.5] c", [[5, "a  c"], [10, "a b c"]]),
    # The table's expected value. (A1111's own code renders this one literally — its doctest says
    # "not handling this right now"; we follow the documented result.)
    ("a [{b|d{:.5] c", [[5, "a  c"], [10, "a {b|d{ c"]]),
    ("((a][:b:c [d:3]", [[3, "((a][:b:c "], [10, "((a][:b:c d"]]),
    ("[a|(b:1.1)]", ALT("a", "(b:1.1)")),
    ("[fe|]male", ALT("female", "male")),
    ("[fe|||]male", [[i, "female" if i in (1, 5, 9) else "male"] for i in range(1, 11)]),
    # beyond the table
    ("[from::4] rest", [[4, "from rest"], [10, " rest"]]),
    ("[cat:dog:0.25]", [[2, "cat"], [10, "dog"]]),
    ("[cat:dog:0]", [[10, "dog"]]),
    ("[cat:dog:20]", [[10, "cat"]]),
    ("\\[not:3\\]", [[10, "\\[not:3\\]"]]),
]


@pytest.mark.parametrize("prompt,expected", SCHEDULES)
def test_schedule_table(prompt, expected):
    assert prompt_schedule(prompt, 10) == expected


@pytest.mark.parametrize("prompt,expected", [
    ("a [b:.5] c", [[10, "a b c"]]),
    ("a [b:1.5] c", [[5, "a  c"], [10, "a b c"]]),
    ("a [b:15] c", [[5, "a  c"], [10, "a b c"]]),  # integers count on from the base pass's 10 steps
    ("a [b:5] c", [[10, "a b c"]]),
])
def test_hires_schedule(prompt, expected):
    assert prompt_schedule(prompt, 10, hires_steps=10) == expected


def test_old_scheduling_treats_numbers_below_one_as_fractions():
    assert prompt_schedule("a [b:0.5] c", 10, use_old_scheduling=True) == [[5, "a  c"], [10, "a b c"]]
    assert prompt_schedule("a [b:3.0] c", 10, use_old_scheduling=True) == [[3, "a  c"], [10, "a b c"]]


def test_deep_nesting_parses_quickly():
    import time
    started = time.perf_counter()
    nested = "[" * 60 + "a" + "]" * 60 + " (" * 60 + "b:1.2" + ")" * 60 + " [[[[[[[[[[[[[[[[[[[[c:3"
    result = prompt_schedule(nested + " [x:y:5]", 10)
    assert time.perf_counter() - started < 1.0
    assert [step for step, _ in result] == [5, 10]


def test_unparseable_prompt_falls_back_to_literal():
    deep = "[" * 3000 + "a:1]"
    assert prompt_schedule(deep, 10) == [[10, deep]]


ATTENTION = [
    ("normal text", [["normal text", 1.0]]),
    ("an (important) word", [["an ", 1.0], ["important", 1.1], [" word", 1.0]]),
    ("(unbalanced", [["unbalanced", 1.1]]),
    ("\\(literal\\]", [["(literal]", 1.0]]),
    ("(unnecessary)(parens)", [["unnecessaryparens", 1.1]]),
    ("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky))).",
     [["a ", 1.0], ["house", 1.3 * 1.1 * 1.1], [" ", 1.1], ["on", 1.0], [" a ", 1.1], ["hill", 0.55],
      [", sun, ", 1.1], ["sky", 1.1 ** 4], [".", 1.1]]),
    # beyond the table
    ("", [["", 1.0]]),
    ("((x))", [["x", 1.21]]),
    ("[x]", [["x", 1 / 1.1]]),
    ("[[x]]", [["x", 1 / 1.1 / 1.1]]),
    ("(x:1.5)", [["x", 1.5]]),
    ("((x:1.2):1.5)", [["x", 1.8]]),
    ("(x: 0.5 )", [["x", 0.5]]),
    ("[x:1.5]", [["x:1.5", 1 / 1.1]]),  # explicit weights only in round brackets
    ("x:1.5)", [["x:1.5)", 1.0]]),
    ("a \\\\ b", [["a \\ b", 1.0]]),
    ("[unbalanced", [["unbalanced", 1 / 1.1]]),
    ("a BREAK b", [["a", 1.0], ["BREAK", -1], ["b", 1.0]]),
    ("(a BREAK b)", [["a", 1.1], ["BREAK", -1.1], ["b", 1.1]]),
    ("BREAKFAST", [["BREAKFAST", 1.0]]),
]


@pytest.mark.parametrize("text,expected", ATTENTION)
def test_attention_table(text, expected):
    got = parse_prompt_attention(text)
    assert [t for t, _ in got] == [t for t, _ in expected]
    assert [w for _, w in got] == pytest.approx([w for _, w in expected], rel=1e-9)


def test_attention_float_order_matches_a1111_exactly():
    got = dict(parse_prompt_attention("a (((house:1.3)) [on] a (hill:0.5), sun, (((sky)))."))
    assert got["house"] == 1.5730000000000004 and got["sky"] == 1.4641000000000006


def test_extract_extra_networks():
    clean, nets = extract_extra_networks("a cat <lora:foo:0.8>, <lora:bar:te=0.5:unet=0.2> <hypernet:h:1> x")
    assert clean == "a cat ,   x"
    assert sorted(nets) == ["hypernet", "lora"]
    foo, bar = nets["lora"]
    assert (foo.name, foo.lora_weights()) == ("foo", (0.8, 0.8))
    assert (bar.name, bar.lora_weights()) == ("bar", (0.5, 0.2))
    assert nets["hypernet"][0].items == ["h", "1"]


@pytest.mark.parametrize("items,expected", [
    (["n"], (1.0, 1.0)),
    (["n", "0.5"], (0.5, 0.5)),
    (["n", "0.5", "0.25"], (0.5, 0.25)),
    (["n", "unet=0.3"], (1.0, 0.3)),
    (["n", "te=0", "unet=1"], (0.0, 1.0)),
    (["n", "0.5", "0.25", "dyn=4"], (0.5, 0.25)),
])
def test_lora_weight_forms(items, expected):
    assert ExtraNetworkParams(items).lora_weights() == expected


def test_lyco_alias_and_bad_weight():
    _, nets = extract_extra_networks("<lyco:x:0.5>")
    assert nets["lora"][0].lora_weights() == (0.5, 0.5)
    with pytest.raises(ValueError, match="not a number"):
        ExtraNetworkParams(["x", "much"]).lora_weights()

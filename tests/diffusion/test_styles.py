"""Prompt styles in A1111's styles.csv format: {prompt} placeholder, order, atomic save with .bak, no
silent overwrite, columns other tools added kept."""
from __future__ import annotations

import pytest

from modules.diffusion.styles import StyleError, StyleStore, merge_prompt


def test_merge_prompt_follows_a1111():
    assert merge_prompt("cinematic, {prompt}, 35mm", "a cat") == "cinematic, a cat, 35mm"
    assert merge_prompt("cinematic", "a cat ") == "a cat, cinematic"
    assert merge_prompt("cinematic", "") == "cinematic"
    assert merge_prompt("", "a cat") == "a cat"


def test_load_apply_in_order_and_unknown_names(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text('name,prompt,negative_prompt\n"Cine","cinematic, {prompt}","blurry"\nWarm,warm light,\n'
                    '"Old",,"lowres"\n', encoding="utf-8")
    store = StyleStore(path)
    assert store.names() == ["Cine", "Warm", "Old"]
    assert store.apply("a cat", "ugly", ["Cine", "Warm"]) == ("cinematic, a cat, warm light", "ugly, blurry")
    assert store.apply("a cat", "", ["Warm", "Cine"]) == ("cinematic, a cat, warm light", "blurry")
    with pytest.raises(StyleError, match="unknown style\\(s\\) 'Nope'.*prompt-styles.*Cine"):
        store.apply("a", "", ["Nope"])
    with pytest.raises(StyleError, match="list of style names"):
        store.apply("a", "", "Cine")


def test_old_text_column_and_missing_file(tmp_path):
    assert StyleStore(tmp_path / "none.csv").load() == []
    path = tmp_path / "styles.csv"
    path.write_text("name,text\nA,alpha\n", encoding="utf-8")
    assert StyleStore(path).get("A").prompt == "alpha"


def test_save_refuses_existing_name_replaces_explicitly_and_keeps_a_backup(tmp_path):
    path = tmp_path / "styles.csv"
    path.write_text("name,prompt,negative_prompt,author\nMine,my words,,me\n", encoding="utf-8")
    original = path.read_bytes()
    store = StyleStore(path)
    with pytest.raises(StyleError, match="already exists.*Replace existing"):
        store.save_style("Mine", "other", "")
    assert path.read_bytes() == original  # refused: nothing written
    store.save_style("New", "new words, {prompt}", "bad")
    assert (tmp_path / "styles.csv.bak").read_bytes() == original
    assert store.names() == ["Mine", "New"]
    store.save_style("Mine", "replaced", "neg", replace=True)
    mine = store.get("Mine")
    assert (mine.prompt, mine.negative_prompt, mine.extra["author"]) == ("replaced", "neg", "me")
    assert "author" in path.read_text(encoding="utf-8").splitlines()[0]  # the extra column survives
    assert not list(tmp_path.glob(".styles-*"))  # no temporary file left behind
    with pytest.raises(StyleError, match="give the style a name"):
        store.save_style("  ", "x", "")

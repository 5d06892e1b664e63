"""Caption files (UTF-8 as kohya reads them, BOMs handled, other encodings refused by name) and the
per-sample augmentations: dropout at its rate, shuffling that keeps the first N tags, tag dropout,
all deterministic per (seed, epoch, slot) and independent of one another."""
from __future__ import annotations

import codecs

import pytest

from modules.training.images.captions import (
    CaptionFileError,
    CaptionOptions,
    CaptionOptionsError,
    find_caption_file,
    make_caption,
    read_caption_file,
)

TAGS = "sks dog, red collar, grass, sunny, park, running, happy, close-up"


def captions(options, *, seed=0, epoch=0, slots=range(2000), lines=(TAGS,)):
    return [make_caption(lines, options, seed=seed, epoch=epoch, slot=s) for s in slots]


def test_find_caption_file_prefers_txt(tmp_path):
    image = tmp_path / "a.png"
    assert find_caption_file(image) is None
    (tmp_path / "a.caption").write_text("from caption")
    assert find_caption_file(image) == tmp_path / "a.caption"
    (tmp_path / "a.txt").write_text("from txt")
    assert find_caption_file(image) == tmp_path / "a.txt"
    assert find_caption_file(image, (".caption",)) == tmp_path / "a.caption"


def test_read_caption_file_encodings(tmp_path):
    path = tmp_path / "c.txt"
    path.write_bytes(codecs.BOM_UTF8 + "café, naïve\n\n  second line  \n".encode())
    assert read_caption_file(path) == ("café, naïve", "second line")   # BOM not in the first tag
    path.write_bytes("crème brûlée".encode("utf-16"))                   # Notepad's "Unicode": BOM + UTF-16
    assert read_caption_file(path) == ("crème brûlée",)
    path.write_bytes(b"  \n\n")
    assert read_caption_file(path) == ()
    path.write_bytes("café".encode("latin-1"))
    with pytest.raises(CaptionFileError, match=r"caption 1_x/c.txt is not UTF-8 text \(byte 0xe9 at position 3\)"):
        read_caption_file(path, "1_x/c.txt")
    path.write_bytes("dog".encode("utf-16-le"))                          # UTF-16 without a BOM
    with pytest.raises(CaptionFileError, match="NUL bytes"):
        read_caption_file(path)


def test_no_augmentation_leaves_the_caption_alone():
    assert set(captions(CaptionOptions(), slots=range(50))) == {TAGS}
    assert make_caption((), CaptionOptions(), seed=0, epoch=0, slot=0) == ""


def test_dropout_rate_is_met_and_deterministic():
    options = CaptionOptions(dropout_rate=0.1)
    out = captions(options, slots=range(4000))
    share = sum(c == "" for c in out) / len(out)
    assert 0.085 < share < 0.115
    assert set(out) == {"", TAGS}
    assert out == captions(options, slots=range(4000))                      # same seed, epoch: same draws
    assert out != captions(options, epoch=1, slots=range(4000))             # another epoch: other draws
    assert out != captions(options, seed=1, slots=range(4000))
    assert "" not in captions(CaptionOptions(dropout_rate=0.0))
    assert set(captions(CaptionOptions(dropout_rate=1.0), slots=range(20))) == {""}


def test_shuffle_keeps_the_first_tokens_and_permutes_the_rest():
    tags = [t.strip() for t in TAGS.split(",")]
    options = CaptionOptions(shuffle=True, keep_tokens=2)
    out = captions(options, slots=range(500))
    for caption in out:
        got = caption.split(", ")
        assert got[:2] == tags[:2]
        assert sorted(got[2:]) == sorted(tags[2:])
    assert len(set(out)) > 300                                            # 6! = 720 orders of the rest
    assert out == captions(options, slots=range(500))
    assert captions(options, epoch=3, slots=range(500)) != out
    # keep_tokens=0 moves the first tag too
    assert {c.split(", ")[0] for c in captions(CaptionOptions(shuffle=True), slots=range(200))} == set(tags)


def test_augmentations_draw_independently():
    """Turning shuffle on does not change which samples lose their caption (separate seed streams)."""
    plain = captions(CaptionOptions(dropout_rate=0.3))
    shuffled = captions(CaptionOptions(dropout_rate=0.3, shuffle=True, keep_tokens=1))
    assert [c == "" for c in plain] == [c == "" for c in shuffled]


def test_tag_dropout_spares_kept_tokens():
    tags = [t.strip() for t in TAGS.split(",")]
    out = captions(CaptionOptions(tag_dropout_rate=0.5, keep_tokens=1), slots=range(1000))
    kept = []
    for caption in out:
        got = caption.split(", ")
        assert got[0] == tags[0]
        assert [t for t in tags if t in got[1:]] == got[1:]                  # no shuffle: order kept
        kept.append(len(got) - 1)
    assert 0.45 < sum(kept) / (len(kept) * (len(tags) - 1)) < 0.55


def test_several_lines_are_alternatives_picked_per_sample():
    lines = ("a photo of sks dog", "sks dog on grass", "sks dog, close-up")
    out = captions(CaptionOptions(), lines=lines, slots=range(300))
    assert set(out) == set(lines)
    assert out == captions(CaptionOptions(), lines=lines, slots=range(300))


def test_bad_options_listed_together():
    with pytest.raises(CaptionOptionsError) as info:
        CaptionOptions(dropout_rate=1.5, keep_tokens=-1, tag_dropout_rate="x", shuffle="yes", separator="")
    assert len(info.value.problems) == 5
    assert "dropout_rate 1.5" in str(info.value) and "keep_tokens -1" in str(info.value)

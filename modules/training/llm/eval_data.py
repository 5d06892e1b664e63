"""Reading evaluation files: multiple-choice JSONL and held-out text, every problem named by file and line.

Both readers check the whole file before any model is loaded, so a typo on line 4,000 costs a second, not
an evaluation run; all bad lines are reported at once (the first :data:`MAX_LISTED`).
"""
from __future__ import annotations

import json
from pathlib import Path

from modules.training.llm.evaluate import EvalError, MCItem, item_problems

#: bad lines listed in one error message (the rest are counted)
MAX_LISTED = 20


def load_mc_items(path: str | Path) -> list[MCItem]:
    """``{"context": str, "choices": [str, ...], "gold": int}`` per line; blank lines are skipped, other keys
    are ignored (ids, categories)."""
    path = Path(path)
    items, problems = [], []
    for number, line in _lines(path):
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(record, dict):
            problems.append(f"{where}: expected a JSON object with context, choices and gold, "
                            f"got {type(record).__name__}")
            continue
        missing = [key for key in ("context", "choices", "gold") if key not in record]
        if missing:
            problems.append(f"{where}: missing {', '.join(repr(k) for k in missing)}")
            continue
        found = item_problems(record["context"], record["choices"], record["gold"])
        if found:
            problems.append(f"{where}: " + "; ".join(found))
            continue
        items.append(MCItem(record["context"], list(record["choices"]), record["gold"], source=where))
    _raise_if(problems, path, "multiple-choice items")
    if not items:
        raise EvalError(f"{path} holds no items; write one JSON object per line: "
                        '{"context": "...", "choices": ["...", "..."], "gold": 0}')
    return items


def load_texts(path: str | Path, text_field: str = "text") -> list[str]:
    """Held-out documents: a ``.jsonl`` file gives one document per line (its ``text_field``), any other file
    is one document (UTF-8 text)."""
    path = Path(path)
    if path.suffix.lower() != ".jsonl":
        text = _read_text(path)
        if not text.strip():
            raise EvalError(f"{path} is empty; perplexity needs held-out text")
        return [text]
    texts, problems = [], []
    for number, line in _lines(path):
        where = f"{path}:{number}"
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})")
            continue
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
            problems.append(f"{where}: expected a JSON object with a string field {text_field!r}")
            continue
        texts.append(record[text_field])
    _raise_if(problems, path, "documents")
    if not any(t.strip() for t in texts):
        raise EvalError(f"{path} holds no text; write one JSON object per line with a {text_field!r} field")
    return texts


def _read_text(path: Path) -> str:
    if not path.is_file():
        raise EvalError(f"{path}: no such file; give the path of an existing file")
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise EvalError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); convert it to UTF-8") from None
    except OSError as exc:
        raise EvalError(f"{path} cannot be read ({exc.strerror or exc})") from None


def _lines(path: Path):
    for number, line in enumerate(_read_text(path).splitlines(), start=1):
        if line.strip():
            yield number, line


def _raise_if(problems: list[str], path: Path, what: str) -> None:
    if not problems:
        return
    listed = problems[:MAX_LISTED]
    more = f"\n  ... and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
    raise EvalError(f"{path}: {len(problems)} line(s) are not valid {what}; fix them and run again:\n  "
                    + "\n  ".join(listed) + more)

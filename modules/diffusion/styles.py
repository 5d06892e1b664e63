"""Prompt styles in A1111's ``styles.csv`` format (columns ``name,prompt,negative_prompt``, in the data dir).

Applying a style follows A1111's ``merge_prompts``: when the style's text contains ``{prompt}``, the
user's prompt is put in its place; otherwise the style is appended after ", ". Several styles apply in
the order given. Unlike A1111, an unknown style name is an error (A1111 silently ignores it).

Saving never loses what the user wrote: the file is rewritten atomically (temporary file, then
``os.replace``), the previous version is kept as ``styles.csv.bak`` (as A1111 does), columns other
tools added are kept, and a style of an existing name is replaced only when asked to.
"""
from __future__ import annotations

import csv
import io
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

FIELDS = ("name", "prompt", "negative_prompt")


class StyleError(ValueError):
    """A client mistake with styles (unknown name, name taken, unreadable file)."""


@dataclass(frozen=True)
class PromptStyle:
    name: str
    prompt: str = ""
    negative_prompt: str = ""
    #: columns other than A1111's three, kept as they were when the file is rewritten
    extra: dict = field(default_factory=dict, compare=False)

    def api_item(self) -> dict:
        return {"name": self.name, "prompt": self.prompt, "negative_prompt": self.negative_prompt}


def merge_prompt(style_text: str, prompt: str) -> str:
    """A1111's rule: ``{prompt}`` in the style is replaced by *prompt*; else ``prompt, style``."""
    if "{prompt}" in style_text:
        return style_text.replace("{prompt}", prompt)
    return ", ".join(part for part in (prompt.strip(), style_text.strip()) if part)


class StyleStore:
    """The styles of one file. Every call reads the file, so edits made outside Atelier are seen."""

    def __init__(self, path: Path):
        self.path = Path(path)

    def load(self) -> list[PromptStyle]:
        """The styles in file order; StyleError for a file that is not a readable CSV."""
        if not self.path.is_file():
            return []
        try:
            text = self.path.read_text(encoding="utf-8-sig")
        except (OSError, UnicodeDecodeError) as exc:
            raise StyleError(f"{self.path} is not readable as UTF-8 text ({exc}); fix or remove it") from None
        styles = []
        try:
            for row in csv.DictReader(io.StringIO(text), skipinitialspace=True):
                name = (row.get("name") or "").strip()
                if not name:
                    continue
                prompt = row.get("prompt") if row.get("prompt") is not None else row.get("text", "")  # old column
                extra = {k: v for k, v in row.items() if k not in FIELDS and k is not None}
                styles.append(PromptStyle(name, prompt or "", row.get("negative_prompt") or "", extra))
        except csv.Error as exc:
            raise StyleError(f"{self.path} is not a valid CSV file ({exc}); fix or remove it") from None
        return styles

    def names(self) -> list[str]:
        return [s.name for s in self.load()]

    def get(self, name: str) -> PromptStyle:
        for style in self.load():
            if style.name == name:
                return style
        raise StyleError(f"unknown style {name!r}; GET /sdapi/v1/prompt-styles lists them "
                         f"(now: {', '.join(self.names()) or 'none'})")

    def apply(self, prompt: str, negative_prompt: str, names: list[str]) -> tuple[str, str]:
        """*prompt* and *negative_prompt* with the styles *names* applied in order."""
        if isinstance(names, str) or not isinstance(names, (list, tuple)) \
                or not all(isinstance(n, str) for n in names):
            raise StyleError("styles must be a list of style names, e.g. [\"Cinematic\"]")
        styles = {s.name: s for s in self.load()}
        missing = [n for n in names if n not in styles]
        if missing:
            raise StyleError(f"unknown style(s) {', '.join(map(repr, missing))}; GET /sdapi/v1/prompt-styles lists "
                             f"them (now: {', '.join(styles) or 'none'})")
        for name in names:
            prompt = merge_prompt(styles[name].prompt, prompt)
            negative_prompt = merge_prompt(styles[name].negative_prompt, negative_prompt)
        return prompt, negative_prompt

    def save_style(self, name: str, prompt: str, negative_prompt: str, *, replace: bool = False) -> PromptStyle:
        """Add a style, or replace the one of that name when *replace*; StyleError when it exists otherwise."""
        name = (name or "").strip()
        if not name:
            raise StyleError("give the style a name")
        styles = self.load()
        new = PromptStyle(name, prompt or "", negative_prompt or "")
        for i, old in enumerate(styles):
            if old.name == name:
                if not replace:
                    raise StyleError(f"a style named {name!r} already exists; choose another name or tick "
                                     "\"Replace existing\" to overwrite it (the old file is kept as styles.csv.bak)")
                styles[i] = PromptStyle(name, new.prompt, new.negative_prompt, old.extra)
                break
        else:
            styles.append(new)
        self._write(styles)
        return new

    def _write(self, styles: list[PromptStyle]) -> None:
        columns = list(FIELDS) + sorted({k for s in styles for k in s.extra} - set(FIELDS))
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=columns, quoting=csv.QUOTE_MINIMAL, lineterminator="\n")
        writer.writeheader()
        for s in styles:
            writer.writerow({**s.extra, "name": s.name, "prompt": s.prompt, "negative_prompt": s.negative_prompt})
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if self.path.is_file():
            shutil.copy2(self.path, self.path.with_name(self.path.name + ".bak"))
        fd, tmp = tempfile.mkstemp(prefix=".styles-", suffix=".tmp", dir=self.path.parent)
        try:
            with os.fdopen(fd, "w", encoding="utf-8", newline="") as f:
                f.write(buf.getvalue())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


def style_store(ctx) -> StyleStore:
    """The data dir's ``styles.csv``."""
    return StyleStore(ctx.paths.data_dir / "styles.csv")

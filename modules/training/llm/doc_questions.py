"""SFT family ``docs``: questions about Atelier answered with verbatim excerpts of its README and docs.

Facts are read deterministically from the Markdown: every table row (``| --medvram | on an accelerator:
... |`` becomes "What does --medvram do?" with that cell as the answer) and the first sentence under every
heading. Answers are copied, never written, so they are true exactly as long as the docs are; the only
change is that a sentence wrapped over several lines is joined with single spaces (so an answer is a
substring of the file once its whitespace runs are collapsed, see :func:`collapse_whitespace`).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from modules.training.llm.sft_templates import Template

FAMILY = "docs"

#: table header of the answer column -> fact kind; other headers make a ``table`` fact
HEADER_KINDS = {"meaning": "flag", "contents": "folder", "proved by": "test",
                "keyword arguments": "callback_args", "return": "callback_return"}

TEMPLATES: dict[str, tuple[Template, ...]] = {
    "flag": (Template("flag-does", "What {does} {subject} do?"),
             Template("flag-for", "What {is_} the {subject} flag{s} for?"),
             Template("flag-explain", "Explain the {subject} option{s}.", held_out=True)),
    "folder": (Template("folder-goes", "What goes in {subject}?"),
               Template("folder-for", "What is the {subject} folder for?"),
               Template("folder-keep", "What does Atelier keep in {subject}?", held_out=True)),
    "test": (Template("test-proves", "Which test proves {subject}?"),
             Template("test-shows", "What test shows that {subject} works?"),
             Template("test-how", "How is {subject} tested?", held_out=True)),
    "callback_args": (Template("args-receive", "What keyword arguments does the {subject} callback receive?"),
                      Template("args-passed", "Which arguments are passed to {subject}?"),
                      Template("args-called", "What does {subject} get called with?", held_out=True)),
    "callback_return": (Template("return-should", "What should the {subject} callback return?"),
                        Template("return-does", "What does {subject} return?", held_out=True)),
    "table": (Template("table-what", "In {section}, what is the {header} of {subject}?"),
              Template("table-which", "{section}: which {header} goes with {subject}?", held_out=True)),
    "section": (Template("section-tell", "Tell me about {subject} in Atelier."),
                Template("section-say", "What do the Atelier docs say about {subject}?"),
                Template("section-explain", "Can you explain {subject}?", held_out=True)),
    "overview": (Template("overview-what", "What is {subject}?"),
                 Template("overview-describe", "Describe {subject}."),
                 Template("overview-kind", "What kind of program is {subject}?", held_out=True)),
}

_ONLY_CODE_SPANS = re.compile(r"^\s*`[^`]+`(?:\s*(?:,|\band\b|\bor\b)?\s*`[^`]+`)*(?:\s*\([^)]*\))?\s*$")
_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
_NOT_PROSE = re.compile(r"^\s*(?:```|\||[-*+]\s|\d+\.\s|>|<|!\[)")
_ABBREVIATIONS = ("e.g.", "i.e.", "etc.", "vs.", "cf.")


@dataclass(frozen=True)
class DocFact:
    """One question-worthy excerpt: ``answer`` is verbatim text of ``source``."""

    kind: str
    subject: str
    answer: str
    source: str
    section: str
    header: str = ""
    plural: bool = False

    def question(self, template: Template) -> str:
        return template.text.format(subject=self.subject, section=self.section, header=self.header,
                                    does="do" if self.plural else "does", is_="are" if self.plural else "is",
                                    s="s" if self.plural else "")


def collapse_whitespace(text: str) -> str:
    """Runs of whitespace as one space: the form in which every answer is a substring of its file."""
    return " ".join(text.split())


def doc_facts(path: Path, name: str | None = None) -> list[DocFact]:
    """Every fact of one Markdown file, in file order."""
    name = name or path.name
    lines = path.read_text(encoding="utf-8").splitlines()
    facts: list[DocFact] = []
    section, level, in_code, i = name, 0, False, 0
    pending_heading: tuple[str, int] | None = None
    while i < len(lines):
        line = lines[i]
        if line.lstrip().startswith("```"):
            in_code = not in_code
            i += 1
            continue
        if in_code:
            i += 1
            continue
        heading = _HEADING.match(line)
        if heading:
            level, section = len(heading.group(1)), _strip_markup(heading.group(2))
            pending_heading = (section, level)
            i += 1
            continue
        if line.lstrip().startswith("|") and i + 1 < len(lines) and re.match(r"^\s*\|[\s:|-]+\|\s*$", lines[i + 1]):
            end = i + 2
            while end < len(lines) and lines[end].lstrip().startswith("|"):
                end += 1
            facts.extend(_table_facts(lines[i], lines[i + 2:end], name, section))
            i = end
            continue
        if line.strip() and pending_heading and not _NOT_PROSE.match(line):
            end = i
            while end < len(lines) and lines[end].strip() and not _NOT_PROSE.match(lines[end]) \
                    and not _HEADING.match(lines[end]):
                end += 1
            sentence = first_sentence(collapse_whitespace(" ".join(lines[i:end])))
            title, title_level = pending_heading
            if sentence:
                kind = "overview" if title_level == 1 and name.lower() == "readme.md" else "section"
                facts.append(DocFact(kind, title, sentence, name, title))
            pending_heading = None
            i = end
            continue
        i += 1
    return facts


def first_sentence(paragraph: str) -> str:
    """Up to the first ``.``/``!``/``?`` that ends a sentence (not inside a code span, not ``e.g.``)."""
    for match in re.finditer(r"[.!?](?=\s|$)", paragraph):
        end = match.end()
        head = paragraph[:end]
        if head.count("`") % 2 or any(head.endswith(a) for a in _ABBREVIATIONS):
            continue
        return head
    return paragraph


def _table_facts(header_line: str, rows: list[str], source: str, section: str) -> list[DocFact]:
    headers = [_strip_markup(h).lower() for h in _cells(header_line)]
    facts = []
    for row in rows:
        cells = _cells(row)
        if len(cells) != len(headers) or not cells[0] or re.fullmatch(r"[\d.\s]+", _strip_markup(cells[0])):
            continue                              # ragged rows and numeric tables (measurements) ask nothing
        for header, answer in zip(headers[1:], cells[1:]):
            if not answer or answer in {"–", "-", "—"}:
                continue
            kind = HEADER_KINDS.get(header, "table")
            subjects = _subjects(cells[0])
            facts.extend(DocFact(kind, subject, answer, source, section, header) for subject in subjects)
            if kind == "flag" and len(subjects) > 1:
                # a row that explains several flags at once ("open a browser; print ...; run the tests")
                # reads best asked about them together, so it is asked that way too
                facts.append(DocFact(kind, _join(subjects), answer, source, section, header, plural=True))
    return facts


def _cells(line: str) -> list[str]:
    parts = _CELL_SPLIT.split(line.strip())
    return [p.strip() for p in parts[1:-1]] if len(parts) >= 3 else []


def _subjects(cell: str) -> list[str]:
    """``--medvram``, ``--lowvram`` in one cell are two subjects (a flag without its argument placeholder);
    any other cell is one subject, its markup removed."""
    if _ONLY_CODE_SPANS.match(cell):
        spans = re.findall(r"`([^`]+)`", cell)
        return [span.split()[0] if span.startswith("-") else span for span in spans]
    return [_strip_markup(cell)]


def _join(words: list[str]) -> str:
    return ", ".join(words[:-1]) + " and " + words[-1]


def _strip_markup(text: str) -> str:
    text = re.sub(r"\[([^\]]*)\]\([^)]*\)", r"\1", text)      # [label](link) -> label
    return collapse_whitespace(text.replace("`", "").replace("**", ""))

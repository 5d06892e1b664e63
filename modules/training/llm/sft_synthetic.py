"""make-sft-data: the synthetic chat data Atelier's demo chat model is fine-tuned and scored on.

    python -m modules.training make-sft-data [--out DIR] [--seed 0] [--drawing 4000] [--arithmetic 1000]
                                             [--formatting 1000] [--held-out 200] [--docs FILE ...]

Four task families, each with an exact answer:

- ``docs``: questions about Atelier answered with verbatim excerpts of README.md and docs/*.md
  (:mod:`modules.training.llm.doc_questions`); train items ask every fact in every train phrasing;
- ``drawing``: free-form drawing requests answered with the captioned-shapes prompt
  (:mod:`modules.training.llm.drawing_requests`);
- ``arithmetic`` and ``formatting``: small instructions with one right answer
  (:mod:`modules.training.llm.small_tasks`).

It writes ``train.jsonl`` and ``heldout.jsonl`` (one chat a line: OpenAI-style ``messages`` plus its
``family`` and ``template``) and ``meta.json`` (the settings, the counts, and every doc file with its sha256),
into ``<data-dir>/training/data/sft-synthetic/`` unless ``--out`` says otherwise. The same settings and
docs give the same bytes. Held-out items are phrased only with held-out templates (see
:mod:`modules.training.llm.sft_templates`). :func:`score_sft_predictions` gives the exact-match accuracy per
family that the model card reports.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from modules.training.llm import doc_questions, drawing_requests, small_tasks
from modules.training.llm.sft_templates import chat_item, family_rng, split_templates

log = logging.getLogger(__name__)

FAMILIES = (doc_questions.FAMILY, drawing_requests.FAMILY, small_tasks.ARITHMETIC, small_tasks.FORMATTING)
SPLITS = ("train", "heldout")
DEFAULT_NAME = "sft-synthetic"


class SyntheticDataError(ValueError):
    """Bad settings or unreadable docs; the message says what to change."""


@dataclass(frozen=True)
class SyntheticSpec:
    """What to generate. ``docs`` items are as many as the docs give; the others are counts per split."""

    docs: tuple[Path, ...]
    seed: int = 0
    drawing: int = 4000
    arithmetic: int = 1000
    formatting: int = 1000
    held_out: int = 200          # per family
    names: dict[Path, str] = field(default_factory=dict)   # doc path -> name written in meta.json

    def __post_init__(self) -> None:
        problems = [f"{name} must be a whole number >= 0, not {value!r}"
                    for name, value in (("drawing", self.drawing), ("arithmetic", self.arithmetic),
                                        ("formatting", self.formatting), ("held_out", self.held_out))
                    if not isinstance(value, int) or isinstance(value, bool) or value < 0]
        missing = [str(p) for p in self.docs if not Path(p).is_file()]
        if missing:
            problems.append(f"doc file(s) not found: {', '.join(missing)}; pass existing Markdown files to --docs")
        if not self.docs:
            problems.append("no doc files; pass Markdown files to --docs")
        if problems:
            raise SyntheticDataError("; ".join(problems))


def default_docs() -> list[Path]:
    """The repository's README.md and docs/*.md, in a fixed order."""
    from modules.paths import REPO_DIR
    return [REPO_DIR / "README.md", *sorted((REPO_DIR / "docs").glob("*.md"))]


def make_sft_data(spec: SyntheticSpec) -> dict[str, list[dict]]:
    """``{"train": [...], "heldout": [...]}``, each split shuffled; deterministic in ``spec`` and the docs."""
    out = {}
    for split in SPLITS:
        held_out = split == "heldout"
        counts = {"drawing": spec.drawing, "arithmetic": spec.arithmetic, "formatting": spec.formatting}
        if held_out:
            counts = dict.fromkeys(counts, spec.held_out)
        def rng(family: str, split: str = split):
            return family_rng(spec.seed, family, split)
        items = (doc_items(spec.docs, rng(doc_questions.FAMILY), held_out=held_out,
                           limit=spec.held_out if held_out else None)
                 + drawing_requests.drawing_items(counts["drawing"], rng(drawing_requests.FAMILY), held_out=held_out)
                 + small_tasks.arithmetic_items(counts["arithmetic"], rng(small_tasks.ARITHMETIC), held_out=held_out)
                 + small_tasks.formatting_items(counts["formatting"], rng(small_tasks.FORMATTING), held_out=held_out))
        rng("all").shuffle(items)
        out[split] = items
    return out


def doc_items(paths, rng, *, held_out: bool, limit: int | None = None) -> list[dict]:
    """Every doc fact asked in every template of the split (at most ``limit`` items, drawn with ``rng``).

    A question that two facts would answer differently (the same heading in two files) is left out: its
    exact-match answer would be a coin toss.
    """
    answers: dict[str, set[str]] = defaultdict(set)
    items = []
    for path in paths:
        for fact in doc_questions.doc_facts(Path(path)):
            for template in split_templates(doc_questions.TEMPLATES[fact.kind], held_out):
                question = fact.question(template)
                answers[question].add(fact.answer)
                items.append(chat_item(doc_questions.FAMILY, template.id, question, fact.answer))
    unique, seen = [], set()
    for item in items:
        question = item["messages"][0]["content"]
        if len(answers[question]) == 1 and question not in seen:
            seen.add(question)
            unique.append(item)
    if limit is not None and len(unique) > limit:
        unique = rng.sample(unique, limit)
    return unique


def expected_answer(item: dict) -> str:
    """The reference answer of an item: its last assistant message (or its ``response``)."""
    if "messages" in item:
        replies = [m["content"] for m in item["messages"] if m.get("role") == "assistant"]
        if replies:
            return replies[-1]
    if "response" in item:
        return item["response"]
    raise SyntheticDataError(f"item has no assistant message or response: {json.dumps(item)[:200]}")


def score_sft_predictions(items: list[dict], predictions: list[str]) -> dict[str, float]:
    """Exact-match accuracy per family: a prediction counts when, stripped of surrounding whitespace, it
    equals the item's answer character for character (nothing else is forgiven: a caption with the objects
    swapped, or "42." for "42", is wrong)."""
    if len(items) != len(predictions):
        raise SyntheticDataError(f"{len(items)} items but {len(predictions)} predictions; give one prediction "
                                 "per item, in the same order")
    right: dict[str, int] = defaultdict(int)
    total: dict[str, int] = defaultdict(int)
    for item, prediction in zip(items, predictions):
        family = item.get("family", "unknown")
        total[family] += 1
        right[family] += int(isinstance(prediction, str) and prediction.strip() == expected_answer(item).strip())
    return {family: right[family] / total[family] for family in sorted(total)}


def load_sft_items(path: str | os.PathLike) -> list[dict]:
    """The items of a JSONL file written by this command (or any file of chat items)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]


def write_sft_data(spec: SyntheticSpec, out: Path, *, overwrite: bool = False) -> dict:
    """Generate and write the three files; an existing dataset is replaced only with ``overwrite``."""
    if (out / "train.jsonl").exists() and not overwrite:
        raise SyntheticDataError(f"{out} already holds SFT data; pass --overwrite to replace it, or choose "
                                 "another --out")
    splits = make_sft_data(spec)
    if not any(item["family"] == doc_questions.FAMILY for item in splits["train"]):
        raise SyntheticDataError(f"no questions could be read from {', '.join(map(str, spec.docs))}: they have "
                                 "no tables and no prose under headings")
    out.mkdir(parents=True, exist_ok=True)
    for split, items in splits.items():
        _write_atomic(out / f"{split}.jsonl", "".join(json.dumps(i, ensure_ascii=False) + "\n" for i in items))
    meta = {"seed": spec.seed, "held_out_per_family": spec.held_out,
            "requested": {"drawing": spec.drawing, "arithmetic": spec.arithmetic, "formatting": spec.formatting},
            "counts": {split: {f: sum(i["family"] == f for i in items) for f in FAMILIES}
                       for split, items in splits.items()},
            "docs": [{"path": spec.names.get(Path(p), str(p)),
                      "sha256": hashlib.sha256(Path(p).read_bytes()).hexdigest()} for p in spec.docs]}
    _write_atomic(out / "meta.json", json.dumps(meta, indent=2) + "\n")
    return {"out": str(out), **meta}


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", type=Path, default=None,
                        help=f"output folder (default: <data-dir>/training/data/{DEFAULT_NAME})")
    parser.add_argument("--data-dir", default=None, help="Atelier's data dir (default: the repository)")
    parser.add_argument("--seed", type=int, default=0, help="same seed and docs, same files")
    parser.add_argument("--drawing", type=int, default=4000, help="drawing-request items in train")
    parser.add_argument("--arithmetic", type=int, default=1000, help="arithmetic items in train")
    parser.add_argument("--formatting", type=int, default=1000, help="formatting items in train")
    parser.add_argument("--held-out", type=int, default=200, help="held-out items per family")
    parser.add_argument("--docs", type=Path, nargs="+", default=None,
                        help="Markdown files to ask about (default: the repository's README.md and docs/*.md)")
    parser.add_argument("--overwrite", action="store_true", help="replace SFT data already in --out")


def run(args: argparse.Namespace) -> int:
    from modules.paths import REPO_DIR, Paths

    docs = [Path(p) for p in (args.docs or default_docs())]
    names = {p: str(p.resolve().relative_to(REPO_DIR)) if p.resolve().is_relative_to(REPO_DIR) else str(p)
             for p in docs}
    try:
        spec = SyntheticSpec(docs=tuple(docs), seed=args.seed, drawing=args.drawing, arithmetic=args.arithmetic,
                             formatting=args.formatting, held_out=args.held_out, names=names)
        out = args.out or Paths.from_options(args.data_dir).data_dir / "training" / "data" / DEFAULT_NAME
        summary = write_sft_data(spec, out, overwrite=args.overwrite)
    except SyntheticDataError as exc:
        print(f"make-sft-data: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0

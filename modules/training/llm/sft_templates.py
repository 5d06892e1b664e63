"""A question template with a held-out flag: how the synthetic SFT data splits train from held-out.

Held-out items are written only with held-out templates and train items only with the others, so a
held-out score measures answering a phrasing the model never saw, not recalling a seen line.
"""
from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class Template:
    """``text`` is a ``str.format`` pattern; ``id`` names it in each item's ``template`` field."""

    id: str
    text: str
    held_out: bool = False


def split_templates(templates: tuple[Template, ...], held_out: bool) -> tuple[Template, ...]:
    """The templates of one split; a family with none in a split is a bug in its table, said at once."""
    chosen = tuple(t for t in templates if t.held_out == held_out)
    if not chosen:
        raise ValueError(f"no {'held-out' if held_out else 'train'} template among {[t.id for t in templates]}")
    return chosen


def chat_item(family: str, template: str, question: str, answer: str) -> dict:
    """One JSONL line: OpenAI-style ``messages`` plus the family and template it came from."""
    return {"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": answer}],
            "family": family, "template": template}


def family_rng(seed: int, family: str, split: str) -> random.Random:
    """An independent generator per (seed, family, split): changing one family's count leaves the others'
    items as they were (``random.Random`` seeds a string through SHA-512, the same on every run)."""
    return random.Random(f"atelier-sft:{seed}:{family}:{split}")

"""Tiny corpora written at test time for the training-data tests (deterministic per seed)."""
from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the quick brown fox jumps over lazy dog river bank small model tells story token time robot paint "
         "sky window morning light quiet room hello capital france paris poem sea wind stars system prompt "
         "assistant numbers split digits cats sleep dogs run park friends recipe flour egg milk salt water "
         "boils freezes mountains forests deserts oceans library opens closes piano practice teacher").split()
CODE = ("def {name}(a, b):\n    \"\"\"Add {n} to the sum.\"\"\"\n    total = a + b + {n}\n"
        "    for i in range({n}):\n        total += i * 2\n    return total\n")


def prose(rng: random.Random, sentences: int) -> str:
    out = []
    for _ in range(sentences):
        words = [rng.choice(WORDS) for _ in range(rng.randint(5, 12))]
        out.append(" ".join(words).capitalize() + rng.choice([".", "!", "?"]))
    return " ".join(out) + "\n"


def write_corpus(root: Path, seed: int = 0, text_docs: int = 12, code_docs: int = 8) -> dict[str, Path]:
    """``root/text/*.txt`` + ``*.md``, ``root/code/*.py``, ``root/chat.jsonl``; returns those paths."""
    rng = random.Random(seed)
    (root / "text" / "sub").mkdir(parents=True, exist_ok=True)
    (root / "code").mkdir(parents=True, exist_ok=True)
    for i in range(text_docs):
        folder = root / "text" / ("sub" if i % 3 == 0 else "")
        suffix = ".md" if i % 2 else ".txt"
        (folder / f"doc{i:02d}{suffix}").write_text(prose(rng, rng.randint(8, 20)), encoding="utf-8")
    (root / "text" / "picture.png").write_bytes(b"\x89PNG not text")   # skipped: not a text suffix
    for i in range(code_docs):
        (root / "code" / f"mod{i:02d}.py").write_text(
            "".join(CODE.format(name=f"f{i}_{j}", n=rng.randint(1, 999)) for j in range(rng.randint(2, 5))),
            encoding="utf-8")
    with (root / "chat.jsonl").open("w", encoding="utf-8") as f:
        for i in range(10):
            f.write(json.dumps({"id": i, "body": prose(rng, 4)}) + "\n")
    return {"text": root / "text", "code": root / "code", "jsonl": root / "chat.jsonl"}

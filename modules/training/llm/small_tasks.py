"""SFT families ``arithmetic`` and ``formatting``: small tasks with one right answer, computed here.

"What is 17 + 25?" -> "42"; "Uppercase: hello" -> "HELLO". They teach a tiny chat model to follow an
instruction to the letter and give an exact-match score that does not depend on knowing anything.
"""
from __future__ import annotations

import random

from modules.training.llm.sft_templates import Template, chat_item, split_templates

ARITHMETIC = "arithmetic"
FORMATTING = "formatting"

#: operator -> (symbol, word, function, operand range); subtraction never goes below zero
OPERATIONS = {
    "add": ("+", "plus", lambda a, b: a + b, (0, 99)),
    "subtract": ("-", "minus", lambda a, b: a - b, (0, 99)),
    "multiply": ("*", "times", lambda a, b: a * b, (2, 12)),
}
ARITHMETIC_TEMPLATES: tuple[Template, ...] = (
    Template("what-is", "What is {a} {symbol} {b}?"),
    Template("compute", "Compute {a} {symbol} {b}."),
    Template("equals", "{a} {symbol} {b} = ?"),
    Template("words", "What is {a} {word} {b}?"),
    Template("calculate", "Calculate {a} {word} {b}."),
    Template("how-much", "How much is {a} {symbol} {b}?", held_out=True),
    Template("work-out", "Work out {a} {word} {b}.", held_out=True),
)

#: the words formatting tasks use (plain, lower case, no two the same in one task)
WORDS: tuple[str, ...] = (
    "hello", "world", "atelier", "model", "paint", "river", "garden", "window", "music", "yellow", "circle",
    "token", "pixel", "quiet", "bright", "stone", "cloud", "forest", "letter", "number", "orange", "train",
    "chat", "image", "draw", "light", "shadow", "paper", "green", "little", "table", "summer",
)
FORMATTING_TASKS = {
    "upper": (str.upper, (Template("upper", "Uppercase: {text}"),
                          Template("upper-convert", "Convert to upper case: {text}"),
                          Template("upper-capitals", "Write this in capital letters: {text}"),
                          Template("upper-caps", "Make this all caps: {text}", held_out=True))),
    "lower": (str.lower, (Template("lower", "Lowercase: {text}"),
                          Template("lower-convert", "Convert to lower case: {text}"),
                          Template("lower-no-capitals", "Write this without capital letters: {text}",
                                   held_out=True))),
    "reverse": (lambda text: " ".join(reversed(text.split())),
                (Template("reverse", "Reverse the words: {text}"),
                 Template("reverse-order", "Reverse the order of the words: {text}"),
                 Template("reverse-backwards", "Say these words backwards, last word first: {text}",
                          held_out=True))),
    "sort": (lambda text: ", ".join(str(n) for n in sorted(int(x) for x in text.split(", "))),
             (Template("sort", "Sort ascending: {text}"),
              Template("sort-smallest", "Sort these numbers from smallest to largest: {text}"),
              Template("sort-increasing", "Put these numbers in increasing order: {text}", held_out=True))),
}


def arithmetic_items(count: int, rng: random.Random, *, held_out: bool) -> list[dict]:
    templates = split_templates(ARITHMETIC_TEMPLATES, held_out)
    items = []
    for _ in range(count):
        name = rng.choice(sorted(OPERATIONS))
        symbol, word, apply, (low, high) = OPERATIONS[name]
        a, b = rng.randint(low, high), rng.randint(low, high)
        if name == "subtract" and b > a:
            a, b = b, a
        template = rng.choice(templates)
        question = template.text.format(a=a, b=b, symbol=symbol, word=word)
        items.append(chat_item(ARITHMETIC, f"{name}/{template.id}", question, str(apply(a, b))))
    return items


def formatting_items(count: int, rng: random.Random, *, held_out: bool) -> list[dict]:
    items = []
    for _ in range(count):
        name = rng.choice(sorted(FORMATTING_TASKS))
        apply, templates = FORMATTING_TASKS[name]
        if name == "sort":
            text = ", ".join(str(n) for n in rng.sample(range(100), rng.randint(3, 6)))
        else:
            words = rng.sample(WORDS, rng.randint(2 if name == "reverse" else 1, 4))
            if name == "lower":     # something to lower: capitalised or shouted words
                words = [w.upper() if rng.random() < 0.5 else w.capitalize() for w in words]
            text = " ".join(words)
        template = rng.choice(split_templates(templates, held_out))
        items.append(chat_item(FORMATTING, f"{name}/{template.id}", template.text.format(text=text), apply(text)))
    return items

"""A1111 prompt syntax: attention weights, prompt editing, alternation, extra networks.

Why our own parser: users paste prompts written for A1111 and expect the same
image, so the semantics (including the odd corners: unbalanced brackets apply to
the rest of the prompt, stray brackets are literal text, equal-weight runs merge)
follow A1111's ``prompt_parser.py`` and its doctests. The implementation is a
small recursive-descent parser instead of A1111's Earley grammar.

Two stages, as in A1111:

1. :func:`prompt_schedule` resolves *when* things apply — ``[from:to:when]``,
   ``[to:when]``, ``[from::when]`` (an integer is a step, a number with ``.`` a
   fraction of the steps; with hires fix, integers beyond the base steps and
   fractions above 1 address the second pass) and ``[a|b]`` alternation (one
   option per step, cycling) — giving plain prompts per step range.
2. :func:`parse_prompt_attention` turns each of those into ``[text, weight]``
   runs: ``(x)`` ×1.1, ``[x]`` ÷1.1, ``(x:1.5)``, escapes ``\\( \\) \\[ \\] \\\\``,
   and ``BREAK`` as ``["BREAK", -1]``.

A prompt that cannot be parsed for scheduling is used literally.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

ROUND_MULT = 1.1
SQUARE_MULT = 1 / 1.1
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)
_EXTRA_NET = re.compile(r"<(\w+):([^>]+)>")


# -- scheduling: parse tree ---------------------------------------------------------------------------
@dataclass
class _Scheduled:
    before: list | None  # None for "[to:when]"
    after: list
    when: str  # the number as written; its meaning depends on "." (step or fraction)


@dataclass
class _Alternate:
    options: list[list]


class _Fail(Exception):
    """A bracket construct did not match here; the caller tries the next reading."""


class _ScheduleParser:
    """Recursive descent over the A1111 schedule grammar, with backtracking at each bracket.

    Nodes are plain strings, :class:`_Scheduled` and :class:`_Alternate`. Round and square
    emphasis brackets are kept as literal text (they are handled by the attention stage).
    """

    def __init__(self, text: str):
        self.s = text
        # packrat memo: each construct is parsed once per position, so nested brackets stay linear
        self._memo: dict[tuple, tuple[list, int] | None] = {}

    def _memoized(self, key: tuple, parse):
        if key not in self._memo:
            try:
                self._memo[key] = parse()
            except _Fail:
                self._memo[key] = None
        result = self._memo[key]
        if result is None:
            raise _Fail
        return result

    def parse(self) -> list:
        nodes, i = [], 0
        while i < len(self.s):
            part, i = self.prompt(i, pipe_stops=False)
            nodes += part
            if i < len(self.s):  # a stray bracket, colon or pipe: literal at the top level
                nodes.append(self.s[i])
                i += 1
        return nodes

    def prompt(self, i: int, *, pipe_stops: bool) -> tuple[list, int]:
        """Text and bracket constructs from *i* until a character this level cannot consume."""
        return self._memoized(("prompt", i, pipe_stops), lambda: self._prompt(i, pipe_stops))

    def _prompt(self, i: int, pipe_stops: bool) -> tuple[list, int]:
        s, nodes = self.s, []
        stops = "[]():|" if pipe_stops else "[]():"
        while i < len(s):
            c = s[i]
            if c == "\\" and i + 1 < len(s):
                nodes.append(s[i:i + 2])  # escapes stay verbatim for the attention stage
                i += 2
            elif c == "(" or c == "[":
                try:
                    part, i = (self.round if c == "(" else self.square)(i)
                except _Fail:
                    break
                nodes += part
            elif c in stops:
                break
            else:
                j = i
                while j < len(s) and s[j] not in stops and s[j] not in "([\\":
                    j += 1
                if j == i:  # a lone trailing backslash
                    j = i + 1
                nodes.append(s[i:j])
                i = j
        return nodes, i

    def round(self, i: int) -> tuple[list, int]:
        """``(prompt)`` or ``(prompt:prompt)``, kept literally."""
        return self._memoized(("round", i), lambda: self._round(i))

    def _round(self, i: int) -> tuple[list, int]:
        inner, j = self.prompt(i + 1, pipe_stops=False)
        if j < len(self.s) and self.s[j] == ")":
            return ["("] + inner + [")"], j + 1
        if j < len(self.s) and self.s[j] == ":":
            weight, k = self.prompt(j + 1, pipe_stops=False)
            if k < len(self.s) and self.s[k] == ")":
                return ["("] + inner + [":"] + weight + [")"], k + 1
        raise _Fail

    def _number_close(self, j: int) -> tuple[str, int] | None:
        """``[WS] NUMBER [WS] "]"`` at *j*: the number text and the index after ``]``."""
        s = self.s
        while j < len(s) and s[j].isspace():
            j += 1
        m = _NUMBER.match(s, j)
        if not m:
            return None
        k = m.end()
        while k < len(s) and s[k].isspace():
            k += 1
        if k < len(s) and s[k] == "]":
            return m.group(0), k + 1
        return None

    def square(self, i: int) -> tuple[list, int]:
        """``[from:to:when]``, ``[to:when]``, ``[a|b|…]`` or emphasis ``[prompt]``, in that order."""
        return self._memoized(("square", i), lambda: self._square(i))

    def _square(self, i: int) -> tuple[list, int]:
        s = self.s
        first, j = self.prompt(i + 1, pipe_stops=False)
        if j < len(s) and s[j] == ":":
            closed = self._number_close(j + 1)
            if closed:  # [to:when]
                return [_Scheduled(None, first, closed[0])], closed[1]
            second, k = self.prompt(j + 1, pipe_stops=False)
            if k < len(s) and s[k] == ":":
                closed = self._number_close(k + 1)
                if closed:  # [from:to:when] (to may be empty)
                    return [_Scheduled(first, second, closed[0])], closed[1]
        options, j = [], i
        while True:
            option, j = self.prompt(j + 1, pipe_stops=True)
            options.append(option)
            if j >= len(s) or s[j] != "|":
                break
        if len(options) > 1 and j < len(s) and s[j] == "]":
            return [_Alternate(options)], j + 1
        if j < len(s) and s[j] == "]" and len(options) == 1:
            return ["["] + options[0] + ["]"], j + 1
        inner, j = self.prompt(i + 1, pipe_stops=False)
        if j < len(s) and s[j] == "]":
            return ["["] + inner + ["]"], j + 1
        raise _Fail


def _when_step(when: str, steps: int, int_offset: int, flt_offset: float, old: bool) -> int:
    v = float(when)
    if old:
        v = v * steps if v < 1 else v
    elif "." in when:
        v = (v - flt_offset) * steps
    else:
        v = v - int_offset
    return min(steps, int(v))


def _collect(nodes: list, out: set, steps: int, offsets: tuple, resolved: dict) -> None:
    for node in nodes:
        if isinstance(node, _Scheduled):
            step = _when_step(node.when, steps, *offsets)
            resolved[id(node)] = step
            if step >= 1:
                out.add(step)
            _collect(node.before or [], out, steps, offsets, resolved)
            _collect(node.after, out, steps, offsets, resolved)
        elif isinstance(node, _Alternate):
            out.update(range(1, steps + 1))
            for option in node.options:
                _collect(option, out, steps, offsets, resolved)


def _render(nodes: list, step: int, resolved: dict) -> str:
    parts = []
    for node in nodes:
        if isinstance(node, str):
            parts.append(node)
        elif isinstance(node, _Scheduled):
            chosen = (node.before or []) if step <= resolved[id(node)] else node.after
            parts.append(_render(chosen, step, resolved))
        else:
            parts.append(_render(node.options[(step - 1) % len(node.options)], step, resolved))
    return "".join(parts)


def prompt_schedule(prompt: str, steps: int, hires_steps: int | None = None,
                    use_old_scheduling: bool = False) -> list[list]:
    """``[[last_step, prompt_text], ...]`` for one prompt, as A1111's schedule doctests give it.

    With *hires_steps*, the schedule is for the hires pass (integers count from the end of the
    base pass, fractions from 1.0). A prompt that cannot be parsed is used literally.
    """
    if hires_steps is None or use_old_scheduling:
        offsets, total = (0, 0.0, use_old_scheduling), steps
    else:
        offsets, total = (steps, 1.0, False), hires_steps
    try:
        tree = _ScheduleParser(prompt).parse()
        found, resolved = {total}, {}
        _collect(tree, found, total, offsets, resolved)
        return [[t, _render(tree, t, resolved)] for t in sorted(found)]
    except (RecursionError, ValueError):
        return [[total, prompt]]


# -- attention --------------------------------------------------------------------------------------
_WEIGHT = re.compile(r":\s*([+-]?[.\d]+)\s*\)")


def _attention_tokens(text: str):
    """Yield (kind, value, source) with kind one of esc, text, open, close, weight."""
    i, n = 0, len(text)
    while i < n:
        c = text[i]
        if c == "\\":
            if i + 1 < n and text[i + 1] in "()[]\\":
                yield "esc", text[i + 1], text[i:i + 2]
                i += 2
            else:  # a backslash escaping nothing is dropped, as in A1111
                yield "esc", "", c
                i += 1
        elif c in "([":
            yield "open", c, c
            i += 1
        elif c in ")]":
            yield "close", c, c
            i += 1
        elif c == ":":
            m = _WEIGHT.match(text, i)
            if m:
                yield "weight", m.group(1), m.group(0)
                i = m.end()
            else:
                yield "text", ":", ":"
                i += 1
        else:
            j = i
            while j < n and text[j] not in "\\()[]:":
                j += 1
            yield "text", text[i:j], text[i:j]
            i = j


def parse_prompt_attention(text: str) -> list[list]:
    """``[[text, weight], ...]`` with A1111's emphasis rules; ``BREAK`` gives ``["BREAK", -1]``."""
    res: list[list] = []
    round_open: list[int] = []
    square_open: list[int] = []

    def multiply(start: int, factor: float) -> None:
        for item in res[start:]:
            item[1] *= factor

    def add_text(chunk: str) -> None:
        for k, part in enumerate(_BREAK.split(chunk)):
            if k:
                res.append(["BREAK", -1])
            res.append([part, 1.0])

    for kind, value, source in _attention_tokens(text):
        if kind == "esc":
            res.append([value, 1.0])
        elif kind == "open":
            (round_open if value == "(" else square_open).append(len(res))
        elif kind == "weight" and round_open:
            try:
                factor = float(value)
            except ValueError:  # "[.\d]+" also matches "1.2.3"; keep it as text instead of failing
                add_text(source)
                continue
            multiply(round_open.pop(), factor)
        elif kind == "close" and value == ")" and round_open:
            multiply(round_open.pop(), ROUND_MULT)
        elif kind == "close" and value == "]" and square_open:
            multiply(square_open.pop(), SQUARE_MULT)
        else:
            add_text(source)
    for pos in round_open:
        multiply(pos, ROUND_MULT)
    for pos in square_open:
        multiply(pos, SQUARE_MULT)
    if not res:
        res = [["", 1.0]]
    merged = [res[0]]
    for item in res[1:]:
        if item[1] == merged[-1][1]:
            merged[-1][0] += item[0]
        else:
            merged.append(item)
    return merged


# -- extra networks ----------------------------------------------------------------------------------
@dataclass
class ExtraNetworkParams:
    """One ``<kind:a:b:k=v>`` reference: the ``:``-separated items, split into positional and named."""
    items: list[str]
    positional: list[str] = field(init=False)
    named: dict[str, str] = field(init=False)

    def __post_init__(self):
        self.positional = [x for x in self.items if "=" not in x]
        self.named = dict(x.split("=", 1) for x in self.items if "=" in x)

    @property
    def name(self) -> str:
        return self.positional[0] if self.positional else ""

    def lora_weights(self) -> tuple[float, float]:
        """(te, unet) multipliers of ``<lora:name:te[:unet]>`` / ``te=``/``unet=``; unet defaults to te."""
        def number(value: str, what: str) -> float:
            try:
                return float(value)
            except ValueError:
                raise ValueError(f"<lora:{':'.join(self.items)}>: {what} weight {value!r} is not a number; "
                                 "write e.g. <lora:name:0.8> or <lora:name:te=0.8:unet=0.5>") from None
        te = number(self.named.get("te", self.positional[1] if len(self.positional) > 1 else "1.0"), "te")
        unet_text = self.named.get("unet", self.positional[2] if len(self.positional) > 2 else None)
        return te, (te if unet_text is None else number(unet_text, "unet"))


def extract_extra_networks(prompt: str) -> tuple[str, dict[str, list[ExtraNetworkParams]]]:
    """Strip ``<lora:...>``-style tags from *prompt*; return the clean prompt and the tags by kind.

    ``lyco`` tags are filed under ``lora``, as A1111's Lora extension treats them.
    """
    found: dict[str, list[ExtraNetworkParams]] = {}

    def take(m: re.Match) -> str:
        kind = m.group(1).lower()
        kind = "lora" if kind == "lyco" else kind
        found.setdefault(kind, []).append(ExtraNetworkParams(m.group(2).split(":")))
        return ""

    return _EXTRA_NET.sub(take, prompt), found

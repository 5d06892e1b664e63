"""Chat fine-tuning data: JSONL conversations -> token ids with a loss mask over the assistant's tokens.

Input: one JSON object per line, either OpenAI-style ``{"messages": [{"role": ..., "content": ...}, ...]}``
or a pair ``{"prompt": ..., "response": ...}`` (a user turn and an assistant turn; an optional ``"system"``).
Every problem of a file (not JSON, no messages, a message without role/content, no assistant turn) is
collected and reported at once with its line number, as the config validator does.

Rendering: the model's own chat template through :class:`modules.llm.chat_template.ChatTemplate`, the
renderer the Chat tab uses, with its BOS convention (:func:`~modules.llm.chat_template.prompt_ids`), so the
model is trained on exactly the text it is prompted with later.

Which tokens carry loss: for the assistant message at index i, its span runs from the end of
``render(messages[:i], add_generation_prompt=True)`` - the prompt the Chat tab gives the model - to the end
of ``render(messages[:i+1])``, minus trailing whitespace. So the span is everything the model must generate
after the generation prompt: the reply and the template's end-of-turn token (``</s>``, ``<|im_end|>``), plus
any header text a template's generation prompt leaves out (Llama-2's space before the reply); the
newline a template writes after the end-of-turn token is never generated (generation stops at EOS) and
carries no loss. For a template whose generation prompt is the assistant header, this is exactly what
transformers' ``apply_chat_template(..., return_assistant_tokens_mask=True)`` marks with a
``{% generation %}`` block around content + end-of-turn (tests/training/test_sft_data.py checks it), and it
needs no special tags, so every template works. A template whose renders are not prefixes of each other
(one that rewrites earlier turns) is refused with a message.

Character spans become token positions on the whole conversation's ids (tokenized once, as transformers
does): a boundary's token index is found by tokenizing the text before it, which is exact when the boundary
is a token boundary; a token straddling it counts as inside the span, as transformers' ``char_to_token``
rule does.

Too long: a conversation longer than ``seq_len`` tokens is skipped, not truncated (a cut reply would teach
the model to stop without its end-of-turn token); the skipped lines are logged, and a file where every
conversation is too long is an error that names the longest and the seq_len.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from modules.llm.chat_template import ChatTemplate, ChatTemplateError

log = logging.getLogger(__name__)

#: the value of a label that carries no loss (PyTorch's cross_entropy ignore_index)
IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")


class SFTDataError(ValueError):
    """A dataset that cannot be used; the message lists every problem with its line number."""


@dataclass
class Example:
    """One tokenized conversation: ``ids`` and ``labels`` (``IGNORE`` where there is no loss)."""
    ids: list[int]
    labels: list[int]
    line: int

    @property
    def assistant_tokens(self) -> int:
        return sum(1 for label in self.labels if label != IGNORE)


# ------------------------------------------------------------------------------------------ reading
def read_conversations(path: str | Path, *, max_problems: int = 20) -> list[tuple[int, list[dict]]]:
    """(line number, messages) for every line of a JSONL file; raises one SFTDataError for all problems."""
    p = Path(path)
    if not p.is_file():
        raise SFTDataError(f"SFT data file {p} does not exist; give data=FILE.jsonl with one conversation per line")
    out, problems = [], []
    for number, line in enumerate(p.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            problems.append(f"line {number}: not valid JSON ({exc.msg})")
            continue
        messages, problem = _messages_of(record)
        if problem:
            problems.append(f"line {number}: {problem}")
        else:
            out.append((number, messages))
    if problems:
        more = f"\n  ... and {len(problems) - max_problems} more" if len(problems) > max_problems else ""
        raise SFTDataError(f"{p} has {len(problems)} bad line(s):\n  - " + "\n  - ".join(problems[:max_problems])
                           + more + "\nEach line must be {\"messages\": [{\"role\": \"user\", \"content\": ...}, "
                           "{\"role\": \"assistant\", \"content\": ...}]} or {\"prompt\": ..., \"response\": ...}.")
    if not out:
        raise SFTDataError(f"{p} holds no conversations (the file is empty); add one JSON object per line")
    return out


def _messages_of(record: Any) -> tuple[list[dict], str | None]:
    if not isinstance(record, dict):
        return [], f"expected a JSON object, got {type(record).__name__}"
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not messages:
            return [], "'messages' must be a non-empty list of {role, content} objects"
    elif "prompt" in record or "response" in record:
        if not isinstance(record.get("prompt"), str) or not isinstance(record.get("response"), str):
            return [], "a prompt/response line needs both 'prompt' and 'response' as strings"
        messages = [{"role": "user", "content": record["prompt"]},
                    {"role": "assistant", "content": record["response"]}]
        if isinstance(record.get("system"), str):
            messages.insert(0, {"role": "system", "content": record["system"]})
    else:
        return [], f"no 'messages' (or 'prompt'/'response') key; found {sorted(record)[:6]}"
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("content"), str) \
                or message.get("role") not in ROLES:
            return [], (f"messages[{i}] must be {{\"role\": one of {'/'.join(ROLES)}, \"content\": a string}}, "
                        f"got {json.dumps(message)[:80]}")
    if not any(m["role"] == "assistant" for m in messages):
        return [], "no assistant turn: there is nothing to learn (add a message with role 'assistant')"
    return [{"role": m["role"], "content": m["content"]} for m in messages], None


# ------------------------------------------------------------------------------------- tokenizing
def assistant_spans(template: ChatTemplate, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the character spans the model must generate (see module docstring)."""
    text = template.render(messages, add_generation_prompt=False)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt = template.render(messages[:i], add_generation_prompt=True) if i else ""
        turn = template.render(messages[:i + 1], add_generation_prompt=False)
        if not turn.startswith(prompt) or not text.startswith(turn):
            raise ChatTemplateError(
                f"The chat template ({template.origin}) renders a conversation differently from its beginning "
                f"(turn {i}), so the assistant's tokens cannot be located; use a template that renders each "
                "turn after the previous ones (chat_template=tinyllama, chatml or llama2).")
        end = len(turn.rstrip())
        if end > len(prompt):
            spans.append((len(prompt), end))
    return text, spans


def tokenize_conversation(tokenizer, template: ChatTemplate, messages: list[dict]) -> tuple[list[int], list[bool]]:
    """Token ids (the Chat tab's BOS convention) and a mask, True on every token of an assistant span."""
    text, spans = assistant_spans(template, messages)
    add_bos = not text.startswith(template.bos_token)
    ids = tokenizer.encode(text, add_bos=add_bos)
    mask = [False] * len(ids)
    for start, end in spans:
        first = _token_index(tokenizer, text, start, ids, add_bos, is_end=False)
        last = _token_index(tokenizer, text, end, ids, add_bos, is_end=True)
        for k in range(first, last):
            mask[k] = True
    return ids, mask


def _token_index(tokenizer, text: str, position: int, ids: list[int], add_bos: bool, *, is_end: bool) -> int:
    """Token index of a span boundary at character ``position`` (a start: the first token of the span; an
    end: one past its last). A token straddling the boundary is inside the span either way."""
    prefix = tokenizer.encode(text[:position], add_bos=add_bos)
    common = 0
    for a, b in zip(prefix, ids):
        if a != b:
            break
        common += 1
    if common == len(prefix):                 # a clean token boundary
        return common
    return common + 1 if is_end else common


def build_examples(conversations: list[tuple[int, list[dict]]], tokenizer, template: ChatTemplate,
                   seq_len: int, *, source: str = "") -> list[Example]:
    """Tokenize and mask every conversation; skip (and log) those longer than ``seq_len`` tokens.

    Labels are the next-token targets already shifted: ``labels[k]`` is what position k must predict,
    so the model input is ``ids[:-1]`` and ``labels`` has the same length."""
    examples, too_long, longest = [], [], 0
    for line, messages in conversations:
        try:
            ids, mask = tokenize_conversation(tokenizer, template, messages)
        except ChatTemplateError as exc:
            raise SFTDataError(f"{source} line {line}: {exc}") from None
        if len(ids) - 1 > seq_len:
            too_long.append(line)
            longest = max(longest, len(ids))
            continue
        labels = [ids[k + 1] if mask[k + 1] else IGNORE for k in range(len(ids) - 1)]
        if all(label == IGNORE for label in labels):
            continue                          # an empty assistant reply: nothing to learn
        examples.append(Example(ids=ids[:-1], labels=labels, line=line))
    if too_long:
        shown = ", ".join(map(str, too_long[:10])) + (" ..." if len(too_long) > 10 else "")
        log.warning("%s: skipped %d conversation(s) longer than seq_len=%d tokens (lines %s)",
                    source, len(too_long), seq_len, shown)
    if not examples:
        if too_long:
            raise SFTDataError(f"{source}: every conversation is longer than seq_len={seq_len} tokens (the longest "
                               f"has {longest}); raise seq_len (up to the model's context) or shorten them")
        raise SFTDataError(f"{source}: no conversation has assistant tokens to learn from")
    return examples


def collate(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest example: (inputs, labels), labels ``IGNORE`` on padding. Right padding is
    exact under causal attention (a real token never attends to a later padding slot), so no mask is needed."""
    width = max(len(e.ids) for e in examples)
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    labels = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        inputs[row, :len(example.ids)] = torch.tensor(example.ids, dtype=torch.long)
        labels[row, :len(example.labels)] = torch.tensor(example.labels, dtype=torch.long)
    return inputs, labels


class SFTData:
    """Examples in a seeded shuffled order, epoch after epoch; the read position is the whole state."""

    def __init__(self, examples: list[Example], *, seed: int, val_examples: list[Example] | None = None):
        self.examples, self.val_examples = examples, val_examples or []
        self.seed = seed
        self.epoch, self.index = 0, 0
        self._order = self._order_of(0)

    def _order_of(self, epoch: int) -> list[int]:
        gen = torch.Generator().manual_seed(self.seed * 1000003 + epoch)
        return torch.randperm(len(self.examples), generator=gen).tolist()

    def next_examples(self, n: int) -> list[Example]:
        out = []
        for _ in range(n):
            if self.index >= len(self._order):
                self.epoch, self.index = self.epoch + 1, 0
                self._order = self._order_of(self.epoch)
            out.append(self.examples[self._order[self.index]])
            self.index += 1
        return out

    def val_batches(self, n: int):
        for start in range(0, len(self.val_examples), n):
            yield self.val_examples[start:start + n]

    def state_dict(self) -> dict:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._order = self._order_of(self.epoch)

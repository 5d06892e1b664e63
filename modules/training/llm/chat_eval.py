"""Exact-match accuracy of a chat model on synthetic task items, generated the way the Chat tab generates.

Each item's conversation up to its last assistant turn is rendered with the model's own chat template, then
answered greedily by Atelier's engine (:func:`modules.llm.engine.generate`, the code that serves the Chat
tab and ``/v1``), so the figure is what a user sees, not a teacher-forced proxy. Scoring is
:func:`modules.training.llm.sft_synthetic.score_sft_predictions`: stripped answers must match exactly.
"""
from __future__ import annotations

import time
from collections import Counter
from typing import Any

from modules.llm.chat_template import prompt_ids
from modules.llm.engine import GenerationRequest, generate
from modules.llm.sampling import SamplingParams
from modules.training.llm.sft_synthetic import expected_answer, score_sft_predictions


def prompt_messages(item: dict) -> list[dict]:
    """The conversation before the item's final assistant reply (a prompt/response item becomes one turn)."""
    if "messages" in item:
        messages = list(item["messages"])
        while messages and messages[-1].get("role") == "assistant":
            messages.pop()
        return messages
    return [{"role": "user", "content": item["prompt"]}]


def answer_items(llm: Any, items: list[dict], *, max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """Greedy replies of ``llm`` (a LoadedLLM) to every item, in order."""
    requests = []
    for item in items:
        rendered = llm.template.render(prompt_messages(item), add_generation_prompt=True)
        ids = prompt_ids(llm.tokenizer, llm.template, rendered)
        budget = max(1, min(max_new_tokens, llm.context_length - len(ids)))
        requests.append(GenerationRequest(ids, SamplingParams(temperature=0.0, max_new_tokens=budget, seed=0),
                                          label="chat-eval"))
    replies: list[str] = []
    for start in range(0, len(requests), batch_size):
        replies += [r.text for r in generate(llm, requests[start:start + batch_size], max_batch=batch_size)]
    return replies


def chat_exact_match(llm: Any, items: list[dict], *, max_new_tokens: int = 64, batch_size: int = 16,
                     examples: int = 3) -> dict:
    """Accuracy per family, item counts, seconds, and a few wrong answers per family to read."""
    started = time.perf_counter()
    replies = answer_items(llm, items, max_new_tokens=max_new_tokens, batch_size=batch_size)
    accuracy = score_sft_predictions(items, replies)
    counts = Counter(item.get("family", "unknown") for item in items)
    wrong: dict[str, list[dict]] = {}
    for item, reply in zip(items, replies):
        family = item.get("family", "unknown")
        if reply.strip() != expected_answer(item).strip() and len(wrong.setdefault(family, [])) < examples:
            wrong[family].append({"prompt": prompt_messages(item)[-1]["content"], "expected": expected_answer(item),
                                  "got": reply})
    return {"accuracy": accuracy, "items": dict(sorted(counts.items())),
            "seconds": round(time.perf_counter() - started, 3), "wrong_examples": wrong,
            "per_item": [int(r.strip() == expected_answer(i).strip()) for i, r in zip(items, replies)]}


def greedy_agreement(target: Any, draft: Any, items: list[dict], *, max_new_tokens: int = 64) -> dict:
    """Share of the target's greedy reply tokens (and the closing EOS) that ``draft`` predicts too, each
    given the same prefix: the acceptance rate a greedy speculative decoder would see with this pair
    (both LoadedLLMs with one tokenizer), per family and overall."""
    import torch

    replies = answer_items(target, items, max_new_tokens=max_new_tokens)
    counts: dict[str, list[int]] = {}
    for item, reply in zip(items, replies):
        ids = prompt_ids(target.tokenizer, target.template,
                         target.template.render(prompt_messages(item), add_generation_prompt=True))
        out = target.tokenizer.encode(reply, add_bos=False) + [target.tokenizer.eos_id]
        sequence = torch.tensor([(ids + out)[:target.context_length]])
        with torch.no_grad():
            wanted = target.model(sequence).argmax(-1)[0, len(ids) - 1:-1]
            guessed = draft.model(sequence).argmax(-1)[0, len(ids) - 1:-1]
        family = counts.setdefault(item.get("family", "unknown"), [0, 0])
        family[0] += int((wanted == guessed).sum())
        family[1] += int(wanted.numel())
    total = [sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())]
    return {"overall": round(total[0] / max(total[1], 1), 4), "tokens": total[1],
            "per_family": {f: round(s / max(n, 1), 4) for f, (s, n) in sorted(counts.items())}}

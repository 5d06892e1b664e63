"""Held-out chats for measuring what quantization costs the shipped demo chat model (atelier-tiny-chat).

The demo model is a task model (its model card: perplexity ~714 on running text after chat fine-tuning),
and even on its own held-out chats the perplexity of the whole text (~400) is dominated by the free-form user
requests, which no model predicts. What quantization can damage is the answers, so the measure is the
perplexity of the assistant's answers given the prompts, with the share of answers that are still the greedy
choice token for token. The chats are the held-out items of ``make-sft-data``
(:mod:`modules.training.llm.sft_synthetic`) for the drawing, arithmetic and formatting families: the same seeded
generators, phrased only with templates the model never trained on. The docs family is left out: it depends
on the repository's current docs, which change, and the figures must stay comparable between runs.
"""
from __future__ import annotations

import math
from typing import Any

from modules.llm.chat_template import prompt_ids
from modules.training.llm import drawing_requests, small_tasks
from modules.training.llm.sft_templates import family_rng


def heldout_chats(per_family: int = 40, seed: int = 0) -> list[list[dict[str, Any]]]:
    """``per_family`` held-out chats (user message, assistant answer) of each of the three families."""
    if not isinstance(per_family, int) or isinstance(per_family, bool) or per_family < 1:
        raise ValueError(f"per_family must be a positive whole number, got {per_family!r}")
    items = (drawing_requests.drawing_items(per_family, family_rng(seed, drawing_requests.FAMILY, "heldout"),
                                            held_out=True)
             + small_tasks.arithmetic_items(per_family, family_rng(seed, small_tasks.ARITHMETIC, "heldout"),
                                            held_out=True)
             + small_tasks.formatting_items(per_family, family_rng(seed, small_tasks.FORMATTING, "heldout"),
                                            held_out=True))
    return [item["messages"] for item in items]


def answer_requests(tokenizer: Any, template: Any, chats: list[list[dict[str, Any]]]
                    ) -> list[tuple[list[int], list[int]]]:
    """(prompt ids, answer ids) per chat: the prompt as the Chat tab sends it, the answer with its end-of-turn."""
    requests = []
    for messages in chats:
        prompt = template.render(messages[:-1], add_generation_prompt=True)
        # the reply ends with the end-of-turn token, where generation stops (not the newline after it)
        whole = template.render(messages, add_generation_prompt=False).rstrip()
        if not whole.startswith(prompt):
            raise ValueError("the chat template renders a reply that does not extend its own prompt; "
                             "answers cannot be scored separately with it")
        context, ids = prompt_ids(tokenizer, template, prompt), prompt_ids(tokenizer, template, whole)
        if ids[:len(context)] != context:           # a token straddles the boundary: split at the text instead
            ids = context + tokenizer.encode(whole[len(prompt):], add_bos=False)
        requests.append((context, ids[len(context):]))
    return requests


def answer_perplexity(model: Any, requests: list[tuple[list[int], list[int]]], batch_size: int = 16
                      ) -> dict[str, float]:
    """{"ppl", "tokens", "greedy"}: perplexity per answer token, and the share of answers that are the
    model's greedy choice at every token."""
    from modules.training.llm.evaluate import loglikelihoods

    scores = loglikelihoods(model, requests, batch_size=batch_size)
    tokens = sum(len(answer) for _, answer in requests)
    nll = -sum(ll for ll, _ in scores)
    return {"ppl": math.exp(nll / tokens), "tokens": tokens,
            "greedy": sum(1 for _, greedy in scores if greedy) / len(scores)}

"""Log-probabilities in OpenAI's two wire shapes, from the engine's ``(token id, logprob)`` records.

* chat: ``choices[].logprobs = {"content": [{token, logprob, bytes, top_logprobs: [{token, logprob, bytes}]}],
  "refusal": None}``;
* legacy completions: ``{tokens, token_logprobs, top_logprobs: [{text: logprob}], text_offset}``, where, as
  in vLLM, each top_logprobs dict also holds the chosen token and the first prompt token's entries are
  null (echo).

Token texts are the token's own text (SentencePiece's ``▁`` as a space, byte pieces as their byte), so
clients can line them up with the output; the floats are passed through untouched, since lm-eval's greedy
check compares a token's logprob with its top-1 entry with ``==``.
"""
from __future__ import annotations

import re
from typing import Any

_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def token_bytes(tokenizer: Any, token_id: int) -> bytes:
    """The bytes one token stands for (a SentencePiece byte piece is its one byte)."""
    piece = tokenizer.id_to_token(token_id) or ""
    match = _BYTE_PIECE.match(piece)
    if match:
        return bytes([int(match.group(1), 16)])
    text = tokenizer.decode([token_id], skip_special_tokens=False)
    if piece.startswith("\u2581") and not text.startswith(" "):
        text = " " + text  # SentencePiece's decode drops the word-start space of a lone piece
    return text.encode("utf-8")


def token_text(tokenizer: Any, token_id: int) -> str:
    return token_bytes(tokenizer, token_id).decode("utf-8", errors="replace")


def chat_entries(tokenizer: Any, ids: list[int], logprobs: list[float],
                 tops: list[list[tuple[int, float]]]) -> list[dict[str, Any]]:
    """OpenAI chat ``logprobs.content`` entries for generated tokens."""
    def entry(token_id: int, logprob: float) -> dict[str, Any]:
        raw = token_bytes(tokenizer, token_id)
        return {"token": raw.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(raw)}

    return [{**entry(t, lp), "top_logprobs": [entry(i, v) for i, v in top]}
            for t, lp, top in zip(ids, logprobs, tops)]


class CompletionLogprobs:
    """Builds the legacy ``logprobs`` object, token by token (streaming) or at once."""

    def __init__(self, tokenizer: Any, offset: int = 0):
        self.tokenizer = tokenizer
        self.offset = offset  # text_offset of the next token

    def add(self, ids: list[int], logprobs: list[float | None],
            tops: list[list[tuple[int, float]] | None]) -> dict[str, Any]:
        out: dict[str, Any] = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for token_id, logprob, top in zip(ids, logprobs, tops):
            text = token_text(self.tokenizer, token_id)
            out["tokens"].append(text)
            out["token_logprobs"].append(logprob)
            if top is None:
                out["top_logprobs"].append(None)
            else:
                entries: dict[str, float] = {}
                for i, value in top:
                    entries.setdefault(token_text(self.tokenizer, i), value)
                entries.setdefault(text, logprob)
                out["top_logprobs"].append(entries)
            out["text_offset"].append(self.offset)
            self.offset += len(text)
        return out


def merge(first: dict[str, Any] | None, second: dict[str, Any]) -> dict[str, Any]:
    """Concatenate two legacy logprobs objects (echoed prompt, then the completion)."""
    if first is None:
        return second
    return {key: first[key] + second[key] for key in second}

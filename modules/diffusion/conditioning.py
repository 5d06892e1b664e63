"""A1111-style CLIP text conditioning, handed to diffusers as ``prompt_embeds``.

Why not diffusers' ``encode_prompt``: it truncates at 77 tokens and knows no
weights. A1111 users rely on

* **75-token chunks**: the prompt's tokens are cut into chunks of 75, each
  encoded as its own 77-token sequence (BOS + 75 + EOS/padding) and the results
  concatenated, so long prompts keep every word. ``BREAK`` ends a chunk early; a
  chunk that fills up moves the words after a recent comma to the next chunk
  (A1111's ``comma_padding_backtrack``, 20 tokens).
* **weights**: each token's embedding is multiplied by its weight, then the whole
  chunk is rescaled so its mean equals the unweighted mean (A1111's "Original"
  emphasis).
* **prompt editing and alternation**: the conditioning changes at given steps
  (:mod:`prompt_parser` gives the schedule); :class:`ConditioningSchedule` holds
  one embedding per distinct prompt and says at which steps it switches.

SD1/SD2 use the last hidden state (after the final layer norm), or an earlier
layer with "Clip skip". SDXL concatenates the penultimate hidden states of both
text encoders and takes the pooled embedding of the second one from the first
chunk, as A1111 does. Positive and negative sides are padded to the same number
of chunks with the empty prompt's encoding (zeros for SDXL's empty negative
prompt, like diffusers' ``force_zeros_for_empty_prompt`` and A1111).
A prompt without weights, schedules or more than 75 tokens therefore gives
exactly what diffusers' own ``encode_prompt`` gives.
"""
from __future__ import annotations

import logging
import operator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from modules.diffusion.prompt_parser import parse_prompt_attention, prompt_schedule

log = logging.getLogger(__name__)

CHUNK = 75
COMMA_BACKTRACK = 20
#: A1111's "Emphasis mode" setting: Original (scale, restore the mean), No norm (scale only),
#: Ignore (parse brackets but use weight 1), None (brackets are plain text).
EMPHASIS_MODES = ("Original", "No norm", "Ignore", "None")


@dataclass
class TokenChunk:
    tokens: list[int]
    weights: list[float]


def chunk_prompt(pipe, tokenizer, prompt: str, *, comma_backtrack: int = COMMA_BACKTRACK,
                 emphasis: str = "Original") -> list[TokenChunk]:
    """Split *prompt* into 75-token chunks of (token ids, weights), without BOS/EOS."""
    if emphasis == "None":
        parsed = [[prompt, 1.0]]
    else:
        parsed = parse_prompt_attention(prompt)
        if emphasis == "Ignore":
            parsed = [[t, w if t == "BREAK" and w < 0 else 1.0] for t, w in parsed]
    texts = [text for text, _ in parsed]
    if hasattr(pipe, "maybe_convert_prompt"):  # textual-inversion tokens: "emb" -> "emb emb_1 ..."
        texts = [pipe.maybe_convert_prompt(t, tokenizer) if t else t for t in texts]
    ids = tokenizer(texts, add_special_tokens=False, truncation=False, verbose=False)["input_ids"] if texts else []
    comma = tokenizer.convert_tokens_to_ids(",</w>")
    chunks: list[TokenChunk] = []
    cur = TokenChunk([], [])
    last_comma = -1

    def close() -> None:
        nonlocal cur, last_comma
        chunks.append(cur)
        cur, last_comma = TokenChunk([], []), -1

    for (text, weight), tokens in zip(parsed, ids):
        if text == "BREAK" and weight < 0:
            close()
            continue
        for token in tokens:
            if token == comma:
                last_comma = len(cur.tokens)
            elif (comma_backtrack and len(cur.tokens) == CHUNK and last_comma != -1
                  and len(cur.tokens) - last_comma <= comma_backtrack):
                cut = last_comma + 1
                moved = TokenChunk(cur.tokens[cut:], cur.weights[cut:])
                cur.tokens, cur.weights = cur.tokens[:cut], cur.weights[:cut]
                close()
                cur = moved
            if len(cur.tokens) == CHUNK:
                close()
            cur.tokens.append(token)
            cur.weights.append(weight)
    if cur.tokens or not chunks:
        close()
    return chunks


def _chunk_ids(tokenizer, chunk: TokenChunk) -> tuple[list[int], list[float]]:
    """BOS + tokens + EOS + padding to 77, exactly as ``tokenizer(..., padding="max_length")`` lays it out."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    fill = CHUNK - len(chunk.tokens)
    ids = [tokenizer.bos_token_id] + chunk.tokens + [tokenizer.eos_token_id] + [pad] * fill
    return ids, [1.0] + chunk.weights + [1.0] * (fill + 1)


def _hidden(encoder, ids: torch.Tensor, layer: int | None, final_norm: bool):
    """Hidden states of *encoder*: last (with its final norm) when *layer* is None, else ``hidden_states[layer]``."""
    out = encoder(ids, output_hidden_states=True)
    if layer is None:
        return out[0] if final_norm else out.hidden_states[-1], out
    z = out.hidden_states[layer]
    if final_norm:
        z = getattr(encoder, "text_model", encoder).final_layer_norm(z)
    return z, out


def _weighted(z: torch.Tensor, weights: list[float], restore_mean: bool = True) -> torch.Tensor:
    """A1111 "Original" emphasis: scale each token, then restore the chunk's mean ("No norm": scale only)."""
    if all(w == 1.0 for w in weights):
        return z
    original_mean = z.mean()
    z = z * torch.tensor(weights, dtype=z.dtype, device=z.device).reshape(1, -1, 1)
    return z * (original_mean / z.mean()) if restore_mean else z


@dataclass
class Encoded:
    embeds: torch.Tensor  # (1, 77 * chunks, dim)
    pooled: torch.Tensor | None  # (1, proj_dim) for SDXL
    chunks: int


def encode_prompt_a1111(sd, prompt: str, *, clip_skip: int = 1, emphasis: str = "Original") -> Encoded:
    """One prompt (no schedule syntax left) encoded the A1111 way for SD1/SD2/SDXL."""
    pipe = sd.pipe
    if sd.kind == "sdxl":
        parts = [(pipe.tokenizer, pipe.text_encoder), (pipe.tokenizer_2, pipe.text_encoder_2)]
        layer, final_norm = -(clip_skip + 1), False
    else:
        parts = [(pipe.tokenizer, pipe.text_encoder)]
        layer, final_norm = (None if clip_skip <= 1 else -clip_skip), True
    chunked = [chunk_prompt(pipe, tok, prompt, emphasis=emphasis) for tok, _ in parts]
    count = max(len(c) for c in chunked)
    for c in chunked:  # the SDXL tokenizers split alike; pad defensively if a vocab ever differs
        c += [TokenChunk([], []) for _ in range(count - len(c))]
    per_encoder, pooled = [], None
    for (tok, encoder), chunks in zip(parts, chunked):
        device = encoder.device
        zs = []
        for n, chunk in enumerate(chunks):
            ids, weights = _chunk_ids(tok, chunk)
            z, out = _hidden(encoder, torch.tensor([ids], device=device), layer, final_norm)
            if n == 0 and encoder is getattr(pipe, "text_encoder_2", None):
                pooled = out[0]  # text_embeds of CLIPTextModelWithProjection, first chunk only
            zs.append(_weighted(z, weights, restore_mean=emphasis != "No norm"))
        per_encoder.append(torch.cat(zs, dim=1))
    embeds = torch.cat(per_encoder, dim=-1) if len(per_encoder) > 1 else per_encoder[0]
    return Encoded(embeds, pooled, count)


def _pad_chunks(enc: Encoded, to: int, empty: Callable[[], Encoded]) -> torch.Tensor:
    """Pad *enc* to *to* chunks with the empty prompt's encoding; *empty* is only called (a CLIP pass)
    when padding is needed."""
    if enc.chunks >= to:
        return enc.embeds
    filler = empty().embeds.repeat(1, to - enc.chunks, 1)
    return torch.cat([enc.embeds, filler], dim=1)


@dataclass
class ConditioningSchedule:
    """Pipeline kwargs per step. ``at_step(i)`` returns the *same dict object* for every step of a
    stretch with unchanged conditioning, so callers can compare by identity; ``switch_steps`` are the
    step indices where it changes. Indices run over the base pass and then, with hires fix, on into
    the hires pass (index ``steps + j`` is hires step ``j``)."""
    steps: int
    base: list[tuple[int, dict]]
    hires_steps: int | None = None
    hires: list[tuple[int, dict]] | None = None
    switch_steps: set[int] = field(default_factory=set)
    ti_hashes: dict[str, str] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)

    def at_step(self, i: int) -> dict:
        table, j = self.base, i
        if self.hires is not None and i >= self.steps:
            table, j = self.hires, i - self.steps
        for end, kwargs in table:
            if j <= end:  # A1111: the first entry whose end step has not passed
                return kwargs
        return table[-1][1]

    @property
    def total_steps(self) -> int:
        return self.steps + (self.hires_steps or 0)


def _merge(pos: list[list], neg: list[list]) -> list[tuple[int, str, str]]:
    """Union of two prompt schedules: (end_step, positive text, negative text)."""
    ends = sorted({e for e, _ in pos} | {e for e, _ in neg})
    pick = lambda table, step: next((t for e, t in table if step <= e), table[-1][1])  # noqa: E731
    return [(e, pick(pos, e), pick(neg, e)) for e in ends]


def _is_positive_int(value) -> bool:
    try:
        return operator.index(value) >= 1
    except TypeError:
        return False


def encode_schedule(sd, prompt: str, negative_prompt: str, steps: int, batch_size: int,
                    hires_steps: int | None = None, *, clip_skip: int = 1,
                    embeddings_dir: str | Path | None = None, emphasis: str = "Original") -> ConditioningSchedule:
    """Encode *prompt* and *negative_prompt* (A1111 syntax) for a run of *steps* (+ *hires_steps*).

    Textual-inversion embeddings named in either prompt are loaded from *embeddings_dir*
    (default: ``sd.embeddings_dir``, else ``models/embeddings`` beside the checkpoint folder).
    """
    from modules.diffusion import embeddings as emb
    problems = []
    if emphasis not in EMPHASIS_MODES:
        problems.append(f"emphasis={emphasis!r} is not one of {', '.join(EMPHASIS_MODES)}")
    for name, value, hint in (("clip_skip", clip_skip, " (1 = last layer)"), ("steps", steps, ""),
                              ("batch_size", batch_size, "")):
        if not _is_positive_int(value):
            problems.append(f"{name}={value!r} must be an integer >= 1{hint}")
    if problems:
        raise ValueError("encode_schedule: " + "; ".join(problems))
    pipe = sd.pipe
    emb_dir = embeddings_dir or getattr(sd, "embeddings_dir", None) or emb.default_dir(sd)
    warnings: list[str] = []
    used = emb.ensure_loaded(sd, [prompt, negative_prompt], emb_dir, warnings)
    zero_negative = sd.kind == "sdxl" and not negative_prompt and getattr(pipe.config, "force_zeros_for_empty_prompt",
                                                                          False)
    cache: dict[str, Encoded] = {}

    def enc(text: str) -> Encoded:
        if text not in cache:
            cache[text] = encode_prompt_a1111(sd, text, clip_skip=clip_skip, emphasis=emphasis)
        return cache[text]

    made: dict[tuple[str, str], dict] = {}

    def kwargs_for(pos_text: str, neg_text: str) -> dict:
        key = (pos_text, neg_text)
        if key in made:
            return made[key]
        p, n = enc(pos_text), enc(neg_text)
        count = max(p.chunks, n.chunks)
        pos = _pad_chunks(p, count, lambda: enc(""))
        if zero_negative:
            neg = torch.zeros_like(pos)
            neg_pooled = torch.zeros_like(p.pooled) if p.pooled is not None else None
        else:
            neg = _pad_chunks(n, count, lambda: enc(""))
            neg_pooled = n.pooled
        out = {"prompt_embeds": pos.repeat(batch_size, 1, 1), "negative_prompt_embeds": neg.repeat(batch_size, 1, 1)}
        if p.pooled is not None:
            out["pooled_prompt_embeds"] = p.pooled.repeat(batch_size, 1)
            out["negative_pooled_prompt_embeds"] = neg_pooled.repeat(batch_size, 1)
        made[key] = out
        return out

    def table(total: int, hires: int | None) -> list[tuple[int, dict]]:
        pos = prompt_schedule(prompt, total, hires_steps=hires)
        neg = prompt_schedule(negative_prompt, total, hires_steps=hires)
        return [(end, kwargs_for(p, n)) for end, p, n in _merge(pos, neg)]

    with torch.no_grad():
        schedule = ConditioningSchedule(steps=steps, base=table(steps, None), hires_steps=hires_steps,
                                        ti_hashes=used, warnings=warnings)
        if hires_steps:
            schedule.hires = table(steps, hires_steps)
    for i in range(1, schedule.total_steps):
        if schedule.at_step(i) is not schedule.at_step(i - 1):
            schedule.switch_steps.add(i)
    return schedule

"""Sampling parameters and batched next-token selection.

Each row of a batch carries its own :class:`SamplingParams` and its own
``torch.Generator``, so a request's output depends only on its own seed, not on
what else happens to be in the batch. The processors follow transformers'
definitions (``RepetitionPenaltyLogitsProcessor``, ``TemperatureLogitsWarper``,
``TopKLogitsWarper``, ``TopPLogitsWarper``, ``MinPLogitsWarper``) and their order
in ``generate``: penalties, then temperature, top-k, top-p, min-p. Presence and
frequency penalties follow OpenAI's formula over the tokens generated so far
(transformers has no equivalent).

Temperature 0 means greedy: the arg-max of the penalised logits, as transformers'
``do_sample=False`` does.
"""
from __future__ import annotations

import random
from dataclasses import dataclass, field, fields, replace
from typing import Any, Sequence

import torch

#: seeds are drawn from this range when the caller gives none (or -1, TextGen's "random")
_SEED_RANGE = 2**31 - 1


@dataclass
class SamplingParams:
    """How one request picks its tokens. Neutral values switch a processor off."""

    temperature: float = 1.0  # 0 = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off; must lie in (0, 1]
    min_p: float = 0.0  # 0 = off; fraction of the top token's probability
    repetition_penalty: float = 1.0  # 1 = off; transformers' multiplicative penalty over prompt + output
    presence_penalty: float = 0.0  # OpenAI: subtract once for every token already generated
    frequency_penalty: float = 0.0  # OpenAI: subtract per occurrence in the generated tokens
    max_new_tokens: int = 256
    stop: list[str] = field(default_factory=list)  # stop strings, never included in the output
    seed: int | None = None  # None or -1: a random seed (reported back with the result)
    ignore_eos: bool = False  # keep generating past the end-of-sequence token (benchmarks)
    #: OpenAI's logit_bias: token id -> a value in [-100, 100] added to its logit before any processor
    #: (-100 bans the token, +100 all but forces it); applied to greedy rows too
    logit_bias: dict[int, float] | None = None
    #: constrained decoding (``response_format``): a spec whose ``start()`` gives each row its own state with
    #: ``allowed() -> Bool[V]``, ``advance(token_id)`` and ``fork()`` (see modules/llm/json_constraint.py)
    constraint: Any = None

    @property
    def greedy(self) -> bool:
        return self.temperature == 0

    def validate(self) -> "SamplingParams":
        """Check every field; raise one ValueError listing each problem, its value and the allowed range."""
        problems = []

        def number(name: str, value: Any, *, integer: bool = False) -> bool:
            ok_types = (int,) if integer else (int, float)
            if isinstance(value, bool) or not isinstance(value, ok_types) or value != value:
                kind = "an integer" if integer else "a number"
                problems.append(f"{name}={value!r} must be {kind}")
                return False
            return True

        if number("temperature", self.temperature) and not 0 <= self.temperature <= 100:
            problems.append(f"temperature={self.temperature} must be between 0 and 100 (0 = greedy)")
        if number("top_k", self.top_k, integer=True) and self.top_k < 0:
            problems.append(f"top_k={self.top_k} must be >= 0 (0 turns top-k off)")
        if number("top_p", self.top_p) and not 0 < self.top_p <= 1:
            problems.append(f"top_p={self.top_p} must be in (0, 1] (1 turns top-p off)")
        if number("min_p", self.min_p) and not 0 <= self.min_p <= 1:
            problems.append(f"min_p={self.min_p} must be in [0, 1] (0 turns min-p off)")
        if number("repetition_penalty", self.repetition_penalty) and not 0 < self.repetition_penalty <= 10:
            problems.append(f"repetition_penalty={self.repetition_penalty} must be in (0, 10] (1 turns it off)")
        for name in ("presence_penalty", "frequency_penalty"):
            value = getattr(self, name)
            if number(name, value) and not -2 <= value <= 2:
                problems.append(f"{name}={value} must be between -2 and 2 (0 turns it off)")
        if number("max_new_tokens", self.max_new_tokens, integer=True) and self.max_new_tokens <= 0:
            problems.append(f"max_new_tokens={self.max_new_tokens} must be a positive integer")
        if not isinstance(self.stop, (list, tuple)) or not all(isinstance(s, str) for s in self.stop):
            problems.append(f"stop={self.stop!r} must be a list of strings")
        elif any(s == "" for s in self.stop):
            problems.append("stop contains an empty string; remove it")
        if self.seed is not None and (isinstance(self.seed, bool) or not isinstance(self.seed, int)
                                      or not -1 <= self.seed < 2**63):
            problems.append(f"seed={self.seed!r} must be an integer >= 0 (or -1 / empty for a random seed)")
        if self.constraint is not None and not callable(getattr(self.constraint, "start", None)):
            problems.append(f"constraint={self.constraint!r} must be a constraint spec with start()")
        if self.logit_bias is not None:
            if not isinstance(self.logit_bias, dict):
                problems.append(f"logit_bias={self.logit_bias!r} must map token ids to numbers")
            else:
                for key, value in self.logit_bias.items():
                    if isinstance(key, bool) or not isinstance(key, int) or key < 0:
                        problems.append(f"logit_bias={{{key!r}: ...}}: keys must be token ids (integers >= 0)")
                    elif isinstance(value, bool) or not isinstance(value, (int, float)) or not -100 <= value <= 100:
                        problems.append(f"logit_bias={{{key}: {value!r}}}: values must be numbers between -100 and 100")
        if problems:
            raise ValueError("invalid sampling parameters: " + "; ".join(problems))
        return self

    def with_seed(self) -> "SamplingParams":
        """A copy whose seed is concrete (drawn at random when None or -1), so the run can be replayed."""
        if self.seed is None or self.seed == -1:
            return replace(self, seed=random.randrange(_SEED_RANGE))
        return self

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> "SamplingParams":
        """Build from a mapping, ignoring keys that are None; unknown keys are an error."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise ValueError(f"unknown sampling parameter(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        params = cls(**{k: v for k, v in values.items() if v is not None})
        if isinstance(params.stop, str):
            params.stop = [params.stop]
        return params


#: every SamplingParams field, in declaration order (the API names fields in its errors from this list)
FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in fields(SamplingParams))

#: the fields whose defaults live in Settings as ``llm.<field>`` (see :func:`setting_key`): the settings
#: section, ``LLMService.default_params`` and the Chat tab's sliders all go by this one list
SETTINGS_FIELDS: tuple[str, ...] = ("max_new_tokens", "temperature", "top_p", "top_k", "min_p",
                                    "repetition_penalty", "presence_penalty", "frequency_penalty")


def setting_key(field_name: str) -> str:
    """The settings key holding the default of sampling field *field_name* (``llm.temperature``)."""
    return f"llm.{field_name}"


def make_generator(seed: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator for one request: sampling replays exactly for the same seed and device."""
    gen = torch.Generator(device=device)
    gen.manual_seed(int(seed))
    return gen


# -- processors over a batch: scores [B, V], one parameter value per row ---------------------------------------

def apply_repetition_penalty(scores: torch.Tensor, seen: torch.Tensor, penalty: torch.Tensor) -> torch.Tensor:
    """transformers' repetition penalty: logits of tokens in *seen* (Bool[B, V]) are divided by *penalty* [B]
    when positive and multiplied when negative."""
    p = penalty[:, None].to(scores.dtype)
    penalised = torch.where(scores < 0, scores * p, scores / p)
    return torch.where(seen, penalised, scores)


def apply_presence_frequency(scores: torch.Tensor, counts: torch.Tensor, presence: torch.Tensor,
                             frequency: torch.Tensor) -> torch.Tensor:
    """OpenAI's penalties: ``logit[j] -= count[j] * frequency + (count[j] > 0) * presence``."""
    counts = counts.to(scores.dtype)
    return scores - counts * frequency[:, None].to(scores.dtype) - (counts > 0).to(scores.dtype) * presence[:, None].to(scores.dtype)


def apply_temperature(scores: torch.Tensor, temperature: torch.Tensor) -> torch.Tensor:
    """Divide each row by its temperature (rows with temperature 0 are greedy and use 1 here)."""
    t = torch.where(temperature > 0, temperature, torch.ones_like(temperature))
    return scores / t[:, None].to(scores.dtype)


def apply_top_k(scores: torch.Tensor, top_k: torch.Tensor) -> torch.Tensor:
    """Keep each row's *top_k* highest logits (ties with the k-th kept, as transformers does); 0 keeps all."""
    vocab = scores.shape[-1]
    k = torch.where(top_k > 0, top_k, torch.full_like(top_k, vocab)).clamp(1, vocab)
    kth = torch.sort(scores, dim=-1, descending=True).values.gather(-1, (k - 1)[:, None].to(torch.long))
    return scores.masked_fill(scores < kth, float("-inf"))


def apply_top_p(scores: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """Nucleus filtering: drop the least likely tokens whose total probability is at most ``1 - top_p``;
    the most likely token always stays."""
    sorted_logits, sorted_indices = torch.sort(scores, descending=False)
    cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
    # 1 - top_p in double, then rounded once, as transformers' Python-float threshold is
    remove_sorted = cumulative <= (1 - top_p[:, None].double()).to(cumulative.dtype)
    remove_sorted[..., -1:] = False
    remove = remove_sorted.scatter(1, sorted_indices, remove_sorted)
    return scores.masked_fill(remove, float("-inf"))


def apply_min_p(scores: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """Drop tokens whose probability is below ``min_p`` times the top token's probability."""
    probs = torch.softmax(scores, dim=-1)
    threshold = min_p[:, None].to(probs.dtype) * probs.amax(dim=-1, keepdim=True)
    remove = probs < threshold
    remove.scatter_(-1, probs.argmax(dim=-1, keepdim=True), False)
    return scores.masked_fill(remove, float("-inf"))


# -- per-request state and the batch sampler ---------------------------------------------------------------------

class RowState:
    """What one request's processors remember: the tokens seen (prompt + output) and the output counts.

    Kept per row, so rows can join and leave a running batch freely.
    """

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int], vocab_size: int,
                 device: torch.device | str = "cpu"):
        self.params = params.with_seed()
        self.seed = int(self.params.seed)
        self.generator = None if self.params.greedy else make_generator(self.seed, device)
        self.vocab_size = vocab_size
        self.needs_seen = self.params.repetition_penalty != 1.0
        self.needs_counts = self.params.presence_penalty != 0 or self.params.frequency_penalty != 0
        self.seen = torch.zeros(vocab_size, dtype=torch.bool, device=device) if self.needs_seen else None
        self.counts = torch.zeros(vocab_size, dtype=torch.int32, device=device) if self.needs_counts else None
        self.bias = None
        if self.params.logit_bias:
            outside = sorted(k for k in self.params.logit_bias if not 0 <= k < vocab_size)
            if outside:
                raise ValueError(f"logit_bias names token ids {outside[:5]} outside the vocabulary [0, {vocab_size})")
            self.bias = torch.zeros(vocab_size, dtype=torch.float32, device=device)
            self.bias[list(self.params.logit_bias)] = torch.tensor(list(self.params.logit_bias.values()),
                                                                   dtype=torch.float32, device=device)
        #: a constraint on what may come next (JSON output): ``allowed() -> Bool[V] | None`` and
        #: ``advance(token_id)``; None means unconstrained. Started from the params' spec per row, so each
        #: row (and each of n samples) walks the grammar on its own.
        self.constraint: Any = self.params.constraint.start() if self.params.constraint is not None else None
        if self.seen is not None and len(prompt_ids):
            ids = torch.tensor([i for i in prompt_ids if 0 <= i < vocab_size], dtype=torch.long, device=device)
            self.seen[ids] = True

    def observe(self, token_id: int) -> None:
        """Record a generated token."""
        if self.constraint is not None:
            self.constraint.advance(token_id)
        if 0 <= token_id < self.vocab_size:
            if self.seen is not None:
                self.seen[token_id] = True
            if self.counts is not None:
                self.counts[token_id] += 1


def _column(rows: Sequence[RowState], name: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.tensor([getattr(r.params, name) for r in rows], dtype=dtype, device=device)


def process_logits(scores: torch.Tensor, rows: Sequence[RowState]) -> torch.Tensor:
    """Apply each row's penalties and warpers to *scores* [B, V] (float32); returns new scores.

    A processor runs only when some row needs it; the other rows get its neutral value, which leaves them as
    they were.
    """
    device = scores.device
    if any(r.bias is not None for r in rows):
        scores = scores + torch.stack([r.bias if r.bias is not None else torch.zeros_like(scores[0]) for r in rows])
    if any(r.constraint is not None for r in rows):
        masks = [r.constraint.allowed() if r.constraint is not None else None for r in rows]
        if any(m is not None for m in masks):
            allowed = torch.stack([m.to(device) if m is not None else torch.ones_like(scores[0], dtype=torch.bool)
                                   for m in masks])
            scores = scores.masked_fill(~allowed, float("-inf"))
    if any(r.needs_seen for r in rows):
        seen = torch.stack([r.seen if r.seen is not None else torch.zeros_like(scores[0], dtype=torch.bool)
                            for r in rows])
        scores = apply_repetition_penalty(scores, seen, _column(rows, "repetition_penalty", torch.float32, device))
    if any(r.needs_counts for r in rows):
        counts = torch.stack([r.counts if r.counts is not None else torch.zeros_like(scores[0], dtype=torch.int32)
                              for r in rows])
        scores = apply_presence_frequency(scores, counts, _column(rows, "presence_penalty", torch.float32, device),
                                          _column(rows, "frequency_penalty", torch.float32, device))
    sampling = [not r.params.greedy for r in rows]
    if not any(sampling):
        return scores
    if any(s and r.params.temperature != 1.0 for s, r in zip(sampling, rows)):
        scores = apply_temperature(scores, _column(rows, "temperature", torch.float32, device))
    if any(s and r.params.top_k > 0 for s, r in zip(sampling, rows)):
        scores = apply_top_k(scores, _column(rows, "top_k", torch.long, device))
    if any(s and r.params.top_p < 1.0 for s, r in zip(sampling, rows)):
        scores = apply_top_p(scores, _column(rows, "top_p", torch.float64, device))
    if any(s and r.params.min_p > 0 for s, r in zip(sampling, rows)):
        scores = apply_min_p(scores, _column(rows, "min_p", torch.float32, device))
    return scores


def sample_next(logits: torch.Tensor, rows: Sequence[RowState]) -> list[int]:
    """Pick one token per row from *logits* [B, V]: processors, then arg-max (greedy rows) or a draw from the
    row's own generator. Records the picks in each row's state and returns them."""
    scores = process_logits(logits.float(), rows)
    picks = scores.argmax(dim=-1).tolist()
    for i, row in enumerate(rows):
        if row.generator is not None:
            probs = torch.softmax(scores[i], dim=-1)
            picks[i] = int(torch.multinomial(probs, 1, generator=row.generator).item())
    for row, token in zip(rows, picks):
        row.observe(token)
    return picks

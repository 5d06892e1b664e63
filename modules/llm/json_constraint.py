"""Constrained decoding for OpenAI's ``response_format``: JSON mode and JSON Schema.

At every step only the tokens that keep the output a valid prefix of JSON (matching the schema) may be
sampled, and the end-of-sequence token only once the JSON value is complete. The grammar work is done by
`llguidance <https://github.com/guidance-ai/llguidance>`_ (the Rust engine behind guidance, also used by
vLLM, SGLang and llama.cpp): it installs as one self-contained wheel with no Python dependencies (xgrammar
pulls triton and its own torch pin, outlines-core leaves schema -> regex and the token index to us, and
lm-format-enforcer is pure Python and much slower per step), its JSON Schema support is broad (``$ref``,
``anyOf``, ``pattern``, ``format``, ``minLength``/``maxItems``, numeric bounds ...) and it *names* what
it does not implement (``Unimplemented keys: ["uniqueItems"]``), which becomes the API's 400.

How it hooks in: :class:`JsonConstraintSpec` rides on ``SamplingParams.constraint``; each
:class:`~modules.llm.sampling.RowState` starts its own :class:`JsonConstraint` from it, so the masking works
in whatever engine loop builds RowStates (plain, batched, paged, speculative via ``fork``).

llguidance needs each token's bytes. For a ``tokenizer.json`` (Hugging Face "fast") tokenizer it reads the
file's JSON itself; for a SentencePiece ``tokenizer.model`` (and GGUF vocabularies, rebuilt as one) the
table is built here: ``▁`` is a space, ``<0xNN>`` byte-fallback pieces are that byte, control tokens are
special (never text). Building it costs a few ms per 1000 tokens, so :class:`GrammarCompiler` keeps one per
tokenizer object (the service re-reads a tokenizer only when its files change).

Whitespace between JSON tokens is limited to a few characters: an unconstrained whitespace rule is the
classic way a constrained model loops forever (``{`` followed by newlines until max_tokens).
"""
from __future__ import annotations

import json
import threading
import weakref
from dataclasses import dataclass
from typing import Any, Iterable

import torch

#: whitespace allowed between JSON tokens: a space, or a newline and some indentation
WHITESPACE_PATTERN = r"(?:[ ]?|\n[ ]{0,16})"


class SchemaError(ValueError):
    """A response_format the server cannot turn into a grammar; the message names the problem."""

    def __init__(self, message: str, *, unsupported: bool = False):
        super().__init__(message)
        self.unsupported = unsupported


def schema_for(response_format: dict[str, Any]) -> dict[str, Any] | None:
    """The JSON Schema a response_format asks for: ``{}`` for ``json_object`` (any object, as OpenAI's JSON
    mode), the given schema for ``json_schema``, None for ``text``. Raises SchemaError for malformed input."""
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "object"}
    if kind != "json_schema":
        raise SchemaError(f"response_format type {kind!r} is not supported; use \"text\", \"json_object\" or "
                          "\"json_schema\"", unsupported=True)
    spec = response_format.get("json_schema")
    if not isinstance(spec, dict):
        raise SchemaError("response_format.json_schema must be an object: {\"name\": ..., \"schema\": {...}}")
    name = spec.get("name")
    if not isinstance(name, str) or not name:
        raise SchemaError("response_format.json_schema.name is required (a-z, A-Z, 0-9, _ and -, up to 64 "
                          "characters)")
    if len(name) > 64 or not all(c.isascii() and (c.isalnum() or c in "_-") for c in name):
        raise SchemaError(f"response_format.json_schema.name {name!r} must be a-z, A-Z, 0-9, _ or -, at most "
                          "64 characters")
    if "strict" in spec and spec["strict"] is not None and not isinstance(spec["strict"], bool):
        raise SchemaError("response_format.json_schema.strict must be true or false")
    schema = spec.get("schema", {})
    if not isinstance(schema, dict):
        raise SchemaError("response_format.json_schema.schema must be a JSON Schema object")
    return schema


# -- token tables ---------------------------------------------------------------------------------------------

def _sentencepiece_bytes(tokenizer: Any, n: int) -> tuple[list[bytes], list[int]]:
    """Each id's bytes as the decoder writes them, and the special ids (control/added special tokens)."""
    special = set(tokenizer.special_ids())
    tokens: list[bytes] = []
    for i in range(n):
        piece = tokenizer.id_to_token(i)
        if piece is None or i in special:
            tokens.append(b"\xff" + (piece or f"<unused{i}>").encode("utf-8"))  # llguidance's special marker
            special.add(i)
        elif len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">"):
            tokens.append(bytes([int(piece[3:5], 16)]))
        else:
            tokens.append(piece.replace("\u2581", " ").encode("utf-8"))
    return tokens, sorted(special)


class _TokenTable:
    """What llguidance's TokenizerWrapper reads: token bytes, EOS/BOS, special ids, and an encoder."""

    def __init__(self, tokenizer: Any, n_vocab: int, eos: list[int]):
        self.tokens, self.special_token_ids = _sentencepiece_bytes(tokenizer, n_vocab)
        self.eos_token_id = eos[0]
        self.bos_token_id = tokenizer.bos_id
        self._tokenizer = tokenizer

    def __call__(self, text: str | bytes) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8", errors="replace")
        return self._tokenizer.encode_inner(text)  # no dummy-prefix space: "{" must not start with "▁"


def build_lltokenizer(tokenizer: Any, vocab_size: int, eos_ids: Iterable[int]) -> Any:
    """An ``llguidance.LLTokenizer`` over *tokenizer* with the model's *vocab_size* and every EOS id."""
    import llguidance
    eos = sorted(set(int(i) for i in eos_ids)) or [tokenizer.eos_id]
    hf_json = tokenizer.hf_json()
    if hf_json is not None:
        return llguidance.LLTokenizer(hf_json, n_vocab=vocab_size, eos_token=eos)
    table = llguidance.TokenizerWrapper(_TokenTable(tokenizer, vocab_size, eos))
    return llguidance.LLTokenizer(table, n_vocab=vocab_size, eos_token=eos)


# -- grammars and per-row state -----------------------------------------------------------------------------

@dataclass(frozen=True)
class JsonConstraintSpec:
    """A compiled grammar for one request; every sampled row starts its own matcher from it."""
    lltokenizer: Any
    grammar: str
    vocab_size: int
    eos_ids: tuple[int, ...]

    def start(self) -> "JsonConstraint":
        import llguidance
        return JsonConstraint(self, llguidance.LLMatcher(self.lltokenizer, self.grammar, log_level=0))


class JsonConstraint:
    """One row's grammar state: ``allowed()`` is the Bool[V] mask of tokens that may come next,
    ``advance(token)`` moves past the sampled one, ``fork()`` copies the state (speculative drafts)."""

    def __init__(self, spec: JsonConstraintSpec, matcher: Any):
        self.spec, self.matcher = spec, matcher
        self._eos_only: torch.Tensor | None = None

    def _only_eos(self) -> torch.Tensor:
        if self._eos_only is None:
            mask = torch.zeros(self.spec.vocab_size, dtype=torch.bool)
            mask[list(self.spec.eos_ids)] = True
            self._eos_only = mask
        return self._eos_only

    def allowed(self) -> torch.Tensor:
        m = self.matcher
        if m.is_stopped() or m.is_error():  # complete (or broken): all that may follow is the end
            return self._only_eos()
        bits = torch.frombuffer(bytearray(m.compute_bitmask()), dtype=torch.uint8)
        shifts = torch.arange(8, dtype=torch.uint8)
        mask = ((bits[:, None] >> shifts) & 1).bool().flatten()  # little-endian bit order, as llguidance writes
        n = self.spec.vocab_size
        if mask.numel() >= n:
            return mask[:n]
        return torch.cat([mask, torch.zeros(n - mask.numel(), dtype=torch.bool)])

    def advance(self, token_id: int) -> None:
        if not self.matcher.is_stopped():
            self.matcher.consume_token(int(token_id))

    def fork(self) -> "JsonConstraint":
        return JsonConstraint(self.spec, self.matcher.deep_copy())

    @property
    def complete(self) -> bool:
        return self.matcher.is_accepting()


class GrammarCompiler:
    """Compiles response_format schemas into :class:`JsonConstraintSpec` for a model's tokenizer.

    Owns the per-tokenizer llguidance tables (weakly keyed by the tokenizer object, so a re-read tokenizer
    gets a fresh table and the old one goes with it)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tables: "weakref.WeakKeyDictionary[Any, dict[tuple, Any]]" = weakref.WeakKeyDictionary()

    def lltokenizer(self, tokenizer: Any, vocab_size: int, eos_ids: Iterable[int]) -> Any:
        key = (vocab_size, tuple(sorted(eos_ids)))
        with self._lock:
            cached = self._tables.get(tokenizer, {}).get(key)
        if cached is not None:
            return cached
        built = build_lltokenizer(tokenizer, vocab_size, key[1])
        with self._lock:
            self._tables.setdefault(tokenizer, {})[key] = built
        return built

    def compile(self, schema: dict[str, Any], tokenizer: Any, vocab_size: int,
                eos_ids: Iterable[int]) -> JsonConstraintSpec:
        """The spec for *schema*; raises SchemaError naming an invalid or unsupported part."""
        import llguidance
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                json.dumps(schema), defaults={"whitespace_pattern": WHITESPACE_PATTERN})
        except (ValueError, TypeError) as exc:
            raise SchemaError(f"the JSON schema is invalid: {exc}") from None
        lltok = self.lltokenizer(tokenizer, vocab_size, eos_ids)
        is_error, messages = llguidance.LLMatcher.validate_grammar_with_warnings(grammar, lltok)
        if is_error:
            message = messages[0] if messages else "unknown error"
            if "Unimplemented keys" in message or "not supported" in message:
                raise SchemaError(f"the JSON schema uses features this server does not support: {message}",
                                  unsupported=True)
            raise SchemaError(f"the JSON schema is invalid: {message}")
        eos = tuple(sorted(set(int(i) for i in eos_ids)))
        return JsonConstraintSpec(lltok, grammar, vocab_size, eos)

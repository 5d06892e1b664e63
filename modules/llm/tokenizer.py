"""Llama-2 SentencePiece tokenizer: text <-> ids exactly as the Llama-2 tokenizer, plus streaming.

Two backends, chosen by the files in the model folder:

* ``tokenizer.json`` (the Hugging Face "fast" format) through the ``tokenizers`` library - used when
  present, since it is what transformers' ``LlamaTokenizerFast`` itself runs;
* ``tokenizer.model`` (SentencePiece protobuf) through the ``sentencepiece`` library. Special and added
  tokens written in the text (``</s>`` in a rendered chat template) are split out first and map to
  their ids, as transformers does. The dummy-prefix space follows SentencePiece (and Llama-2's own
  ``tokenizer.json``, llama.cpp and transformers 4): it is added at the start of the text even when
  the text already starts with a space (checked against llama.cpp's 46 reference tokenizations of
  the real Llama-2 vocabulary in ``tests/llm/test_tokenizer.py``; transformers 5 drops it there).
  With ``legacy: false`` in ``tokenizer_config.json`` (TinyLlama) it is added only at the start of
  the text, not after special tokens; legacy configs add it after every special token.

For SentencePiece models the Llama-2 layout is assumed: ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2, then 256
``<0xNN>`` byte-fallback pieces, so any text, emoji included, encodes without ``<unk>``. The fast backend
takes its special tokens from ``tokenizer_config.json`` (ChatML's ``<|im_start|>``/``<|im_end|>`` for
SmolLM, say); ``"unk_token": null`` there means the vocabulary has none (byte-level BPE needs none), and
``"add_bos_token": false`` that sequences start without BOS (SmolLM, as transformers and llama.cpp do).
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

SPIECE_UNDERLINE = "\u2581"


class TokenizerError(ValueError):
    """A tokenizer that is missing or cannot be loaded; the message says which file goes where."""


class Tokenizer:
    """``encode(text, add_bos)`` / ``decode(ids)`` over one of the two backends (see module docstring)."""

    def __init__(self, backend: "_Backend", bos_token: str = "<s>", eos_token: str = "</s>",
                 unk_token: str | None = "<unk>", source: str = "", add_bos_token: bool = True):
        self._backend = backend
        self.source = source
        self.bos_token, self.eos_token, self.unk_token = bos_token, eos_token, unk_token
        #: whether a sequence starts with BOS (tokenizer_config.json's add_bos_token); see encode
        self.add_bos_token = add_bos_token
        self.bos_id = self._required_id(bos_token)
        self.eos_id = self._required_id(eos_token)
        self.unk_id = self._required_id(unk_token) if unk_token is not None else None

    def _required_id(self, token: str) -> int:
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"Tokenizer {self.source} has no token {token!r} (a Llama-2 tokenizer has "
                                 "<unk>=0, <s>=1, </s>=2); check tokenizer_config.json's special tokens")
        return token_id

    # -------------------------------------------------------------------------------------- loading
    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        folder = Path(path)
        config = _read_json(folder / "tokenizer_config.json") or {}
        tokens: dict[str, Any] = {name: _token_text(config.get(name)) or default for name, default in
                                  (("bos_token", "<s>"), ("eos_token", "</s>"), ("unk_token", "<unk>"))}
        if "unk_token" in config and config["unk_token"] is None:
            tokens["unk_token"] = None      # said explicitly: the vocabulary has no unknown token
        tokens["add_bos_token"] = config.get("add_bos_token", True) is not False
        if (folder / "tokenizer.json").is_file():
            backend: _Backend = _FastBackend(folder / "tokenizer.json")
            source = str(folder / "tokenizer.json")
        elif (folder / "tokenizer.model").is_file():
            added = _added_tokens(config)
            backend = _SentencePieceBackend(folder / "tokenizer.model", added,
                                            legacy=config.get("legacy", True) is not False)
            source = str(folder / "tokenizer.model")
        else:
            raise TokenizerError(f"No tokenizer in {folder}: put the model's tokenizer.model (SentencePiece) "
                                 f"and/or tokenizer.json into {folder}/ (they come with the model download, "
                                 "next to config.json).")
        return cls(backend, source=source, **tokens)

    # ---------------------------------------------------------------------------------------- basics
    @property
    def vocab_size(self) -> int:
        return self._backend.vocab_size

    def token_to_id(self, token: str) -> int | None:
        return self._backend.token_to_id(token)

    def vocabulary_fingerprint(self, n: int) -> str:
        """A hash of the first *n* pieces by id plus the BOS/EOS ids (speculative decoding's draft check,
        :func:`modules.llm.speculative.vocabulary_fingerprint`), computed once per *n*: hashing a 32k
        vocabulary takes tens of milliseconds, and a tokenizer never changes after loading."""
        cache = self.__dict__.setdefault("_fingerprints", {})
        if n not in cache:
            from modules.llm.speculative import hash_vocabulary
            cache[n] = hash_vocabulary(self, n)
        return cache[n]

    def id_to_token(self, token_id: int) -> str | None:
        return self._backend.id_to_token(token_id)

    def special_ids(self) -> list[int]:
        """Ids of the special tokens (BOS, EOS, control and special added tokens): never text (constrained
        decoding must not offer them as characters)."""
        return sorted(self._backend.special_ids() | {self.bos_id, self.eos_id})

    def encode_inner(self, text: str) -> list[int]:
        """Ids of *text* as it would be tokenized mid-sequence: no BOS and no SentencePiece dummy-prefix
        space (``"{"`` is ``[<0x7B>]``, not ``["▁", <0x7B>]``), what grammar engines canonicalise with."""
        return self._backend.encode_inner(text)

    def hf_json(self) -> str | None:
        """The Hugging Face ``tokenizers`` JSON of a fast tokenizer (None for SentencePiece): what grammar
        engines such as llguidance read token bytes from."""
        return self._backend.hf_json()

    def encode(self, text: str, add_bos: bool = True) -> list[int]:
        """Token ids of *text*; *add_bos*: this is the start of a sequence, so BOS goes first - when the
        model's tokenizer adds one at all (``add_bos_token``, True unless tokenizer_config.json says false)."""
        ids = self._backend.encode(text)
        return [self.bos_id] + ids if add_bos and self.add_bos_token else ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        """Text for ``ids``; the leading dummy-prefix space of the first piece is dropped, as in HF."""
        return self._backend.decode([int(i) for i in ids], skip_special_tokens)

    def stream_decoder(self, skip_special_tokens: bool = True) -> "StreamDecoder":
        return StreamDecoder(self, skip_special_tokens)


class StreamDecoder:
    """Turns a stream of token ids into text deltas whose concatenation equals ``decode(all ids)``.

    Each push decodes a short window ``ids[prefix:]`` and returns what it adds to the text of the
    already emitted part ``ids[prefix:read]``. Decoding a window (not single tokens) keeps the spaces
    that SentencePiece encodes as a leading "▁" on a piece, and a delta whose text ends in U+FFFD is
    held back, because that is a UTF-8 character whose byte-fallback pieces have not all arrived yet.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self._prefix = 0     # window start: the first token of the last emitted chunk
        self._read = 0       # tokens before this index have been emitted

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, self.skip_special_tokens)

    def push(self, token_id: int) -> str:
        self.ids.append(int(token_id))
        emitted = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        if text.endswith("\ufffd") or len(text) <= len(emitted):
            return ""
        self._prefix, self._read = self._read, len(self.ids)
        return text[len(emitted):]

    def flush(self) -> str:
        """Whatever is still held back (an incomplete character comes out as U+FFFD)."""
        emitted = self._decode(self.ids[self._prefix:self._read])
        text = self._decode(self.ids[self._prefix:])
        self._prefix = self._read = len(self.ids)
        return text[len(emitted):] if len(text) > len(emitted) else ""


# ------------------------------------------------------------------------------------------ backends
class _Backend:
    vocab_size: int

    def token_to_id(self, token: str) -> int | None: ...
    def id_to_token(self, token_id: int) -> str | None: ...
    def encode(self, text: str) -> list[int]: ...
    def decode(self, ids: list[int], skip_special_tokens: bool) -> str: ...
    def special_ids(self) -> set[int]: ...
    def encode_inner(self, text: str) -> list[int]: ...
    def hf_json(self) -> str | None: ...


class _FastBackend(_Backend):
    def __init__(self, path: Path):
        from tokenizers import Tokenizer as HFTokenizer
        try:
            self.tok = HFTokenizer.from_file(str(path))
        except Exception as exc:  # tokenizers raises a plain Exception for malformed files
            raise TokenizerError(f"Cannot read {path}: {exc}. Replace it with the model's tokenizer.json, "
                                 "or delete it to use tokenizer.model instead.") from exc
        self.vocab_size = self.tok.get_vocab_size(with_added_tokens=True)

    def token_to_id(self, token):
        return self.tok.token_to_id(token)

    def id_to_token(self, token_id):
        return self.tok.id_to_token(token_id)

    def encode(self, text):
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids, skip_special_tokens):
        return self.tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def special_ids(self):
        return {i for i, t in self.tok.get_added_tokens_decoder().items() if t.special}

    def hf_json(self):
        return self.tok.to_str()

    def encode_inner(self, text):
        return self.encode(text)  # a fast tokenizer's pre-tokenizer decides; grammar engines read hf_json


class _SentencePieceBackend(_Backend):
    def __init__(self, path: Path, added: dict[str, tuple[int, bool]], legacy: bool):
        import sentencepiece as spm
        self.sp = spm.SentencePieceProcessor()
        try:
            self.sp.Load(str(path))
        except (OSError, RuntimeError) as exc:
            raise TokenizerError(f"Cannot read {path} as a SentencePiece model: {exc}. Replace it with the "
                                 "model's tokenizer.model.") from exc
        self.legacy = legacy
        # Tokens matched verbatim in text: the control symbols and any added tokens from the config.
        self.added = {self.sp.IdToPiece(i): (i, True) for i in range(self.sp.GetPieceSize())
                      if self.sp.IsControl(i) or self.sp.IsUnknown(i)}
        self.added.update(added)
        self._special_added = {i for i, special in self.added.values() if special}
        self.added_by_id = {i: piece for piece, (i, _) in self.added.items()}
        self.vocab_size = max([self.sp.GetPieceSize()] + [i + 1 for i, _ in self.added.values()])
        pattern = "|".join(re.escape(t) for t in sorted(self.added, key=len, reverse=True))
        self._split = re.compile(f"({pattern})") if pattern else None
        self.sp_no_prefix = _without_dummy_prefix(path)

    def token_to_id(self, token):
        if token in self.added:
            return self.added[token][0]
        token_id = self.sp.PieceToId(token)
        return None if token_id == self.sp.unk_id() and token != self.sp.IdToPiece(token_id) else token_id

    def id_to_token(self, token_id):
        if token_id in self.added_by_id:
            return self.added_by_id[token_id]
        return self.sp.IdToPiece(token_id) if 0 <= token_id < self.sp.GetPieceSize() else None

    def special_ids(self):
        return set(self._special_added) | {i for i in range(self.sp.GetPieceSize())
                                         if self.sp.IsControl(i) or self.sp.IsUnknown(i)}

    def hf_json(self):
        return None

    def encode_inner(self, text):
        return self.sp_no_prefix.EncodeAsIds(text)

    def encode(self, text):
        parts = self._split.split(text) if self._split else [text]
        ids: list[int] = []
        for index, part in enumerate(parts):
            if not part:
                continue
            if part in self.added:
                ids.append(self.added[part][0])
            elif self.legacy or index == 0:
                # As SentencePiece itself (and Llama-2's tokenizer.json, llama.cpp, transformers 4): the
                # dummy-prefix space goes before the text even when it already starts with a space, so
                # " Hello" is "▁▁Hello" -> [29871, 15043]. Legacy configs do this after special tokens too.
                ids.extend(self.sp.EncodeAsIds(part))
            else:
                # legacy: false (TinyLlama): no dummy prefix after a special token.
                ids.extend(self.sp_no_prefix.EncodeAsIds(part))
        return ids

    def decode(self, ids, skip_special_tokens):
        # Runs of ordinary pieces go through SentencePiece (byte fallback, "▁" -> space); added tokens
        # are written as their text, special ones only when asked.
        out: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id in self.added_by_id:
                if run:
                    out.append(self._decode_run(run, first=not out))
                    run = []
                if not (skip_special_tokens and token_id in self._special_added):
                    out.append(self.added_by_id[token_id])
            else:
                run.append(token_id)
        if run:
            out.append(self._decode_run(run, first=not out))
        return "".join(out)

    def _decode_run(self, run: list[int], first: bool) -> str:
        text = self.sp.DecodeIds(run)
        if not first and self.sp.IdToPiece(run[0]).startswith(SPIECE_UNDERLINE):
            text = " " + text   # SentencePiece drops the first piece's space; only the text start may
        return text


# ------------------------------------------------------------------------------------------- helpers
def _without_dummy_prefix(path: Path):
    """The same SentencePiece model with ``add_dummy_prefix`` off (for text that must not get one)."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2

    proto = sentencepiece_model_pb2.ModelProto()
    proto.ParseFromString(path.read_bytes())
    proto.normalizer_spec.add_dummy_prefix = False
    processor = spm.SentencePieceProcessor()
    processor.LoadFromSerializedProto(proto.SerializeToString())
    return processor


def _read_json(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise TokenizerError(f"{path} is not valid JSON ({exc}); fix or delete it") from exc
    return data if isinstance(data, dict) else None


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        return value.get("content")
    return value if isinstance(value, str) else None


def _added_tokens(config: dict) -> dict[str, tuple[int, bool]]:
    """tokenizer_config.json's ``added_tokens_decoder``: {"32000": {"content": "<pad>", "special": true}}."""
    out = {}
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        if isinstance(entry, dict) and isinstance(entry.get("content"), str) and str(key).isdigit():
            out[entry["content"]] = (int(key), bool(entry.get("special", False)))
    return out

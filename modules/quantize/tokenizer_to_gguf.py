"""A model's tokenizer as GGUF stores it: the ``tokenizer.*`` key-value fields llama.cpp reads.

A GGUF carries the whole tokenizer as data, not as files: the vocabulary (``tokenizer.ggml.tokens``,
``scores``, ``token_type``), BPE merges for GPT-2-style vocabularies, the special token ids, whether
BOS/EOS are added, and the chat template. :class:`GGUFTokenizer` holds exactly those fields.

Where they come from (:meth:`GGUFTokenizer.from_hf_folder`), as llama.cpp's ``convert_hf_to_gguf.py`` does:

* a SentencePiece ``tokenizer.model`` (Llama-2, TinyLlama, Atelier's own models): ``model = "llama"``,
  ``pre = "default"``; piece, score and type of every id straight from the protobuf (NORMAL, UNKNOWN,
  CONTROL, UNUSED, BYTE); ids past the protobuf's end from ``added_tokens.json`` / ``tokenizer_config.json``
  (CONTROL when special, else USER_DEFINED, score -1000). Preferred when both files are there, as llama.cpp
  does.
* a GPT-2 byte-level BPE ``tokenizer.json``: ``model = "gpt2"``; tokens from the vocabulary plus added
  tokens (CONTROL when special or shaped like ``<|...|>``, else USER_DEFINED), the merges, and a
  pre-tokenizer llama.cpp implements (:mod:`modules.quantize.bpe_pre`).

One difference no GGUF field can express: llama.cpp's SentencePiece tokenizer puts the dummy-prefix
space after every special token (SentencePiece's "legacy" behaviour), while a ``legacy: false``
``tokenizer_config.json`` (TinyLlama, Atelier's models) puts it only at the start of the text. Plain text
tokenizes identically; a rendered chat prompt such as ``"...</s>\n<|assistant|>"`` gets an extra "▁" after
``</s>`` in llama.cpp. Code that serves a GGUF should therefore tokenize with Atelier's tokenizer and hand
llama.cpp token ids, not text. The folder's flag is kept in Atelier's own key ``tokenizer.atelier.legacy``
(llama.cpp ignores keys it does not know), so importing an exported file tokenizes exactly as the folder
did; a GGUF without it is tokenized as llama.cpp does.

Any other tokenizer (WordPiece, Unigram, a SentencePiece-style ``tokenizer.json`` without its
``tokenizer.model``) raises :class:`GGUFExportError`: llama.cpp would tokenize it differently. The
vocabulary is padded with ``[PAD{i}]`` UNUSED tokens up to the model's ``vocab_size`` (llama.cpp needs one
token per embedding row), as llama.cpp's converter does. Special ids come from ``tokenizer_config.json``'s
token strings, then ``config.json``, then ``generation_config.json``; the chat template from
``tokenizer_config.json`` or ``chat_template.jinja`` (the same precedence as
:func:`modules.llm.chat_template.load_chat_template`), verbatim.

:meth:`GGUFTokenizer.from_gguf` copies every ``tokenizer.*`` field of an existing file (a re-export of an
imported GGUF keeps its tokenizer bit for bit).
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.quantize.errors import GGUFExportError

#: llama.cpp ``llama_token_type`` values
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6
#: score llama.cpp's converter gives added tokens, and padding tokens
ADDED_SCORE, PAD_SCORE = -1000.0, -10000.0
#: special-token kinds with their own fields; GGUF key infix for each
SPECIAL_KINDS = {"bos": "bos", "eos": "eos", "unk": "unknown", "pad": "padding"}
_KEY = "tokenizer.ggml."
#: Atelier's own key: the SentencePiece folder's ``legacy`` flag (no llama.cpp key says it; see the docstring)
LEGACY_KEY = "tokenizer.atelier.legacy"


@dataclass
class GGUFValue:
    """A raw GGUF key-value entry, kept with its types so a copy writes back identically."""
    value: Any
    vtype: Any                      # gguf.GGUFValueType
    sub_type: Any = None            # element type of an ARRAY


@dataclass
class GGUFTokenizer:
    #: ``tokenizer.ggml.model``: "llama" (SentencePiece) or "gpt2" (byte-level BPE)
    model: str
    #: ``tokenizer.ggml.pre``: llama.cpp's pre-tokenizer name ("default" for SentencePiece)
    pre: str
    tokens: list[str]
    token_types: list[int]
    #: one per token for SentencePiece; None for BPE (llama.cpp's converter writes none there)
    scores: list[float] | None = None
    #: BPE merges as "left right" strings; empty for SentencePiece
    merges: list[str] = field(default_factory=list)
    bos_id: int | None = None
    eos_id: int | None = None
    unk_id: int | None = None
    pad_id: int | None = None
    add_bos: bool | None = None
    add_eos: bool | None = None
    chat_template: str | None = None
    #: every other ``tokenizer.*`` field (``add_space_prefix``, named chat templates, ``eot_token_id``...)
    extra: dict[str, GGUFValue] = field(default_factory=dict)

    def __post_init__(self) -> None:
        problems = []
        if self.model not in ("llama", "gpt2"):
            problems.append(f"model {self.model!r} is not one Atelier writes ('llama' or 'gpt2')")
        if len(self.token_types) != len(self.tokens):
            problems.append(f"{len(self.tokens)} tokens but {len(self.token_types)} token types")
        if self.scores is not None and len(self.scores) != len(self.tokens):
            problems.append(f"{len(self.tokens)} tokens but {len(self.scores)} scores")
        if self.model == "gpt2" and not self.merges:
            problems.append("a BPE ('gpt2') vocabulary needs its merges")
        for kind in SPECIAL_KINDS:
            value = getattr(self, f"{kind}_id")
            if value is not None and not 0 <= value < len(self.tokens):
                problems.append(f"{kind} token id {value} is outside the vocabulary (0..{len(self.tokens) - 1})")
        if problems:
            raise GGUFExportError("Cannot represent this tokenizer in GGUF: " + "; ".join(problems))

    @property
    def vocab_size(self) -> int:
        return len(self.tokens)

    # ------------------------------------------------------------------------------- from a HF folder
    @classmethod
    def from_hf_folder(cls, folder: str | Path, vocab_size: int | None = None) -> "GGUFTokenizer":
        """The tokenizer of an HF model folder; *vocab_size* (config.json's) pads the vocabulary up to it."""
        folder = Path(folder)
        config = _read_json(folder / "tokenizer_config.json")
        if (folder / "tokenizer.model").is_file():
            tokens, scores, types, proto_ids, add_prefix = _sentencepiece_vocab(folder, config)
            model, pre, merges, post = "llama", "default", [], None
        elif (folder / "tokenizer.json").is_file():
            tokens, types, merges, pre, post = _bpe_vocab(folder / "tokenizer.json")
            scores, proto_ids, add_prefix, model = None, {}, None, "gpt2"
        else:
            raise GGUFExportError(f"No tokenizer in {folder}: GGUF export needs tokenizer.model (SentencePiece) or "
                                  "a byte-level BPE tokenizer.json next to config.json")
        if vocab_size is not None:
            if len(tokens) > vocab_size:
                raise GGUFExportError(f"{folder}: the tokenizer has {len(tokens)} tokens but config.json's "
                                      f"vocab_size is {vocab_size}; the tokenizer files belong to another model")
            for i in range(len(tokens), vocab_size):
                tokens.append(f"[PAD{i}]")
                types.append(UNUSED)
                if scores is not None:
                    scores.append(PAD_SCORE)
        ids = _special_ids(folder, config, tokens, proto_ids)
        add_bos, add_eos = _add_flags(config, post, model)
        extra: dict[str, GGUFValue] = {}
        if add_prefix is not None:
            from gguf import GGUFValueType
            extra["tokenizer.ggml.add_space_prefix"] = GGUFValue(add_prefix, GGUFValueType.BOOL)
        if model == "llama" and isinstance(config.get("legacy"), bool):
            from gguf import GGUFValueType    # llama.cpp ignores it; Atelier's import tokenizes as the folder did
            extra[LEGACY_KEY] = GGUFValue(config["legacy"], GGUFValueType.BOOL)
        return cls(model=model, pre=pre, tokens=tokens, token_types=types, scores=scores, merges=merges,
                   add_bos=add_bos, add_eos=add_eos, chat_template=_chat_template(folder, config), extra=extra,
                   **{f"{kind}_id": value for kind, value in ids.items()})

    # ---------------------------------------------------------------------------------- from a GGUF
    @classmethod
    def from_gguf(cls, path: str | Path) -> "GGUFTokenizer":
        """Every ``tokenizer.*`` field of the GGUF at *path*, for writing a new file with the same tokenizer."""
        from gguf import GGUFReader, GGUFValueType

        path = Path(path)
        try:
            reader = GGUFReader(str(path))
        except (OSError, ValueError) as exc:
            raise GGUFExportError(f"{path} is not a readable GGUF file: {exc}") from exc
        fields: dict[str, GGUFValue] = {}
        for key, entry in reader.fields.items():
            if key.startswith("tokenizer."):
                vtype = entry.types[0]
                sub = entry.types[-1] if vtype == GGUFValueType.ARRAY else None
                fields[key] = GGUFValue(entry.contents(), vtype, sub)
        if _KEY + "model" not in fields or _KEY + "tokens" not in fields:
            raise GGUFExportError(f"{path} has no tokenizer (no tokenizer.ggml.model / tokens fields)")

        def take(name: str, default: Any = None) -> Any:
            found = fields.pop(name, None)
            return default if found is None else found.value

        tokens = list(take(_KEY + "tokens"))
        kwargs: dict[str, Any] = dict(
            model=take(_KEY + "model"), pre=take(_KEY + "pre", "default"), tokens=tokens,
            token_types=[int(t) for t in take(_KEY + "token_type", [NORMAL] * len(tokens))],
            scores=None, merges=list(take(_KEY + "merges", [])),
            add_bos=take(_KEY + "add_bos_token"), add_eos=take(_KEY + "add_eos_token"),
            chat_template=take("tokenizer.chat_template"))
        scores = take(_KEY + "scores")
        if scores is not None:
            kwargs["scores"] = [float(s) for s in scores]
        for kind, infix in SPECIAL_KINDS.items():
            value = take(f"{_KEY}{infix}_token_id")
            kwargs[f"{kind}_id"] = None if value is None else int(value)
        if kwargs["add_bos"] is not None:
            kwargs["add_bos"] = bool(kwargs["add_bos"])
        if kwargs["add_eos"] is not None:
            kwargs["add_eos"] = bool(kwargs["add_eos"])
        try:
            return cls(**kwargs, extra=fields)
        except GGUFExportError as exc:
            raise GGUFExportError(f"{path}: {exc}") from None

    # ------------------------------------------------------------------------------------- writing
    def add_to_writer(self, writer: Any) -> None:
        """Add every field to a ``gguf.GGUFWriter`` (before its header is written)."""
        writer.add_tokenizer_model(self.model)
        writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        writer.add_token_types(self.token_types)
        if self.merges:
            writer.add_token_merges(self.merges)
        for kind, infix in SPECIAL_KINDS.items():
            value = getattr(self, f"{kind}_id")
            if value is not None:
                writer.add_uint32(f"{_KEY}{infix}_token_id", value)
        if self.add_bos is not None:
            writer.add_add_bos_token(self.add_bos)
        if self.add_eos is not None:
            writer.add_add_eos_token(self.add_eos)
        if self.chat_template is not None:
            # add_string, not add_chat_template: the template goes in verbatim (even an empty one)
            from gguf import GGUFValueType
            writer.add_key_value("tokenizer.chat_template", self.chat_template, GGUFValueType.STRING)
        for key, entry in self.extra.items():
            writer.add_key_value(key, entry.value, entry.vtype, sub_type=entry.sub_type)


# --------------------------------------------------------------------------------- SentencePiece
def _sentencepiece_vocab(folder: Path, config: dict) -> tuple[list[str], list[float], list[int], dict[str, int], bool]:
    """tokens, scores, types, the protobuf's own special ids, and its dummy-prefix setting."""
    import sentencepiece as spm
    from sentencepiece import sentencepiece_model_pb2 as pb

    path = folder / "tokenizer.model"
    proto = pb.ModelProto()
    try:
        proto.ParseFromString(path.read_bytes())
        sp = spm.SentencePieceProcessor()
        sp.LoadFromSerializedProto(proto.SerializeToString())
    except Exception as exc:  # protobuf's DecodeError and sentencepiece's RuntimeError share no base class
        raise GGUFExportError(f"{path} is not a readable SentencePiece model ({exc}); replace it with the "
                              "model's tokenizer.model") from None
    if proto.trainer_spec.model_type != pb.TrainerSpec.BPE:
        # llama.cpp's "llama" tokenizer merges pieces by score the way SentencePiece BPE does; a unigram
        # (or word/char) model would come out tokenized differently.
        kind = pb.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)
        raise GGUFExportError(f"{path} is a SentencePiece {kind} model; llama.cpp's Llama tokenizer reproduces "
                              "SentencePiece BPE models only (Llama-2's kind)")
    tokens, scores, types = [], [], []
    for i in range(sp.GetPieceSize()):
        tokens.append(sp.IdToPiece(i))
        scores.append(float(sp.GetScore(i)))
        if sp.IsUnknown(i):
            types.append(UNKNOWN)
        elif sp.IsControl(i):
            types.append(CONTROL)
        elif sp.IsUnused(i):
            types.append(UNUSED)
        elif sp.IsByte(i):
            types.append(BYTE)
        else:
            types.append(NORMAL)
    # Tokens added on top of the protobuf (ids past its end), as transformers lists them.
    added: dict[int, tuple[str, bool]] = {}
    for text, token_id in (_read_json(folder / "added_tokens.json") or {}).items():
        if isinstance(token_id, int):
            added[token_id] = (text, False)
    for key, entry in (config.get("added_tokens_decoder") or {}).items():
        if str(key).isdigit() and isinstance(entry, dict) and isinstance(entry.get("content"), str):
            added[int(key)] = (entry["content"], bool(entry.get("special")))
    for token_id in sorted(i for i in added if i >= len(tokens)):
        while len(tokens) < token_id:                      # a hole before it: llama.cpp's padding token
            tokens.append(f"[PAD{len(tokens)}]")
            scores.append(PAD_SCORE)
            types.append(UNUSED)
        text, special = added[token_id]
        control = special or _looks_special(text)
        tokens.append(text if control else text.replace("\u2581", " "))
        scores.append(ADDED_SCORE)
        types.append(CONTROL if control else USER_DEFINED)
    trainer = proto.trainer_spec
    proto_ids = {kind: value for kind, value in (("unk", trainer.unk_id), ("bos", trainer.bos_id),
                                                  ("eos", trainer.eos_id), ("pad", trainer.pad_id)) if value >= 0}
    return tokens, scores, types, proto_ids, bool(proto.normalizer_spec.add_dummy_prefix)


# ------------------------------------------------------------------------------------------- BPE
def _bpe_vocab(path: Path) -> tuple[list[str], list[int], list[str], str, dict | None]:
    """tokens, types, merges, pre-tokenizer name and post-processor of a byte-level BPE tokenizer.json."""
    from modules.quantize.bpe_pre import detect_pre

    data = _read_json(path)
    if not data:
        raise GGUFExportError(f"{path} is empty or not a JSON object; replace it with the model's tokenizer.json")
    model = data.get("model") or {}
    kind = model.get("type")
    decoder = (data.get("decoder") or {}).get("type")
    if kind != "BPE":
        raise GGUFExportError(f"{path} is a {kind or 'unknown'} tokenizer; GGUF export supports SentencePiece "
                              "(tokenizer.model) and GPT-2-style byte-level BPE tokenizers, as llama.cpp's llama "
                              "architecture runs only those")
    if model.get("byte_fallback") or decoder != "ByteLevel":
        raise GGUFExportError(f"{path} is a SentencePiece-style BPE tokenizer (byte_fallback, {decoder} decoder); "
                              "export needs the model's tokenizer.model for it: put tokenizer.model next to it")
    pre = detect_pre(data, source=str(path))
    vocab = model.get("vocab") or {}
    by_id: dict[int, tuple[str, int]] = {int(i): (text, NORMAL) for text, i in vocab.items()}
    for entry in data.get("added_tokens") or []:
        text, token_id = entry.get("content"), entry.get("id")
        if not isinstance(text, str) or not isinstance(token_id, int):
            continue
        if entry.get("special") or _looks_special(text):
            by_id[token_id] = (text, CONTROL)
        else:
            by_id[token_id] = (text.replace("\u2581", " "), USER_DEFINED)
    if not by_id:
        raise GGUFExportError(f"{path} has an empty vocabulary")
    tokens, types = [], []
    for i in range(max(by_id) + 1):
        text, kind_ = by_id.get(i, (f"[PAD{i}]", UNUSED))
        tokens.append(text)
        types.append(kind_)
    merges = [_merge_text(m, path) for m in model.get("merges") or []]
    return tokens, types, merges, pre, data.get("post_processor")


def _merge_text(merge: Any, path: Path) -> str:
    """A merge as GGUF's "left right" string; tokenizers >= 0.20 writes pairs (["a", "b"]) instead."""
    if isinstance(merge, str):
        return merge
    if isinstance(merge, list) and len(merge) == 2 and all(isinstance(p, str) for p in merge):
        # A literal space inside a part would split wrongly; byte-level BPE writes space as U+0120 anyway,
        # and llama.cpp's converter maps a stray one the same way.
        return " ".join(part.replace(" ", "\u0120") for part in merge)
    raise GGUFExportError(f"{path}: unreadable merge entry {merge!r}")


# ------------------------------------------------------------------------------- special tokens
def _special_ids(folder: Path, config: dict, tokens: list[str], proto_ids: dict[str, int]) -> dict[str, int | None]:
    """bos/eos/unk/pad ids: tokenizer_config.json's token strings, config.json, generation_config.json, protobuf."""
    model_config = _read_json(folder / "config.json")
    generation = _read_json(folder / "generation_config.json")
    index: dict[str, int] = {}
    for i, text in enumerate(tokens):
        index.setdefault(text, i)
    out: dict[str, int | None] = {}
    for kind in SPECIAL_KINDS:
        text = _token_text(config.get(f"{kind}_token"))
        candidates = [index.get(text) if text is not None else None]
        for source in (model_config, generation):
            value = source.get(f"{kind}_token_id")
            candidates.append(value[0] if isinstance(value, list) and value else value)   # eos may be a list
        candidates.append(proto_ids.get(kind))
        found = next((c for c in candidates if isinstance(c, int) and not isinstance(c, bool)), None)
        if found is not None and not 0 <= found < len(tokens):
            raise GGUFExportError(f"{folder}: the {kind} token id {found} is outside the vocabulary of "
                                  f"{len(tokens)} tokens; fix config.json / tokenizer_config.json")
        out[kind] = found
    return out


def _add_flags(config: dict, post: dict | None, model: str) -> tuple[bool | None, bool | None]:
    """add_bos / add_eos: tokenizer_config.json's flags, else what tokenizer.json's post-processor adds."""
    add_bos, add_eos = config.get("add_bos_token"), config.get("add_eos_token")
    if model == "llama":
        # HF's LlamaTokenizer and llama.cpp both default to BOS on, EOS off for SentencePiece
        return (add_bos if isinstance(add_bos, bool) else True), (add_eos if isinstance(add_eos, bool) else False)
    first = last = False
    for processor in (post or {}).get("processors", [post] if post else []):
        if isinstance(processor, dict) and processor.get("type") == "TemplateProcessing":
            single = processor.get("single") or []
            first = bool(single) and "SpecialToken" in single[0]
            last = len(single) > 1 and "SpecialToken" in single[-1]
    return (add_bos if isinstance(add_bos, bool) else first), (add_eos if isinstance(add_eos, bool) else last)


def _chat_template(folder: Path, config: dict) -> str | None:
    template = config.get("chat_template")
    if isinstance(template, list):     # named templates: [{"name": "default", "template": "..."}, ...]
        template = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}.get("default")
    if isinstance(template, str):
        return template
    jinja = folder / "chat_template.jinja"
    return jinja.read_text(encoding="utf-8") if jinja.is_file() else None


def _looks_special(text: str) -> bool:
    """Added tokens llama.cpp's converter treats as control tokens even when not flagged special."""
    return (text.startswith("<|") and text.endswith("|>")) or text in ("<pad>", "<mask>") \
        or (text.startswith("<unused") and text.endswith(">"))


def _token_text(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise GGUFExportError(f"{path} is not valid JSON ({exc}); fix or delete it") from exc
    return data if isinstance(data, dict) else {}

"""Hugging Face tokenizer files from the vocabulary stored in a GGUF file.

A GGUF carries its tokenizer as metadata arrays (``tokenizer.ggml.tokens``, ``.scores``, ``.token_type``,
``.merges``) and a few ids and flags. :func:`write_gguf_tokenizer_files` turns them into the files
:class:`modules.llm.tokenizer.Tokenizer` reads from a model folder:

* ``tokenizer.ggml.model == "llama"`` (SentencePiece; Llama-2, TinyLlama, Mistral) -> ``tokenizer.model``,
  rebuilt by :func:`modules.llm.gguf_vocab.sentencepiece_model_from_vocab`, with ``legacy: true`` (llama.cpp
  adds the dummy-prefix space after every special token, as legacy Llama tokenizers do);
* ``"gpt2"`` (byte-level BPE; SmolLM, Llama-3) -> ``tokenizer.json`` built with the ``tokenizers`` library:
  the file's vocabulary and merges, the byte-level decoder, control tokens (type 3) as special added tokens
  and user-defined ones (type 4) as plain added tokens, and the pre-tokenizer llama.cpp uses for the file's
  ``tokenizer.ggml.pre`` (table :data:`BPE_PRE_TOKENIZERS`, copied from ``llama-vocab.cpp``). For SmolLM's
  ``"smollm"`` that is single digits, then GPT-2's regex - the same as SmolLM2's own ``tokenizer.json``;
  transformers' GGUF converter leaves the digit split out, which is harmless for SmolLM2 (its vocabulary
  has no multi-digit tokens) but not in general, so the table follows llama.cpp.

plus ``tokenizer_config.json``: the bos/eos/unk/pad token texts from their ids, ``add_bos_token``/
``add_eos_token`` (llama.cpp's defaults when the file does not say: BOS for SentencePiece, not for BPE
unless the pre-tokenizer wants it), and ``chat_template`` verbatim from ``tokenizer.chat_template``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from modules.quantize.gguf_header import GGUFHeader, GGUFImportError, SkippedArray

#: the metadata arrays the tokenizer needs in full (pass to read_gguf_header)
TOKENIZER_ARRAYS = ("tokenizer.ggml.tokens", "tokenizer.ggml.merges")

#: GPT-2's pre-tokenizer regex (also the ByteLevel pre-tokenizer's built-in one)
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
#: Llama-3's (llama.cpp's case-insensitive-free spelling of it)
_LLAMA3 = (r"(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
           r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+")

#: tokenizer.ggml.pre -> (split regexes applied in order before the byte-level mapping, ignore_merges, add_bos)
#: as llama.cpp's llm_tokenizer_bpe sets them. "\p{N}" alone means: every digit is its own piece.
BPE_PRE_TOKENIZERS: dict[str, tuple[tuple[str, ...], bool, bool]] = {
    "gpt-2": ((_GPT2,), False, False),
    "phi-2": ((_GPT2,), False, False),
    "smollm": ((r"\p{N}", _GPT2), False, False),
    "starcoder": ((r"\p{N}", _GPT2), False, False),
    "refact": ((r"\p{N}", _GPT2), False, False),
    "llama-bpe": ((_LLAMA3,), True, True),
    "llama3": ((_LLAMA3,), True, True),
    "llama-v3": ((_LLAMA3,), True, True),
}

#: llama.cpp token types
_CONTROL, _USER_DEFINED = 3, 4


def check_gguf_tokenizer(header: GGUFHeader) -> str:
    """The tokenizer model ("llama" or "gpt2") if a tokenizer can be built from *header*, else GGUFImportError
    naming what is missing or unsupported. Cheap: looks at metadata only."""
    path = header.path
    model = header.get("tokenizer.ggml.model")
    if model is None:
        raise GGUFImportError(f"{path} holds no tokenizer (no tokenizer.ggml.model); Atelier needs the vocabulary "
                              "inside the GGUF. Re-convert the model with llama.cpp's convert_hf_to_gguf.py.")
    if model not in ("llama", "gpt2"):
        raise GGUFImportError(f"{path} has a {model!r} tokenizer (tokenizer.ggml.model); Atelier builds 'llama' "
                              "(SentencePiece) and 'gpt2' (byte-level BPE) tokenizers")
    tokens = header.get("tokenizer.ggml.tokens")
    count = tokens.count if isinstance(tokens, SkippedArray) else len(tokens) if isinstance(tokens, list) else 0
    if not count:
        raise GGUFImportError(f"{path} has no tokenizer.ggml.tokens; its vocabulary is missing")
    for key in ("tokenizer.ggml.scores", "tokenizer.ggml.token_type"):
        values = header.get(key)
        if values is not None and (not isinstance(values, list) or len(values) != count):
            raise GGUFImportError(f"{path}: {key} has {len(values) if isinstance(values, list) else '?'} entries "
                                  f"but there are {count} tokens; the file is damaged")
    if model == "gpt2":
        if header.get("tokenizer.ggml.merges") is None:
            raise GGUFImportError(f"{path} has a byte-level BPE vocabulary without tokenizer.ggml.merges")
        pre = header.get("tokenizer.ggml.pre") or "gpt-2"
        if pre not in BPE_PRE_TOKENIZERS:
            raise GGUFImportError(f"{path} uses the BPE pre-tokenizer {pre!r} (tokenizer.ggml.pre); Atelier "
                                  f"reproduces llama.cpp's {', '.join(sorted(BPE_PRE_TOKENIZERS))}")
    for key in ("bos", "eos"):
        token_id = header.get(f"tokenizer.ggml.{key}_token_id")
        if token_id is not None and not 0 <= token_id < count:
            raise GGUFImportError(f"{path}: tokenizer.ggml.{key}_token_id is {token_id}, outside the "
                                  f"{count}-token vocabulary")
    return model


def special_token_ids(header: GGUFHeader) -> dict[str, int | None]:
    """``{"bos", "eos", "unk", "pad", "eot"}`` ids from the metadata (None where the file names none; a
    SentencePiece vocabulary defaults to Llama's <unk>=0, <s>=1, </s>=2 as llama.cpp does)."""
    spm = header.get("tokenizer.ggml.model") == "llama"
    defaults = {"bos": 1, "eos": 2, "unknown": 0} if spm else {}
    out = {}
    for key, name in (("bos", "bos"), ("eos", "eos"), ("unknown", "unk"), ("padding", "pad"), ("eot", "eot")):
        value = header.get(f"tokenizer.ggml.{key}_token_id", defaults.get(key))
        out[name] = int(value) if isinstance(value, int) and value >= 0 else None
    return out


def write_gguf_tokenizer_files(header: GGUFHeader, out_dir: str | Path,
                               context_length: int | None = None) -> list[Path]:
    """Write tokenizer.model or tokenizer.json, and tokenizer_config.json, for *header* (read with
    :data:`TOKENIZER_ARRAYS`) into *out_dir*; returns the files written."""
    model = check_gguf_tokenizer(header)
    tokens = header.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list):
        raise ValueError("read the header with string_arrays=TOKENIZER_ARRAYS to build its tokenizer")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    types = header.get("tokenizer.ggml.token_type") or [1] * len(tokens)
    ids = special_token_ids(header)
    if model == "llama":
        written = [_write_sentencepiece(header, tokens, types, ids, out / "tokenizer.model")]
        add_bos_default = True
        # llama.cpp adds the dummy-prefix space after every special token ("legacy"); a file Atelier exported
        # says how its source folder tokenized (modules.quantize.tokenizer_to_gguf.LEGACY_KEY)
        legacy = header.get("tokenizer.atelier.legacy", True) is not False
    else:
        pre = header.get("tokenizer.ggml.pre") or "gpt-2"
        written = [_write_byte_level_bpe(header, tokens, types, pre, out / "tokenizer.json")]
        add_bos_default, legacy = BPE_PRE_TOKENIZERS[pre][2], None
    config: dict[str, Any] = {
        "add_bos_token": bool(header.get("tokenizer.ggml.add_bos_token", add_bos_default)),
        "add_eos_token": bool(header.get("tokenizer.ggml.add_eos_token", False)),
        "bos_token": tokens[ids["bos"]] if ids["bos"] is not None else None,
        "eos_token": tokens[ids["eos"]] if ids["eos"] is not None else None,
        # None, not a made-up "<unk>": byte-level vocabularies need no unknown token
        "unk_token": tokens[ids["unk"]] if ids["unk"] is not None else None,
        "pad_token": tokens[ids["pad"]] if ids["pad"] is not None else None,
    }
    if config["bos_token"] is None or config["eos_token"] is None:
        missing = [k for k in ("bos", "eos") if config[f"{k}_token"] is None]
        raise GGUFImportError(f"{header.path} names no {' and no '.join(missing)} token "
                              f"(tokenizer.ggml.{missing[0]}_token_id); Atelier needs both to build prompts")
    if legacy is not None:
        config["legacy"] = legacy
    if context_length:
        config["model_max_length"] = int(context_length)
    template = header.get("tokenizer.chat_template")
    if isinstance(template, str) and template.strip():
        config["chat_template"] = template
    config_path = out / "tokenizer_config.json"
    config_path.write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    return [*written, config_path]


def _write_sentencepiece(header: GGUFHeader, tokens: list[str], types: list[int], ids: dict, path: Path) -> Path:
    from sentencepiece import sentencepiece_model_pb2 as pb

    from modules.llm.gguf_vocab import GGUFVocabError, sentencepiece_model_from_vocab

    scores = header.get("tokenizer.ggml.scores") or [0.0] * len(tokens)
    try:
        proto_bytes = sentencepiece_model_from_vocab(tokens, scores, types, bos_id=ids["bos"], eos_id=ids["eos"],
                                                     unk_id=ids["unk"] if ids["unk"] is not None else 0)
    except GGUFVocabError as exc:
        raise GGUFImportError(f"{header.path}: {exc}") from exc
    if header.get("tokenizer.ggml.add_space_prefix") is False:   # llama.cpp honours this key; so must we
        proto = pb.ModelProto()
        proto.ParseFromString(proto_bytes)
        proto.normalizer_spec.add_dummy_prefix = False
        proto_bytes = proto.SerializeToString()
    path.write_bytes(proto_bytes)
    return path


def _write_byte_level_bpe(header: GGUFHeader, tokens: list[str], types: list[int], pre: str, path: Path) -> Path:
    from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, pre_tokenizers

    merges = []
    for index, merge in enumerate(header.get("tokenizer.ggml.merges") or []):
        parts = merge.split(" ")
        if len(parts) != 2:
            raise GGUFImportError(f"{header.path}: merge {index} ({merge!r}) is not two tokens separated by a space")
        merges.append((parts[0], parts[1]))
    splits, ignore_merges, _ = BPE_PRE_TOKENIZERS[pre]
    vocab = {token: index for index, token in enumerate(tokens)}
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=ignore_merges, fuse_unk=False,
                                     byte_fallback=False))
    steps: list[Any] = []
    for regex in splits:
        if regex == r"\p{N}":
            steps.append(pre_tokenizers.Digits(individual_digits=True))
        elif regex == _GPT2:    # the byte-level step's own regex is GPT-2's
            steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True))
        else:
            steps.append(pre_tokenizers.Split(Regex(regex), behavior="isolated", invert=False))
    if not isinstance(steps[-1], pre_tokenizers.ByteLevel):
        steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(steps)
    tokenizer.decoder = decoders.ByteLevel()
    control = [AddedToken(t, special=True, normalized=False) for t, k in zip(tokens, types) if k == _CONTROL]
    user = [AddedToken(t, special=False, normalized=False) for t, k in zip(tokens, types) if k == _USER_DEFINED]
    if control:
        tokenizer.add_special_tokens(control)
    if user:
        tokenizer.add_tokens(user)
    tokenizer.save(str(path))
    return path

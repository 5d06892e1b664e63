"""A SentencePiece tokenizer for a new model, in the Llama-2 layout, or an existing model's tokenizer.

The trained model follows Llama-2's ``tokenizer.model`` options: BPE, byte fallback (so any text, emoji
included, encodes without ``<unk>``), identity normalisation, whitespace kept as is (code indentation becomes
``▁▁▁▁`` pieces), a dummy prefix space and split digits, with ``<unk>`` = 0, ``<s>`` = 1, ``</s>`` = 2 and
no pad piece. The folder also holds ``tokenizer_config.json`` and ``special_tokens_map.json`` as
TinyLlama-1.1B-Chat ships them, so :class:`modules.llm.tokenizer.Tokenizer` and transformers'
``LlamaTokenizer`` read it with the same ids.

Determinism: SentencePiece shuffles and samples its input with its own process-wide random generator and
trains on several threads. We do the sampling ourselves (a numpy generator seeded by ``seed``, over the
lines in input order), hand it every sampled line (``input_sentence_size=0``, no shuffling) and train on one
thread, so the same input and seed give a byte-identical ``tokenizer.model``.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

#: the ids the Llama-2 layout fixes, then 256 ``<0xNN>`` byte pieces
SPECIAL_PIECES = ("<unk>", "<s>", "</s>")
BYTE_PIECES = 256
#: SentencePiece skips longer input lines; ours are split before that (bytes)
MAX_LINE_BYTES = 4096
#: files that make up a tokenizer in a model folder
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


class TokenizerTrainingError(ValueError):
    """The tokenizer cannot be trained or copied as asked; the message says what to change."""


def train_tokenizer(texts_or_files: Iterable[str | os.PathLike], vocab_size: int, out_dir: str | os.PathLike,
                    *, seed: int = 0, max_sentences: int = 2_000_000, model_max_length: int = 2048,
                    chat_template: str | None = None) -> Path:
    """Train a Llama-2-layout BPE tokenizer on ``texts_or_files`` and write it as a folder ``out_dir``.

    Args:
        texts_or_files: documents as ``str`` (the text itself) or ``os.PathLike`` (a UTF-8 text file).
        vocab_size: pieces in the model, including the 3 special and 256 byte pieces.
        out_dir: folder to write ``tokenizer.model``, ``tokenizer_config.json``, ``special_tokens_map.json``.
        seed: picks the sampled lines when the corpus has more than ``max_sentences`` lines.
        max_sentences: at most this many lines go to the trainer (memory and time grow with it).
        model_max_length: written to ``tokenizer_config.json`` (the model's context length).
        chat_template: written to ``tokenizer_config.json``; default TinyLlama-Chat's (Zephyr) template.
    Returns the folder.
    """
    import sentencepiece as spm

    minimum = len(SPECIAL_PIECES) + BYTE_PIECES + 1
    if not isinstance(vocab_size, int) or vocab_size < minimum:
        raise TokenizerTrainingError(f"vocab_size={vocab_size!r} is too small: the Llama-2 layout needs "
                                     f"{len(SPECIAL_PIECES)} special and {BYTE_PIECES} byte pieces; use at least "
                                     f"{minimum} (TinyLlama uses 32000)")
    lines = _sample(list(_lines(texts_or_files)), max_sentences, seed)
    if not lines:
        raise TokenizerTrainingError("No text to train the tokenizer on: every document was empty. Point the "
                                     "data sources at files with text in them.")
    model = io.BytesIO()
    try:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, vocab_size=vocab_size, model_type="bpe",
            character_coverage=1.0, byte_fallback=True, split_digits=True, allow_whitespace_only_pieces=True,
            remove_extra_whitespaces=False, add_dummy_prefix=True, normalization_rule_name="identity",
            unk_id=0, bos_id=1, eos_id=2, pad_id=-1, unk_piece="<unk>", bos_piece="<s>", eos_piece="</s>",
            num_threads=1, input_sentence_size=0, shuffle_input_sentence=False,
            max_sentence_length=MAX_LINE_BYTES, train_extremely_large_corpus=False, minloglevel=2,
        )
    except RuntimeError as exc:
        message = str(exc)
        if "smaller than required_chars" in message:
            raise TokenizerTrainingError(
                f"vocab_size={vocab_size} leaves no room: the corpus has more distinct characters than fit beside "
                f"the special and byte pieces (SentencePiece says {message.strip()!r}). Raise vocab_size.") from exc
        if "Vocabulary size" in message or "vocab_size" in message:
            raise TokenizerTrainingError(
                f"The corpus is too small for vocab_size={vocab_size} ({len(lines)} lines): SentencePiece says "
                f"{message.strip()!r}. Lower the vocabulary size or add text.") from exc
        raise TokenizerTrainingError(f"SentencePiece could not train: {message.strip()}") from exc
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer.model").write_bytes(model.getvalue())
    _write_json(folder / "tokenizer_config.json", tokenizer_config(model_max_length, chat_template))
    _write_json(folder / "special_tokens_map.json",
                {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "</s>"})
    return folder


def tokenizer_config(model_max_length: int, chat_template: str | None = None) -> dict:
    """``tokenizer_config.json`` as TinyLlama-1.1B-Chat-v1.0 has it (``legacy: false``, pad = ``</s>``)."""
    from modules.llm.chat_template import TINYLLAMA

    def special(content: str) -> dict:
        return {"content": content, "lstrip": False, "normalized": False, "rstrip": False,
                "single_word": False, "special": True}

    return {
        "add_bos_token": True, "add_eos_token": False, "bos_token": "<s>", "eos_token": "</s>",
        "unk_token": "<unk>", "pad_token": "</s>", "legacy": False, "model_max_length": model_max_length,
        "clean_up_tokenization_spaces": False, "sp_model_kwargs": {}, "padding_side": "left",
        "tokenizer_class": "LlamaTokenizer", "chat_template": chat_template or TINYLLAMA,
        "added_tokens_decoder": {str(i): special(piece) for i, piece in enumerate(SPECIAL_PIECES)},
    }


def copy_tokenizer(model_dir: str | os.PathLike, out_dir: str | os.PathLike) -> Path:
    """Use an existing model's tokenizer: copy its tokenizer files from ``model_dir`` into ``out_dir``.

    The copy is checked by loading it with Atelier's tokenizer, which requires the Llama-2 special tokens.
    """
    from modules.llm.tokenizer import Tokenizer, TokenizerError

    source = Path(model_dir)
    if not source.is_dir():
        raise TokenizerTrainingError(f"Tokenizer folder {source} does not exist: give the folder of a model "
                                     "(one with tokenizer.model or tokenizer.json), or train a new tokenizer")
    present = [name for name in TOKENIZER_FILES if (source / name).is_file()]
    if not {"tokenizer.model", "tokenizer.json"} & set(present):
        raise TokenizerTrainingError(f"{source} has no tokenizer.model or tokenizer.json: give the folder of a "
                                     "model that has its tokenizer, or train a new tokenizer")
    folder = Path(out_dir)
    folder.mkdir(parents=True, exist_ok=True)
    for name in present:
        shutil.copyfile(source / name, folder / name)
    try:
        Tokenizer.from_dir(folder)
    except TokenizerError as exc:
        raise TokenizerTrainingError(f"The tokenizer of {source} cannot be used: {exc}") from exc
    return folder


def tokenizer_fingerprint(folder: str | os.PathLike) -> str:
    """sha256 over the files that decide the ids (``tokenizer.model``/``tokenizer.json`` and the config's
    ``legacy`` flag), so a dataset or a run can tell whether it was made with the same tokenizer."""
    path = Path(folder)
    digest = hashlib.sha256()
    found = False
    for name in ("tokenizer.model", "tokenizer.json"):
        if (path / name).is_file():
            found = True
            digest.update(name.encode() + b"\0" + (path / name).read_bytes())
    if not found:
        raise TokenizerTrainingError(f"{path} has no tokenizer.model or tokenizer.json")
    config_path = path / "tokenizer_config.json"
    legacy = json.loads(config_path.read_text(encoding="utf-8")).get("legacy", True) if config_path.is_file() else True
    digest.update(b"legacy=" + str(legacy is not False).encode())
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------- helpers
def _lines(texts_or_files: Iterable[str | os.PathLike]) -> Iterator[str]:
    """Non-empty lines of every document, longer ones cut at whitespace to fit SentencePiece's limit."""
    for item in texts_or_files:
        if isinstance(item, os.PathLike):
            try:
                text = Path(item).read_text(encoding="utf-8")
            except FileNotFoundError as exc:
                raise TokenizerTrainingError(f"Tokenizer training file {item} does not exist") from exc
            except UnicodeDecodeError as exc:
                raise TokenizerTrainingError(f"{item} is not UTF-8 text ({exc}); convert it or leave it out") from exc
        elif isinstance(item, str):
            text = item
        else:
            raise TokenizerTrainingError(f"Tokenizer training input must be text or a path, not {type(item).__name__}")
        for line in text.splitlines():
            if line.strip():
                yield from _fit(line)


def _fit(line: str) -> Iterator[str]:
    while len(line.encode("utf-8")) > MAX_LINE_BYTES:
        cut = MAX_LINE_BYTES // 4          # characters: at most 4 UTF-8 bytes each, so this always fits
        space = line.rfind(" ", 0, cut)
        cut = space if space > 0 else cut
        yield line[:cut]
        line = line[cut:]
    if line.strip():
        yield line


def _sample(lines: list[str], limit: int, seed: int) -> list[str]:
    if len(lines) <= limit:
        return lines
    keep = np.sort(np.random.default_rng(seed).choice(len(lines), size=limit, replace=False))
    return [lines[i] for i in keep]


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")

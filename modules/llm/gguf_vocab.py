"""SentencePiece model from a GGUF vocabulary.

A GGUF file (llama.cpp's format) stores a Llama tokenizer as three parallel arrays -
``tokenizer.ggml.tokens``, ``.scores`` and ``.token_type`` - instead of the ``tokenizer.model``
protobuf a Hugging Face folder carries. ``sentencepiece_model_from_gguf`` rebuilds that protobuf so
the same ``sentencepiece`` runtime (and so ``modules.llm.tokenizer``) can use a GGUF vocabulary: for
the tests against llama.cpp's reference tokenizations, and for importing GGUF models.

The Llama SentencePiece settings are fixed, as they are in every Llama-family ``tokenizer.model``:
BPE with byte fallback, a dummy-prefix space, whitespace kept exactly as written, and the identity
normaliser. Only ``tokenizer.ggml.model == "llama"`` (SentencePiece) vocabularies can be rebuilt;
GPT-2-style BPE vocabularies (``"gpt2"``) have no SentencePiece form.
"""
from __future__ import annotations

from pathlib import Path
from typing import Sequence

#: llama.cpp's ``llama_token_type`` values (1-6) -> SentencePiece ``ModelProto.SentencePiece.Type`` names.
GGML_TOKEN_TYPES = {1: "NORMAL", 2: "UNKNOWN", 3: "CONTROL", 4: "USER_DEFINED", 5: "UNUSED", 6: "BYTE"}


class GGUFVocabError(ValueError):
    """A GGUF file without a usable SentencePiece (llama) vocabulary; the message says what is missing."""


def read_gguf_vocab(path: str | Path) -> dict:
    """``{"model", "tokens", "scores", "types", "bos_id", "eos_id", "unk_id"}`` from the GGUF at *path*."""
    from gguf import GGUFReader

    path = Path(path)
    try:
        reader = GGUFReader(str(path))
    except (OSError, ValueError) as exc:
        raise GGUFVocabError(f"{path} is not a readable GGUF file: {exc}") from exc

    def field(name: str, required: bool = True):
        found = reader.fields.get(name)
        if found is None:
            if required:
                raise GGUFVocabError(f"{path} has no {name}; it holds no tokenizer vocabulary")
            return None
        return found

    model = _scalar(field("tokenizer.ggml.model"))
    tokens = [bytes(field("tokenizer.ggml.tokens").parts[i]).decode("utf-8")
              for i in field("tokenizer.ggml.tokens").data]
    scores_field = field("tokenizer.ggml.scores", required=False)
    types_field = field("tokenizer.ggml.token_type", required=False)
    scores = [float(scores_field.parts[i][0]) for i in scores_field.data] if scores_field else [0.0] * len(tokens)
    types = [int(types_field.parts[i][0]) for i in types_field.data] if types_field else [1] * len(tokens)
    if not (len(tokens) == len(scores) == len(types)):
        raise GGUFVocabError(f"{path}: {len(tokens)} tokens but {len(scores)} scores and {len(types)} types")
    ids = {}
    for key, default in (("bos", 1), ("eos", 2), ("unknown", 0)):
        value = field(f"tokenizer.ggml.{key}_token_id", required=False)
        ids[key] = int(_scalar(value)) if value is not None else default
    return {"model": model, "tokens": tokens, "scores": scores, "types": types,
            "bos_id": ids["bos"], "eos_id": ids["eos"], "unk_id": ids["unknown"]}


def sentencepiece_model_from_vocab(tokens: Sequence[str], scores: Sequence[float], types: Sequence[int], *,
                                   bos_id: int = 1, eos_id: int = 2, unk_id: int = 0) -> bytes:
    """A serialized SentencePiece ``ModelProto`` (the bytes of a ``tokenizer.model``) for this vocabulary."""
    from sentencepiece import sentencepiece_model_pb2 as pb

    proto = pb.ModelProto()
    piece_type = pb.ModelProto.SentencePiece.Type
    for index, (piece, score, kind) in enumerate(zip(tokens, scores, types)):
        if kind not in GGML_TOKEN_TYPES:
            raise GGUFVocabError(f"token {index} ({piece!r}) has type {kind}; GGUF token types are 1-6 "
                                 f"({', '.join(f'{k}={v}' for k, v in GGML_TOKEN_TYPES.items())})")
        entry = proto.pieces.add()
        entry.piece, entry.score, entry.type = piece, float(score), piece_type.Value(GGML_TOKEN_TYPES[kind])
    trainer = proto.trainer_spec
    trainer.model_type = pb.TrainerSpec.BPE
    trainer.vocab_size = len(tokens)
    trainer.byte_fallback = True
    trainer.unk_id, trainer.bos_id, trainer.eos_id, trainer.pad_id = unk_id, bos_id, eos_id, -1
    trainer.unk_piece, trainer.bos_piece, trainer.eos_piece = tokens[unk_id], tokens[bos_id], tokens[eos_id]
    normalizer = proto.normalizer_spec
    normalizer.name = "identity"
    normalizer.add_dummy_prefix = True
    normalizer.remove_extra_whitespaces = False
    normalizer.escape_whitespaces = True
    normalizer.precompiled_charsmap = b""
    return proto.SerializeToString()


def sentencepiece_model_from_gguf(path: str | Path) -> bytes:
    """The ``tokenizer.model`` bytes for the llama (SentencePiece) vocabulary stored in the GGUF at *path*."""
    vocab = read_gguf_vocab(path)
    if vocab["model"] != "llama":
        raise GGUFVocabError(f"{path} has a {vocab['model']!r} tokenizer; only 'llama' (SentencePiece) "
                             "vocabularies can be rebuilt as a tokenizer.model")
    return sentencepiece_model_from_vocab(vocab["tokens"], vocab["scores"], vocab["types"], bos_id=vocab["bos_id"],
                                          eos_id=vocab["eos_id"], unk_id=vocab["unk_id"])


def _scalar(field):
    value = field.parts[field.data[0]]
    if field.types and field.types[0].name == "STRING":
        return bytes(value).decode("utf-8")
    return value[0]

"""Tokenizer training: the Llama-2 layout, the same ids in Atelier's tokenizer and transformers', determinism
per seed, reuse of a model's tokenizer, and clear errors."""
from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from training_corpus import prose, write_corpus

from modules.llm.tokenizer import Tokenizer
from modules.training.llm.tokenizer_train import (
    TokenizerTrainingError,
    copy_tokenizer,
    tokenizer_fingerprint,
    train_tokenizer,
)

SAMPLES = ["Hello world", "The quick brown fox jumps over the lazy dog.",
           "def add(a, b):\n    return a + b\n", "Numbers 12345 and émoji 🎨 and 中文", "line one\n\nline three"]


@pytest.fixture(scope="module")
def tokenizer_dir(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tok-corpus")
    paths = write_corpus(root)
    files = sorted(paths["text"].rglob("*.txt")) + sorted(paths["code"].glob("*.py"))
    return train_tokenizer(files, 400, root / "tokenizer", seed=0)


def test_llama2_layout_and_byte_fallback(tokenizer_dir):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tokenizer_dir / "tokenizer.model"))
    assert sp.GetPieceSize() == 400
    assert [sp.IdToPiece(i) for i in range(3)] == ["<unk>", "<s>", "</s>"]
    assert [sp.IdToPiece(i) for i in (3, 13, 258)] == ["<0x00>", "<0x0A>", "<0xFF>"]
    assert sp.pad_id() == -1
    tok = Tokenizer.from_dir(tokenizer_dir)
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    for text in SAMPLES:
        ids = tok.encode(text)
        assert ids[0] == 1 and 0 not in ids, text        # byte fallback: never <unk>, even for emoji
        assert tok.decode(ids) == text
    config = json.loads((tokenizer_dir / "tokenizer_config.json").read_text())
    assert config["legacy"] is False and config["tokenizer_class"] == "LlamaTokenizer"
    assert json.loads((tokenizer_dir / "special_tokens_map.json").read_text())["eos_token"] == "</s>"


def test_transformers_reads_the_same_ids(tokenizer_dir):
    import transformers
    hf = transformers.LlamaTokenizer.from_pretrained(str(tokenizer_dir))
    tok = Tokenizer.from_dir(tokenizer_dir)
    assert (hf.unk_token_id, hf.bos_token_id, hf.eos_token_id) == (0, 1, 2)
    for text in SAMPLES:
        assert hf(text)["input_ids"] == tok.encode(text), text


def test_deterministic_for_a_seed(tmp_path):
    rng = random.Random(1)
    texts = [prose(rng, 3) for _ in range(300)]     # 300 lines; sampling 100 of them uses the seed
    a = train_tokenizer(texts, 400, tmp_path / "a", seed=0, max_sentences=100)
    b = train_tokenizer(texts, 400, tmp_path / "b", seed=0, max_sentences=100)
    c = train_tokenizer(texts, 400, tmp_path / "c", seed=1, max_sentences=100)
    model = lambda folder: (folder / "tokenizer.model").read_bytes()
    assert model(a) == model(b)
    assert model(a) != model(c)
    assert tokenizer_fingerprint(a) == tokenizer_fingerprint(b) != tokenizer_fingerprint(c)


def test_lines_longer_than_sentencepiece_takes_are_split_not_dropped(tmp_path):
    """SentencePiece silently skips input lines over max_sentence_length; a minified file is one such line."""
    rng = random.Random(2)
    one_line = " ".join(prose(rng, 400).split())      # ~20 KB on a single line
    assert len(one_line.encode()) > 4 * 4096
    folder = train_tokenizer([one_line], 400, tmp_path / "tok")
    tok = Tokenizer.from_dir(folder)
    assert len(tok.encode("the quick brown fox")) < len("the quick brown fox")   # merges were learnt


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(TokenizerTrainingError, match="at least 260"):
        train_tokenizer(["some text"], 100, tmp_path / "t")
    with pytest.raises(TokenizerTrainingError, match="every document was empty"):
        train_tokenizer(["", "   \n"], 300, tmp_path / "t")
    with pytest.raises(TokenizerTrainingError, match="Lower the vocabulary size"):
        train_tokenizer(["a tiny corpus"], 5000, tmp_path / "t")
    with pytest.raises(TokenizerTrainingError, match="missing.txt does not exist"):
        train_tokenizer([tmp_path / "missing.txt"], 300, tmp_path / "t")
    assert not (tmp_path / "t" / "tokenizer.model").exists()


def test_reuse_an_existing_models_tokenizer(fixture_data_dir, tmp_path):
    model = fixture_data_dir / "models" / "LLM" / "tiny-llama-gqa"
    copied = copy_tokenizer(model, tmp_path / "tok")
    assert tokenizer_fingerprint(copied) == tokenizer_fingerprint(model)
    assert Tokenizer.from_dir(copied).encode(SAMPLES[1]) == Tokenizer.from_dir(model).encode(SAMPLES[1])
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerTrainingError, match="has no tokenizer.model or tokenizer.json"):
        copy_tokenizer(tmp_path / "empty", tmp_path / "tok2")
    with pytest.raises(TokenizerTrainingError, match="does not exist"):
        copy_tokenizer(tmp_path / "nowhere", tmp_path / "tok3")

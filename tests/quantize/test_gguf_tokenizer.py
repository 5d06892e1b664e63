"""GGUF tokenizer fields: byte-level BPE tokenizers llama.cpp tokenizes exactly as `tokenizers` does, copies
from existing GGUF files (the real SmolLM2 one), and clear errors for tokenizers GGUF cannot carry."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from modules.fixtures.llm import _CORPUS, FIXTURE_MODELS, write_model
from modules.llm.config import LlamaConfig
from modules.quantize.bpe_pre import LLAMA3_REGEX, QWEN2_REGEX
from modules.quantize.errors import GGUFExportError
from modules.quantize.gguf_export import export_model, write_gguf
from modules.quantize.gguf_names import tensor_plan
from modules.quantize.tokenizer_to_gguf import CONTROL, NORMAL, UNUSED, GGUFTokenizer

PROBES = ["Hello world", "I've been told he's there, 'RE you sure?", "3 33 333 3333 33333", "3.14159 and 2,500",
          "  two leading spaces", "tabs\tand\nnew\n\nlines", "Ünïcödé café naïve", "emoji 🦙🚀 done",
          "中文 测试 日本語", "------======= !!!??? ```code```", "def add(a, b):\n    return a + b"]


def train_bpe(kind: str):
    """A small byte-level BPE tokenizer with the pre-tokenizer of *kind* (a llama.cpp pre name)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=kind in ("gpt-2", "smollm"))
    if kind == "gpt-2":
        tok.pre_tokenizer = byte_level
    elif kind == "smollm":
        tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), byte_level])
    else:
        regex = LLAMA3_REGEX if kind == "llama-bpe" else QWEN2_REGEX
        split = pre_tokenizers.Split(Regex(regex), behavior="isolated")
        tok.pre_tokenizer = pre_tokenizers.Sequence([split, byte_level])
        if kind == "qwen2":
            tok.normalizer = normalizers.NFC()
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(_CORPUS.splitlines() * 2, trainer)
    return tok


def bpe_model_folder(root: Path, kind: str) -> tuple[Path, object]:
    """The fixture Llama with its SentencePiece tokenizer replaced by a byte-level BPE tokenizer.json."""
    folder = write_model(root / kind, FIXTURE_MODELS["tiny-llama-gqa"])
    (folder / "tokenizer.model").unlink()
    tok = train_bpe(kind)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "add_bos_token": False,
        "chat_template": "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
                         "{% endfor %}"}))
    return folder, tok


@pytest.mark.parametrize("kind", ["gpt-2", "smollm", "llama-bpe", "qwen2"])
def test_byte_level_bpe_tokenizes_in_llama_cpp_as_in_tokenizers(kind, tmp_path):
    pytest.importorskip("llama_cpp")
    from gguf import GGUFReader
    from llama_cpp_runner import LlamaCppModel

    folder, tok = bpe_model_folder(tmp_path, kind)
    out = export_model(folder, tmp_path / "bpe.gguf", "F32")
    fields = GGUFReader(str(out)).fields
    assert fields["tokenizer.ggml.model"].contents() == "gpt2"
    assert fields["tokenizer.ggml.pre"].contents() == kind
    assert "tokenizer.ggml.scores" not in fields                 # llama.cpp's converter writes none for BPE
    types = fields["tokenizer.ggml.token_type"].contents()
    assert types[:3] == [CONTROL] * 3 and types[3] == NORMAL and types[420:] == [UNUSED] * 92   # padded to 512
    assert fields["tokenizer.ggml.bos_token_id"].contents() == 0
    assert fields["tokenizer.ggml.eos_token_id"].contents() == 2
    assert fields["tokenizer.ggml.add_bos_token"].contents() is False
    with LlamaCppModel(out) as model:
        for text in PROBES:
            assert model.tokenize(text) == tok.encode(text, add_special_tokens=False).ids, text
        chat = "<|im_start|>user\nHello there<|im_end|>\n<|im_start|>assistant\n"
        assert model.tokenize(chat, special=True) == tok.encode(chat, add_special_tokens=False).ids


def test_tokenizers_gguf_cannot_carry_are_refused_with_the_reason(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    folder = write_model(tmp_path / "m", FIXTURE_MODELS["tiny-llama-gqa"])
    (folder / "tokenizer.model").unlink()
    for model, trainer, pattern in (
            (models.WordPiece(unk_token="[UNK]"), trainers.WordPieceTrainer(vocab_size=300, special_tokens=["[UNK]"]),
             "is a WordPiece tokenizer.*SentencePiece.*byte-level BPE"),
            (models.Unigram(), trainers.UnigramTrainer(vocab_size=300, special_tokens=["<unk>"], unk_token="<unk>"),
             "is a Unigram tokenizer"),
            (models.BPE(), trainers.BpeTrainer(vocab_size=300),
             "(?s)no pre-tokenizer known.*Whitespace.*Supported: gpt-2")):
        tok = Tokenizer(model)
        tok.pre_tokenizer = pre_tokenizers.Whitespace()
        if isinstance(model, models.BPE):
            from tokenizers import decoders
            tok.decoder = decoders.ByteLevel()
        tok.train_from_iterator(_CORPUS.splitlines(), trainer)
        tok.save(str(folder / "tokenizer.json"))
        with pytest.raises(GGUFExportError, match=pattern):
            export_model(folder, tmp_path / "x.gguf", "F16")
    data = json.loads((folder / "tokenizer.json").read_text())
    data["model"]["byte_fallback"] = True
    (folder / "tokenizer.json").write_text(json.dumps(data))
    with pytest.raises(GGUFExportError, match="SentencePiece-style BPE tokenizer.*put tokenizer.model next to it"):
        export_model(folder, tmp_path / "x.gguf", "F16")
    (folder / "tokenizer.json").unlink()
    with pytest.raises(GGUFExportError, match="No tokenizer in"):
        export_model(folder, tmp_path / "x.gguf", "F16")
    assert not (tmp_path / "x.gguf").exists()


def test_a_unigram_sentencepiece_model_is_refused(tmp_path):
    import io

    import sentencepiece as spm

    folder = write_model(tmp_path / "m", FIXTURE_MODELS["tiny-llama-gqa"])
    buffer = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(_CORPUS.splitlines() * 4), model_writer=buffer,
                                   vocab_size=512, model_type="unigram", hard_vocab_limit=False, minloglevel=2)
    (folder / "tokenizer.model").write_bytes(buffer.getvalue())
    with pytest.raises(GGUFExportError, match="SentencePiece UNIGRAM model.*BPE models only"):
        GGUFTokenizer.from_hf_folder(folder, vocab_size=512)


def test_special_ids_added_tokens_and_padding_from_the_folder(tmp_path):
    folder = write_model(tmp_path / "m", FIXTURE_MODELS["tiny-llama-gqa"])
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["512"] = {"content": "<|tool|>", "special": False}
    config["added_tokens_decoder"]["514"] = {"content": "<extra>", "special": True}
    config.pop("pad_token")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    t = GGUFTokenizer.from_hf_folder(folder, vocab_size=520)
    assert t.tokens[512:516] == ["<|tool|>", "[PAD513]", "<extra>", "[PAD515]"]
    assert t.token_types[512:516] == [CONTROL, UNUSED, CONTROL, UNUSED]   # <|...|> looks special, as llama.cpp says
    assert t.scores[512] == -1000.0 and t.scores[513] == -10000.0 and len(t.tokens) == 520
    assert (t.bos_id, t.eos_id, t.unk_id, t.pad_id) == (1, 2, 0, 2)       # pad from generation_config.json
    with pytest.raises(GGUFExportError, match="has 515 tokens but config.json's vocab_size is 512"):
        GGUFTokenizer.from_hf_folder(folder, vocab_size=512)
    (folder / "chat_template.jinja").write_text("{{ messages }}")
    config.pop("chat_template")
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert GGUFTokenizer.from_hf_folder(folder, vocab_size=520).chat_template == "{{ messages }}"


def test_from_gguf_round_trips_an_export(tmp_path):
    folder = write_model(tmp_path / "m", FIXTURE_MODELS["tiny-llama-gqa"])
    original = GGUFTokenizer.from_hf_folder(folder, vocab_size=512)
    path = export_model(folder, tmp_path / "x.gguf", "F16")
    assert GGUFTokenizer.from_gguf(path) == original
    with pytest.raises(GGUFExportError, match="not a readable GGUF"):
        GGUFTokenizer.from_gguf(folder / "config.json")


# ------------------------------------------------------------------------------ the real SmolLM2 file
@pytest.fixture(scope="module")
def smollm2() -> Path:
    from smollm2_fetch import smollm2_gguf
    return smollm2_gguf()


@pytest.fixture(scope="module")
def smollm2_tokenizer(smollm2) -> GGUFTokenizer:
    return GGUFTokenizer.from_gguf(smollm2)


def test_smollm2_tokenizer_is_copied_field_for_field(smollm2, smollm2_tokenizer, tmp_path):
    pytest.importorskip("llama_cpp")
    from llama_cpp_runner import LlamaCppModel

    tokenizer = smollm2_tokenizer
    assert (tokenizer.model, tokenizer.pre, tokenizer.vocab_size) == ("gpt2", "smollm", 49152)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True)
    tensors = ((e.hf_name, torch.randn(e.shape) * 0.02) for e in tensor_plan(config))
    copy = write_gguf(config, tensors, tokenizer, tmp_path / "copy.gguf", "F16", name="copy")
    assert GGUFTokenizer.from_gguf(copy) == tokenizer          # every tokenizer.* field, extras included
    assert set(tokenizer.extra) == {"tokenizer.ggml.add_space_prefix"}
    assert tokenizer.chat_template.startswith("{% for message in messages %}") and len(tokenizer.merges) == 48900
    ids = (tokenizer.bos_id, tokenizer.eos_id, tokenizer.unk_id, tokenizer.pad_id)
    assert ids == (1, 2, 0, 2) and tokenizer.add_bos is False
    with LlamaCppModel(smollm2) as a, LlamaCppModel(copy) as b:
        for text in PROBES:
            assert a.tokenize(text) == b.tokenize(text), text


def test_smollm2_style_tokenizer_json_gets_llama_cpp_s_fields(smollm2, smollm2_tokenizer, tmp_path):
    """A tokenizer.json with SmolLM2's vocabulary, merges and Digits+ByteLevel pre-tokenizer comes out as
    llama.cpp's converter wrote the real file: pre "smollm", the same tokens, types and merges; and
    `tokenizers` with it tokenizes as llama.cpp does with the real file."""
    pytest.importorskip("llama_cpp")
    from tokenizers import Tokenizer
    from llama_cpp_runner import LlamaCppModel

    real = smollm2_tokenizer
    vocab = {t: i for i, (t, kind) in enumerate(zip(real.tokens, real.token_types)) if kind == NORMAL}
    added = [{"id": i, "content": t, "special": True, "single_word": False, "lstrip": False, "rstrip": False,
              "normalized": False} for i, (t, kind) in enumerate(zip(real.tokens, real.token_types)) if kind == CONTROL]
    data = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
            "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
                {"type": "Digits", "individual_digits": True},
                {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}]},
            "post_processor": None, "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                                                "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                      "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                      "vocab": vocab, "merges": [m.split(" ") for m in real.merges]}}
    folder = tmp_path / "smol"
    folder.mkdir()
    (folder / "tokenizer.json").write_text(json.dumps(data), encoding="utf-8")
    mine = GGUFTokenizer.from_hf_folder(folder, vocab_size=49152)
    assert (mine.model, mine.pre) == ("gpt2", "smollm")
    assert mine.tokens == real.tokens and mine.token_types == real.token_types and mine.merges == real.merges
    hf = Tokenizer.from_file(str(folder / "tokenizer.json"))
    with LlamaCppModel(smollm2) as model:
        for text in PROBES:
            assert hf.encode(text, add_special_tokens=False).ids == model.tokenize(text), text

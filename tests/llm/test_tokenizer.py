"""The Llama-2 SentencePiece tokenizer against transformers' AutoTokenizer on the fixture tokenizer, and
against llama.cpp's 46 reference tokenizations of the real Llama-2 vocabulary (fetched from PyPI once)."""
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

import pytest

from modules.fixtures.llm import FIXTURE_MODELS, write_model
from modules.llm.tokenizer import Tokenizer, TokenizerError

transformers = pytest.importorskip("transformers")

TEXTS = [
    "Hello world", " leading space", "   three leading spaces", "trailing spaces   ",
    "runs  of   spaces\n\n\nand newlines\n  indented\n\ttab\r\ncrlf",
    "Digits 1234567890, 3.14159 and 2024-11-27", "Unicode: café naïve Größe 東京 Привет ẞ ǅ 𝔘",
    "Emoji 😀🚀👍🏽 and a family 👨‍👩‍👧", "</s> special <s> in text</s>\n<|user|>\nHi</s>\n<|assistant|>\n",
    "<s>starts with bos", "a</s>b", "a</s> b", "", " ", "\n", "zzqxj",
    "def add(a, b):\n    return a + b\n",
]
POOL = list("abcdefghij klmnop  \n\t0123456789.,!?éüß東😀🚀") + ["</s>", "<s>", " the", "<unk>"]


def fuzz_texts(n=40, seed=0):
    rng = random.Random(seed)
    return ["".join(rng.choice(POOL) for _ in range(rng.randint(1, 30))) for _ in range(n)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("tok") / "tiny", FIXTURE_MODELS["tiny-llama-gqa"])


@pytest.fixture(scope="module")
def fast_folder(folder, tmp_path_factory):
    """The same tokenizer as tokenizer.json only (written by transformers), to test that backend."""
    out = tmp_path_factory.mktemp("tokjson")
    transformers.AutoTokenizer.from_pretrained(folder).save_pretrained(out)
    (out / "tokenizer.model").unlink(missing_ok=True)
    assert (out / "tokenizer.json").is_file()
    return out


def reference_ids(hf, path, text):
    """transformers' ids for *text*, except where transformers 5 departs from Llama-2's SentencePiece.

    For text that starts with whitespace, transformers 5 (Metaspace, prepend_scheme "first") drops the
    dummy-prefix space that SentencePiece, Llama-2's tokenizer.json, llama.cpp and transformers 4 add
    (" Hello" -> [15043] instead of [29871, 15043]; see test_llama2_reference_tokenizations). There the
    reference for the text before the first special token is SentencePiece itself; with a legacy
    config, which adds the dummy prefix after every special token, it is SentencePiece for every piece
    of text between special tokens (what transformers 4's legacy LlamaTokenizer does).
    """
    import sentencepiece as spm
    added = hf.get_added_vocab()
    parts = [p for p in re.split("(" + "|".join(map(re.escape, sorted(added, key=len, reverse=True))) + ")", text) if p]
    legacy = json.loads((path / "tokenizer_config.json").read_text()).get("legacy", True) is not False
    departs = parts and parts[0][:1].isspace() or legacy and any(p[:1].isspace() for p in parts)
    if not departs or not (path / "tokenizer.model").is_file() or (path / "tokenizer.json").is_file():
        return hf.encode(text, add_special_tokens=False)
    sp = spm.SentencePieceProcessor(model_file=str(path / "tokenizer.model"))
    if legacy:
        return [i for p in parts for i in ([added[p]] if p in added else sp.EncodeAsIds(p))]
    head = parts[0]
    return sp.EncodeAsIds(head) + (hf.encode(text[len(head):], add_special_tokens=False) if text[len(head):] else [])


def assert_same_as_hf(path, texts):
    hf = transformers.AutoTokenizer.from_pretrained(path)
    ours = Tokenizer.from_dir(path)
    for text in texts:
        ref = reference_ids(hf, path, text)
        assert ours.encode(text, add_bos=False) == ref, text
        assert ours.encode(text, add_bos=True) == [hf.bos_token_id] + ref, text
        assert ours.decode(ref) == hf.decode(ref, skip_special_tokens=True), text
        assert ours.decode(ref, skip_special_tokens=False) == hf.decode(ref), text


def test_llama2_layout(folder):
    tok = Tokenizer.from_dir(folder)
    assert (tok.unk_id, tok.bos_id, tok.eos_id) == (0, 1, 2)
    assert (tok.token_to_id("<unk>"), tok.token_to_id("<s>"), tok.token_to_id("</s>")) == (0, 1, 2)
    assert tok.token_to_id("<0x0A>") == 3 + 0x0A and tok.vocab_size == 512
    assert tok.token_to_id("no-such-piece") is None
    ids = tok.encode("😀", add_bos=False)                      # byte fallback: 4 UTF-8 bytes, no <unk>
    assert ids[-4:] == [3 + b for b in "😀".encode()] and 0 not in ids


def test_sentencepiece_backend_matches_transformers(folder):
    assert_same_as_hf(Path(folder), TEXTS + fuzz_texts())


def test_tokenizer_json_backend_matches_transformers(fast_folder):
    assert_same_as_hf(Path(fast_folder), TEXTS + fuzz_texts(seed=1))


def test_legacy_tokenizer_config_matches_transformers(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "legacy")
    config_path = tmp_path / "legacy" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["legacy"] = True
    config_path.write_text(json.dumps(config))
    assert_same_as_hf(tmp_path / "legacy", TEXTS + fuzz_texts(seed=2))


@pytest.mark.parametrize("text", ["Hello world, how are you?", "  spaced   out  words ",
                                  "emoji 😀🚀 mixed 東京 and é", "line one\nline two\n\n  three"])
def test_stream_decoder_equals_full_decode(folder, text):
    tok = Tokenizer.from_dir(folder)
    ids = tok.encode(text, add_bos=False)
    stream = tok.stream_decoder()
    deltas = [stream.push(i) for i in ids]
    assert "".join(deltas) + stream.flush() == tok.decode(ids)
    assert not any("\ufffd" in d for d in deltas), deltas


def test_stream_decoder_holds_back_split_characters_and_keeps_spaces(folder):
    tok = Tokenizer.from_dir(folder)
    stream = tok.stream_decoder()
    out = [stream.push(i) for i in tok.encode("Hi", add_bos=False)]
    emoji = [3 + b for b in "😀".encode()]
    out += [stream.push(i) for i in emoji[:3]]
    assert out[-3:] == ["", "", ""]                             # nothing until the 4th byte arrives
    assert stream.push(emoji[3]) == "😀"
    world = tok.encode("world", add_bos=False)                 # "▁world": a piece with a leading space
    assert "".join(stream.push(i) for i in world) == " world"   # the leading space is not lost
    assert stream.flush() == ""
    dangling = tok.stream_decoder()
    assert dangling.push(emoji[0]) == "" and dangling.flush() == "\ufffd"


def test_missing_tokenizer_names_the_files(tmp_path):
    with pytest.raises(TokenizerError, match="tokenizer.model"):
        Tokenizer.from_dir(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"not a model")
    with pytest.raises(TokenizerError, match="SentencePiece"):
        Tokenizer.from_dir(tmp_path)


# ---------------------------------------------------------------- the real Llama-2 vocabulary (llama.cpp)
LLAMA_CPP_SDIST = "llama-cpp-python==0.3.36"
VOCAB_MEMBER = "vendor/llama.cpp/models/ggml-vocab-llama-spm.gguf"
OFFLINE_ENV = "ATELIER_TESTS_OFFLINE"


def llama_vocab_cache() -> Path:
    """Where the three vocabulary files from the sdist are kept between runs (never in the repository)."""
    root = Path(os.environ.get("ATELIER_CACHE_DIR") or Path.home() / ".cache" / "atelier")
    return root / LLAMA_CPP_SDIST.replace("==", "-")


def fetch_llama_vocab(cache: Path) -> Path:
    """``ggml-vocab-llama-spm.gguf`` (+ ``.inp``/``.out``) from the llama-cpp-python sdist on PyPI, once."""
    gguf_path = cache / Path(VOCAB_MEMBER).name
    wanted = [gguf_path, gguf_path.with_name(gguf_path.name + ".inp"), gguf_path.with_name(gguf_path.name + ".out")]
    if all(p.is_file() for p in wanted):
        return gguf_path
    how = (f"run: pip download {LLAMA_CPP_SDIST} --no-deps --no-binary :all: -d DIR, then extract "
           f"{VOCAB_MEMBER} and its .inp/.out files into {cache}/ (or set {OFFLINE_ENV}=1 to skip this test)")
    with tempfile.TemporaryDirectory() as tmp:
        out = subprocess.run([sys.executable, "-m", "pip", "download", LLAMA_CPP_SDIST, "--no-deps", "--no-binary",
                              ":all:", "--disable-pip-version-check", "-q", "-d", tmp],
                             capture_output=True, text=True, timeout=900)
        sdists = list(Path(tmp).glob("llama_cpp_python-*.tar.gz"))
        if out.returncode != 0 or not sdists:
            pytest.fail(f"could not download the {LLAMA_CPP_SDIST} sdist from PyPI "
                        f"({(out.stderr or out.stdout).strip()[-300:]}); {how}")
        cache.mkdir(parents=True, exist_ok=True)
        with tarfile.open(sdists[0]) as archive:
            top = archive.getnames()[0].split("/")[0]
            for target in wanted:
                member = archive.extractfile(f"{top}/{Path(VOCAB_MEMBER).parent}/{target.name}")
                partial = target.with_name(target.name + ".part")
                partial.write_bytes(member.read())
                partial.replace(target)
    return gguf_path


@pytest.fixture(scope="session")
def llama2_vocab(tmp_path_factory):
    """A model folder whose tokenizer.model is rebuilt from llama.cpp's Llama-2 GGUF vocabulary, and the
    46 reference tokenizations (text, ids) that llama.cpp ships with it."""
    if os.environ.get(OFFLINE_ENV) == "1":
        pytest.skip(f"{OFFLINE_ENV}=1: the Llama-2 vocabulary is not fetched from PyPI")
    from modules.llm.gguf_vocab import sentencepiece_model_from_gguf
    gguf_path = fetch_llama_vocab(llama_vocab_cache())
    folder = tmp_path_factory.mktemp("llama2-vocab")
    (folder / "tokenizer.model").write_bytes(sentencepiece_model_from_gguf(gguf_path))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "LlamaTokenizer", "bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>",
         "legacy": False}))
    texts = gguf_path.with_name(gguf_path.name + ".inp").read_text(encoding="utf-8").split("\n__ggml_vocab_test__\n")
    if texts and texts[-1] == "":
        texts.pop()
    ids = [[int(i) for i in line.split()]
           for line in gguf_path.with_name(gguf_path.name + ".out").read_text(encoding="utf-8").splitlines()]
    assert len(texts) == len(ids) == 46, (len(texts), len(ids))
    return folder, list(zip(texts, ids))


def test_gguf_vocab_rebuilds_the_llama2_sentencepiece_model(llama2_vocab):
    import sentencepiece as spm
    folder, _ = llama2_vocab
    sp = spm.SentencePieceProcessor(model_file=str(folder / "tokenizer.model"))
    assert sp.GetPieceSize() == 32000 and (sp.unk_id(), sp.bos_id(), sp.eos_id()) == (0, 1, 2)
    assert sp.IsControl(1) and sp.IsControl(2) and sp.IsUnknown(0) and sp.IsByte(3) and sp.IdToPiece(3) == "<0x00>"
    assert sp.EncodeAsIds("Hello world") == [15043, 3186]


def test_llama2_reference_tokenizations(llama2_vocab):
    """All 46 of llama.cpp's reference tokenizations of the real Llama-2 vocabulary, and their round trip."""
    folder, cases = llama2_vocab
    ours = Tokenizer.from_dir(folder)
    wrong = [(text, ours.encode(text, add_bos=False), ids) for text, ids in cases
             if ours.encode(text, add_bos=False) != ids]
    assert not wrong, f"{len(wrong)} of {len(cases)} differ, e.g. {wrong[:3]}"
    for text, ids in cases:
        assert ours.encode(text) == [1] + ids
        assert ours.decode(ids) == text, text

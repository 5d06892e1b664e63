"""The Llama-2 SentencePiece tokenizer against transformers' AutoTokenizer on the fixture tokenizer."""
import json
import random
import shutil

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


def assert_same_as_hf(path, texts):
    hf = transformers.AutoTokenizer.from_pretrained(path)
    ours = Tokenizer.from_dir(path)
    for text in texts:
        ref = hf.encode(text, add_special_tokens=False)
        assert ours.encode(text, add_bos=False) == ref, text
        assert ours.encode(text, add_bos=True) == hf.encode(text), text
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
    assert_same_as_hf(folder, TEXTS + fuzz_texts())


def test_tokenizer_json_backend_matches_transformers(fast_folder):
    assert_same_as_hf(fast_folder, TEXTS + fuzz_texts(seed=1))


def test_legacy_tokenizer_config_matches_transformers(folder, tmp_path):
    shutil.copytree(folder, tmp_path / "legacy")
    config_path = tmp_path / "legacy" / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["legacy"] = True
    config_path.write_text(json.dumps(config))
    assert_same_as_hf(tmp_path / "legacy", TEXTS)


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
    world = tok.encode(" world", add_bos=False)
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

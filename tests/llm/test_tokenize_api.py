"""vLLM's /tokenize, /detokenize and /tokenizer_info on the real server (with --api-auth)."""
import httpx
import pytest

from server_utils import start_server

MODEL = "tiny-llama-gqa"
AUTH = ("eve", "s3cret")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from modules.fixtures import llm as fixture
    data = tmp_path_factory.mktemp("tokenize")
    fixture.write(data)
    srv = start_server(data, "--api", "--nowebui", "--api-auth", ":".join(AUTH), auth=AUTH)
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.url, auth=AUTH, timeout=60) as client:
        yield client


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    from modules.fixtures import llm as fixture
    from modules.llm.tokenizer import Tokenizer
    return Tokenizer.from_dir(fixture.write(tmp_path_factory.mktemp("tok"))[0])


def test_tokenize_prompt_matches_the_tokenizer(http, tokenizer):
    text = "Hello! How are you today?"
    reply = http.post("/tokenize", json={"model": MODEL, "prompt": text, "return_token_strs": True}).json()
    assert reply["tokens"] == tokenizer.encode(text, add_bos=True) and reply["count"] == len(reply["tokens"])
    assert reply["max_model_len"] == 256
    assert reply["token_strs"] == [tokenizer.id_to_token(i) for i in reply["tokens"]]
    bare = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False}).json()  # model optional
    assert bare["tokens"] == reply["tokens"][1:] and bare["token_strs"] is None


def test_tokenize_messages_counts_what_chat_completions_feeds(http):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi there"}]
    counted = http.post("/tokenize", json={"model": MODEL, "messages": messages}).json()
    reply = http.post("/v1/chat/completions", json={"model": MODEL, "messages": messages, "max_tokens": 1}).json()
    assert counted["count"] == reply["usage"]["prompt_tokens"]
    without = http.post("/tokenize", json={"model": MODEL, "messages": messages,
                                           "add_generation_prompt": False}).json()
    assert without["count"] < counted["count"] and counted["tokens"][:without["count"]] == without["tokens"]


def test_detokenize_round_trip(http, tokenizer):
    ids = tokenizer.encode("The quick brown fox", add_bos=False)
    assert http.post("/detokenize", json={"model": MODEL, "tokens": ids}).json() == {"prompt": "The quick brown fox"}
    with_bos = http.post("/detokenize", json={"tokens": [tokenizer.bos_id] + ids}).json()["prompt"]
    assert with_bos.startswith("<s>")  # special tokens are written out, as vLLM does


def test_tokenizer_info(http):
    info = http.get("/tokenizer_info").json()
    assert info["eos_token"] == "</s>" and info["bos_token"] == "<s>" and info["model_max_length"] == 256
    assert "{% for message in messages %}" in info["chat_template"] and info["vocab_size"] == 512
    assert http.get("/tokenizer_info", params={"model": MODEL}).json() == info


@pytest.mark.parametrize("path,body,status,param", [
    ("/tokenize", {"model": MODEL}, 400, "prompt"),
    ("/tokenize", {"model": MODEL, "prompt": "x", "messages": [{"role": "user", "content": "y"}]}, 400, "prompt"),
    ("/tokenize", {"model": MODEL, "prompt": 5}, 400, "prompt"),
    ("/tokenize", {"model": MODEL, "messages": [{"role": "user", "content": "y"}], "add_special_tokens": True},
     400, "add_special_tokens"),
    ("/tokenize", {"model": "nope", "prompt": "x"}, 404, "model"),
    ("/detokenize", {"model": MODEL, "tokens": [1, 99999]}, 400, "tokens"),
    ("/detokenize", {"model": MODEL, "tokens": "abc"}, 400, "tokens"),
    ("/detokenize", {"model": MODEL}, 400, "tokens")])
def test_bad_input(http, path, body, status, param):
    response = http.post(path, json=body)
    assert response.status_code == status, response.text
    assert response.json()["error"]["param"] == param


def test_unknown_model_info_is_404(http):
    assert http.get("/tokenizer_info", params={"model": "nope"}).status_code == 404


def test_login_required(server):
    for method, path in (("POST", "/tokenize"), ("POST", "/detokenize"), ("GET", "/tokenizer_info")):
        response = httpx.request(method, server.url + path, json={"prompt": "x"}, timeout=30)
        assert response.status_code == 401, path

"""The OpenAI-compatible API on the real server (python launch.py --api), driven by the official client."""
import json
import time

import httpx
import openai
import pytest

from server_utils import start_server

MODEL = "tiny-llama-gqa"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from modules.fixtures import llm as fixture
    data = tmp_path_factory.mktemp("openai")
    fixture.write(data)
    fixture.write_model(data / "models" / "LLM" / "wide-llama",  # ~50 tokens/s on a CPU: time to hang up
                        dict(fixture.FIXTURE_MODELS[MODEL], hidden_size=512, intermediate_size=1408,
                             num_hidden_layers=8, num_attention_heads=8, max_position_embeddings=1024))
    broken = data / "models" / "LLM" / "broken-model"
    broken.mkdir()
    (broken / "config.json").write_text('{"model_type": "llama", "hidden_size": 64}', encoding="utf-8")
    srv = start_server(data, "--api", "--nowebui")
    srv.model_dir = data / "models" / "LLM" / MODEL
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def chat(client, **kw):
    args = dict(model=MODEL, messages=[{"role": "user", "content": "Hello! How are you today?"}],
                temperature=0, max_tokens=12)
    args.update(kw)
    return client.chat.completions.create(**args)


def test_models_list(client):
    models = client.models.list()
    assert [m.id for m in models.data] == [MODEL, "wide-llama"]
    assert client.models.retrieve(MODEL).id == MODEL
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("nope")


def test_chat_completion_with_usage(client):
    reply = chat(client, extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    assert reply.object == "chat.completion" and reply.model == MODEL
    assert choice.message.role == "assistant" and choice.message.content
    assert choice.finish_reason in ("stop", "length")
    usage = reply.usage
    assert usage.prompt_tokens > 5 and 1 <= usage.completion_tokens <= 12
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


def test_chat_streaming_equals_non_streaming(client):
    whole = chat(client).choices[0].message.content
    stream = chat(client, stream=True, stream_options={"include_usage": True})
    pieces, reasons, usage = [], [], None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            reasons.append(choice.finish_reason)
    assert "".join(pieces) == whole
    assert reasons[-1] in ("stop", "length") and all(r is None for r in reasons[:-1])
    assert usage is not None and usage.completion_tokens >= 1


def test_raw_sse_ends_with_done(server):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=60) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"
    first = json.loads(lines[0][len("data: "):])
    assert first["object"] == "chat.completion.chunk" and first["choices"][0]["delta"]["role"] == "assistant"


def test_completions_and_extra_sampling_fields(server, client):
    from modules.llm.tokenizer import Tokenizer
    prompt_tokens = len(Tokenizer.from_dir(server.model_dir).encode("The quick brown fox", add_bos=True))
    args = dict(model=MODEL, prompt="The quick brown fox", max_tokens=10, temperature=0.9,
                extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.2}, seed=42)
    a = client.completions.create(**args)
    b = client.completions.create(**args)
    assert a.object == "text_completion" and a.choices[0].text == b.choices[0].text
    assert a.usage.completion_tokens <= 10 and a.usage.prompt_tokens == prompt_tokens
    streamed = "".join(c.choices[0].text for c in client.completions.create(**args, stream=True) if c.choices)
    assert streamed == a.choices[0].text


def test_stop_strings(client):
    whole = chat(client, max_tokens=30).choices[0].message.content
    stop = whole[5:8]
    cut = chat(client, max_tokens=30, stop=[stop])
    assert cut.choices[0].message.content == whole[:whole.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("field,value,param", [
    ("temperature", -1, "temperature"), ("top_p", 1.5, "top_p"), ("top_p", 0, "top_p"),
    ("max_tokens", 0, "max_tokens"), ("n", 17, "n"), ("n", 0, "n"), ("top_logprobs", 21, "top_logprobs"),
    ("logit_bias", {"5": 101}, "logit_bias"), ("logit_bias", {"x": 1}, "logit_bias")])
def test_invalid_values_are_400_in_openai_shape(server, client, field, value, param):
    extra = {"logprobs": True} if field == "top_logprobs" else {}
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, **{field: value}, **extra)
    assert err.value.status_code == 400
    body = err.value.body
    assert body["param"] == param and body["type"] == "invalid_request_error" and field in body["message"]


def test_malformed_bodies_are_400_not_422(server):
    url = server.url + "/v1/chat/completions"
    for content, kwargs in [("not json", {"content": b"{nope"}), ("no messages", {"json": {"model": MODEL}}),
                            ("wrong type", {"json": {"model": MODEL, "messages": "hi"}}),
                            ("bad role", {"json": {"model": MODEL, "messages": [{"role": "x", "content": "y"}]}})]:
        response = httpx.post(url, timeout=30, headers={"content-type": "application/json"}, **kwargs)
        assert response.status_code == 400, content
        error = response.json()["error"]
        assert set(error) == {"message", "type", "param", "code"} and error["message"], content


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError) as err:
        chat(client, model="no-such-model")
    assert err.value.body["code"] == "model_not_found" and "no-such-model" in err.value.body["message"]


def test_broken_model_folder_is_400_with_the_reason(client):
    with pytest.raises(openai.BadRequestError) as err:
        chat(client, model="broken-model")
    assert err.value.body["param"] == "model" and "vocab_size" in err.value.body["message"]


def test_prompt_longer_than_context_is_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="word " * 400, max_tokens=5)
    assert err.value.body["code"] == "context_length_exceeded"
    assert chat(client).choices[0].message.content  # the server keeps serving


def test_client_disconnect_stops_generation(server, client):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 240, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                break  # one token arrived; hang up
    deadline = time.monotonic() + 20
    while "finish: interrupted" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    line = next(x for x in server.log().splitlines() if "finish: interrupted" in x)
    assert "completion:" in line
    generated = int(line.split(" new tokens")[0].rsplit(" ", 1)[1])
    assert generated < 200  # 240 were asked for
    assert chat(client, max_tokens=3).choices[0].message.content is not None  # the queue moved on


def test_content_parts_developer_role_and_single_stop_string(server):
    body = {"model": MODEL, "temperature": 0, "max_completion_tokens": 6, "stop": "\u2603",
            "messages": [{"role": "developer", "content": "Be brief."},
                         {"role": "user", "content": [{"type": "text", "text": "Hello! "},
                                                      {"type": "text", "text": "How are you today?"}]}]}
    reply = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=60).json()
    plain = httpx.post(server.url + "/v1/chat/completions", timeout=60, json={
        **body, "messages": [{"role": "system", "content": "Be brief."},
                             {"role": "user", "content": "Hello! How are you today?"}]}).json()
    assert reply["choices"][0]["message"]["content"] == plain["choices"][0]["message"]["content"]
    # the second request of the same prompt is served from the prefix cache: only cached_tokens may differ
    counts = ("prompt_tokens", "completion_tokens", "total_tokens")
    assert [reply["usage"][k] for k in counts] == [plain["usage"][k] for k in counts]
    assert reply["usage"]["completion_tokens"] <= 6
    image = {**body, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}
    response = httpx.post(server.url + "/v1/chat/completions", json=image, timeout=60)
    assert response.status_code == 400 and "text content" in response.json()["error"]["message"]


def test_client_disconnect_stops_a_non_streamed_request(server, client):
    chat(client, model="wide-llama", max_tokens=2)  # loaded before the clock starts
    before = server.log().count("finish: interrupted")
    body = {"model": "wide-llama", "messages": [{"role": "user", "content": "Tell me a long story"}],
            "max_tokens": 900, "ignore_eos": True}
    with pytest.raises(httpx.TimeoutException):
        httpx.post(server.url + "/v1/chat/completions", json=body, timeout=1.0)
    deadline = time.monotonic() + 20
    while server.log().count("finish: interrupted") == before and time.monotonic() < deadline:
        time.sleep(0.1)
    lines = [x for x in server.log().splitlines() if "finish: interrupted" in x]
    assert len(lines) == before + 1, "the abandoned request was not interrupted"
    assert lines[-1].split(": ")[1].startswith("chat")
    assert int(lines[-1].split(" new tokens")[0].rsplit(" ", 1)[1]) < 900

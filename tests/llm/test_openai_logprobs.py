"""logprobs, echo, token-list and batched prompts, n, logit_bias and usage on the real server with the
official openai client (the fields lm-eval and chat front-ends read)."""
import json

import httpx
import openai
import pytest

from server_utils import start_server

MODEL = "tiny-llama-gqa"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from modules.fixtures import llm as fixture
    data = tmp_path_factory.mktemp("openai-logprobs")
    fixture.write(data)
    srv = start_server(data, "--api", "--nowebui")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def msgs(text="Hello! How are you today?"):
    return [{"role": "user", "content": text}]


def test_chat_logprobs_and_refusal(client):
    reply = client.chat.completions.create(model=MODEL, messages=msgs(), temperature=0, max_tokens=6,
                                           logprobs=True, top_logprobs=3, extra_body={"ignore_eos": True})
    choice = reply.choices[0]
    assert choice.message.refusal is None
    content = choice.logprobs.content
    assert len(content) == reply.usage.completion_tokens == 6
    assert "".join(c.token for c in content).strip() == choice.message.content.strip()
    for entry in content:
        assert len(entry.top_logprobs) == 3 and entry.logprob <= 0
        assert entry.top_logprobs[0].token == entry.token and entry.top_logprobs[0].logprob == entry.logprob
        assert bytes(entry.bytes).decode("utf-8", errors="replace") == entry.token
    # an integer count (other tests in this module may already have cached this prompt's blocks)
    cached = reply.usage.prompt_tokens_details.cached_tokens
    assert isinstance(cached, int) and 0 <= cached < reply.usage.prompt_tokens


def test_chat_streamed_logprobs_equal_non_streamed(client):
    args = dict(model=MODEL, messages=msgs(), temperature=0, max_tokens=8, logprobs=True, top_logprobs=2)
    whole = client.chat.completions.create(**args).choices[0].logprobs.content
    streamed = []
    for chunk in client.chat.completions.create(**args, stream=True):
        for choice in chunk.choices:
            if choice.logprobs is not None:
                streamed.extend(choice.logprobs.content)
    assert [(e.token, e.logprob) for e in streamed] == [(e.token, e.logprob) for e in whole]


def test_completion_logprobs_echo_on_token_lists(client):
    ids = [1, 30, 40, 50, 60]
    reply = client.completions.create(model=MODEL, prompt=[ids], max_tokens=1, logprobs=1, echo=True,
                                      temperature=0)  # lm-eval's loglikelihood request
    lp = reply.choices[0].logprobs
    assert len(lp.tokens) == len(ids) + 1 and lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(isinstance(v, float) and v <= 0 for v in lp.token_logprobs[1:])
    assert lp.token_logprobs[-1] == max(lp.top_logprobs[-1].values())  # greedy: the same float
    assert lp.text_offset == sorted(lp.text_offset) and lp.text_offset[0] == 0
    scored = client.completions.create(model=MODEL, prompt=ids, max_tokens=0, logprobs=0, echo=True)
    assert scored.choices[0].logprobs.token_logprobs == lp.token_logprobs[:-1]  # score only
    assert scored.usage.completion_tokens == 0


def test_batched_prompts_one_choice_each_in_order(client):
    texts = ["The quick brown fox", "Once upon a time"]
    batch = client.completions.create(model=MODEL, prompt=texts, max_tokens=4, temperature=0)
    singles = [client.completions.create(model=MODEL, prompt=t, max_tokens=4, temperature=0) for t in texts]
    assert [c.index for c in batch.choices] == [0, 1]
    assert [c.text for c in batch.choices] == [s.choices[0].text for s in singles]
    assert batch.usage.prompt_tokens == sum(s.usage.prompt_tokens for s in singles)
    ids = client.completions.create(model=MODEL, prompt=[[1, 300, 400], [1, 500]], max_tokens=2, echo=True,
                                    temperature=0)
    assert len(ids.choices) == 2


def test_n_samples_differ_are_seeded_and_usage_sums(client):
    args = dict(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=1.0, n=3, seed=7,
                extra_body={"ignore_eos": True})
    reply = client.completions.create(**args)
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.text for c in reply.choices}) > 1
    assert [c.text for c in client.completions.create(**args).choices] == [c.text for c in reply.choices]
    one = client.completions.create(**{**args, "n": 1})
    assert reply.usage.prompt_tokens == one.usage.prompt_tokens and reply.usage.completion_tokens == 24
    chat = client.chat.completions.create(model=MODEL, messages=msgs(), max_tokens=4, n=2, seed=3)
    assert [c.index for c in chat.choices] == [0, 1]
    streamed = {}
    for chunk in client.completions.create(**args, stream=True):
        for c in chunk.choices:
            streamed[c.index] = streamed.get(c.index, "") + c.text
    assert [streamed[i] for i in range(3)] == [c.text for c in reply.choices]


def test_logit_bias_forces_a_token(client):
    reply = client.completions.create(model=MODEL, prompt="Hello", max_tokens=3, temperature=0.8, seed=1,
                                      logit_bias={"77": 100}, logprobs=0, extra_body={"ignore_eos": True})
    assert reply.choices[0].logprobs.tokens == [reply.choices[0].logprobs.tokens[0]] * 3


def test_streamed_echo_with_logprobs(server):
    body = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 3, "temperature": 0, "echo": True,
            "logprobs": 1, "stream": True, "stream_options": {"include_usage": True}}
    chunks = []
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        for line in response.iter_lines():
            if line.startswith("data: ") and line != "data: [DONE]":
                chunks.append(json.loads(line[6:]))
    first = chunks[0]["choices"][0]
    assert first["text"] == "The quick brown fox" and first["logprobs"]["token_logprobs"][0] is None
    assert chunks[-1]["usage"]["completion_tokens"] == 3 and chunks[-1]["usage"]["prompt_tokens"] >= 4
    whole = httpx.post(server.url + "/v1/completions", json={**body, "stream": False}, timeout=60).json()
    streamed = [v for c in chunks for ch in c["choices"] if ch["logprobs"] for v in ch["logprobs"]["token_logprobs"]]
    assert streamed == whole["choices"][0]["logprobs"]["token_logprobs"]


def test_missing_model_and_limits_are_400(client):
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="", prompt="hi", max_tokens=1)
    assert err.value.body["param"] == "model"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt="hi", max_tokens=1, logprobs=50)
    assert err.value.body["param"] == "logprobs"
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=[[1, 2], "x"], max_tokens=1)
    assert err.value.body["param"].startswith("prompt")

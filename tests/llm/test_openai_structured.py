"""response_format (JSON mode / JSON Schema), OpenAI's context-length 400s, include_usage with n > 1 and the
400s for what the server does not do: on the real server, driven by the official client."""
import json

import httpx
import jsonschema
import openai
import pytest

from server_utils import start_server

MODEL = "tiny-llama-gqa"
CONTEXT = 256  # the fixture's max_position_embeddings
SCHEMA = {"type": "object", "additionalProperties": False, "required": ["city", "rain", "days"],
          "properties": {"city": {"type": "string", "maxLength": 8}, "rain": {"type": "boolean"},
                         "days": {"type": "integer", "minimum": 1, "maximum": 14}}}
FORMAT = {"type": "json_schema", "json_schema": {"name": "forecast", "schema": SCHEMA, "strict": True}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from modules.fixtures import llm as fixture
    data = tmp_path_factory.mktemp("structured")
    fixture.write(data)
    srv = start_server(data, "--api", "--nowebui")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


MESSAGES = [{"role": "user", "content": "The weather in Paris, as JSON please."}]


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_chat_json_schema_validates(client, seed):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=seed, temperature=1.0,
                                           max_tokens=150, response_format=FORMAT)
    choice = reply.choices[0]
    assert choice.finish_reason == "stop", choice.message.content
    jsonschema.validate(json.loads(choice.message.content), SCHEMA)


def test_chat_json_schema_streamed_with_n(client):
    stream = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=5, temperature=1.0, n=2,
                                            max_tokens=150, response_format=FORMAT, stream=True,
                                            stream_options={"include_usage": True})
    texts, reasons, usage, last_has_choices = {0: "", 1: ""}, {}, None, True
    for chunk in stream:
        last_has_choices = bool(chunk.choices)
        if chunk.usage is not None:
            usage = chunk.usage
            assert chunk.choices == []
        for choice in chunk.choices:
            texts[choice.index] += choice.delta.content or ""
            if choice.finish_reason:
                reasons[choice.index] = choice.finish_reason
    assert reasons == {0: "stop", 1: "stop"} and not last_has_choices
    for text in texts.values():
        jsonschema.validate(json.loads(text), SCHEMA)
    assert texts[0] != texts[1]
    plain = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=5, temperature=1.0, n=2,
                                           max_tokens=150, response_format=FORMAT)
    assert [c.message.content for c in plain.choices] == [texts[0], texts[1]]  # streaming changes nothing
    assert usage.completion_tokens == plain.usage.completion_tokens
    assert usage.prompt_tokens == plain.usage.prompt_tokens  # the prompt counted once for its n samples


def test_completions_json_object_streamed_and_not(client):
    args = dict(model=MODEL, prompt="JSON:", max_tokens=120, temperature=0.8, seed=3,
                extra_body={"response_format": {"type": "json_object"}})
    reply = client.completions.create(**args)
    text = "".join(c.choices[0].text for c in client.completions.create(**args, stream=True) if c.choices)
    assert text == reply.choices[0].text
    if reply.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    else:
        assert reply.choices[0].finish_reason == "length" and text.startswith("{")


def test_max_tokens_cuts_json_with_length(client):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, seed=1, max_tokens=4,
                                           response_format=FORMAT)
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4
    assert reply.choices[0].message.content.startswith("{")


@pytest.mark.parametrize("response_format,code,words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
     "unsupported_json_schema", "uniqueItems"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}, "invalid_json_schema",
     "objekt"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "invalid_response_format", "name"),
    ({"type": "grammar"}, "unsupported_response_format", "grammar")])
def test_bad_response_formats_are_400(client, response_format, code, words):
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, response_format=response_format)
    body = err.value.body
    assert body["param"] == "response_format" and body["code"] == code and words in body["message"]


def test_text_format_is_plain(client):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=5, temperature=0,
                                           response_format={"type": "text"})
    assert reply.choices[0].message.content is not None


# -- context length, as OpenAI counts it -------------------------------------------------------------------

def test_prompt_plus_max_tokens_over_context_is_400(client, server):
    prompt_tokens = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=1).usage.prompt_tokens
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=CONTEXT - prompt_tokens + 1)
    body = err.value.body
    assert body["param"] == "max_tokens" and body["code"] == "context_length_exceeded"
    assert (f"maximum context length is {CONTEXT} tokens. However, you requested {CONTEXT + 1} tokens "
            f"({prompt_tokens} in the messages, {CONTEXT - prompt_tokens + 1} in the completion)") in body["message"]
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=CONTEXT)
    assert err.value.body["param"] == "max_completion_tokens"
    exact = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=CONTEXT - prompt_tokens,
                                           temperature=0, extra_body={"ignore_eos": True})
    assert exact.usage.completion_tokens == CONTEXT - prompt_tokens  # the whole context is usable


def test_no_max_tokens_means_the_rest_of_the_context(client):
    reply = client.chat.completions.create(model=MODEL, messages=MESSAGES, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert reply.usage.total_tokens == CONTEXT and reply.choices[0].finish_reason == "length"


def test_completions_count_the_prompt_too(client):
    ids = [1] + [300] * 250
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=MODEL, prompt=ids, max_tokens=10)
    assert "251 in your prompt, 10 in the completion" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:  # the default of 16 counts as well, as in OpenAI
        client.completions.create(model=MODEL, prompt=ids)
    assert err.value.body["param"] == "max_tokens"
    assert client.completions.create(model=MODEL, prompt=ids, max_tokens=5).usage.total_tokens <= CONTEXT
    scored = client.completions.create(model=MODEL, prompt=[1] + [300] * 254, max_tokens=0, echo=True, logprobs=0)
    assert len(scored.choices[0].logprobs.token_logprobs) == 255  # scoring needs no room for a completion


# -- include_usage on completions with n > 1 ---------------------------------------------------------------

def test_completions_stream_include_usage_with_n(client):
    args = dict(model=MODEL, prompt=["Once upon", "The quick"], max_tokens=5, n=2, seed=4, temperature=1.0)
    chunks = list(client.completions.create(**args, stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert all(c.usage is None for c in chunks[:-1])
    plain = client.completions.create(**args)
    assert chunks[-1].usage.model_dump() == plain.usage.model_dump()
    assert sorted({c.choices[0].index for c in chunks[:-1]}) == [0, 1, 2, 3]
    without = list(client.completions.create(**args, stream=True))
    assert all(c.usage is None and c.choices for c in without)


# -- what the server does not do --------------------------------------------------------------------------

@pytest.mark.parametrize("extra,param", [
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]}, "tools"),
    ({"tool_choice": "required"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"), ({"function_call": "auto"}, "function_call"),
    ({"modalities": ["text", "audio"]}, "modalities"), ({"audio": {"voice": "alloy", "format": "wav"}}, "audio"),
    ({"reasoning_effort": "low"}, "reasoning_effort"),
    ({"web_search_options": {}}, "web_search_options"), ({"response_format": {"type": "json_schema",
                                                                           "json_schema": {"name": "x"}},
                                                         "ignore_eos": True}, "ignore_eos")])
def test_unsupported_features_are_400(server, extra, param):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, **extra}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["param"] == param and param in error["message"]


def test_harmless_extra_fields_are_accepted(server):
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 3, "temperature": 0, "store": False,
            "metadata": {"a": "b"}, "parallel_tool_calls": True, "service_tier": "auto", "user": "me",
            "reasoning_effort": None, "modalities": ["text"],
            "prediction": {"type": "content", "content": "x"}, "tool_choice": "none", "tools": [],
            "some_vendor_field": 1}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 200, response.text

"""Speculative decoding end to end: the API field on the real server (openai client), the engine's route,
the llm.draft_models setting and the Chat controller's stats and draft control."""
from __future__ import annotations

import httpx
import openai
import pytest
import yaml

from server_utils import start_server

TARGET, DRAFT, OTHER = "spec-target", "spec-draft", "spec-other"
SHAPE = dict(vocab_size=512, hidden_size=64, intermediate_size=176, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
             tie_word_embeddings=False)
DRAFT_SHAPE = dict(SHAPE, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                   num_key_value_heads=1)
PROMPTS = ["Hello! How are you today?", "The quick brown fox", "Once upon a time there was a little robot who"]


def write_pair(root):
    """A 2-layer target whose second layer adds little, and as its draft the target cut to its first layer
    (same tokenizer): random models that agree on most greedy tokens, so drafts are accepted and rejected."""
    import torch

    from modules.fixtures.llm import write_model
    from modules.llm.checkpoint import save_hf_folder
    from modules.llm.config import LlamaConfig
    from modules.llm.loader import load_llm
    from modules.llm.model import Llama
    write_model(root / TARGET, SHAPE, seed=0)
    target = load_llm(root / TARGET, "cpu", torch.float32).model
    with torch.no_grad():
        for proj in (target.model.layers[1].self_attn.o_proj, target.model.layers[1].mlp.down_proj):
            proj.weight.mul_(0.3)
    generation = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 2}
    save_hf_folder(target, root / TARGET, generation_config=generation)
    draft = Llama(LlamaConfig(**dict(SHAPE, num_hidden_layers=1)))
    draft.load_state_dict({k: v for k, v in target.state_dict().items() if ".layers.1." not in k})
    save_hf_folder(draft, root / DRAFT, tokenizer_dir=root / TARGET, generation_config=generation)


@pytest.fixture(scope="module")
def models_dir(tmp_path_factory):
    """A target, a draft with its tokenizer, and a model with another tokenizer (vocabulary of 600)."""
    from modules.fixtures.llm import write_model
    root = tmp_path_factory.mktemp("spec-models") / "models" / "LLM"
    write_pair(root)
    write_model(root / OTHER, dict(DRAFT_SHAPE, vocab_size=600), seed=2)
    return root


def data_dir_with(tmp_path, models_dir, draft_models):
    data = tmp_path / "data"
    (data / "models").mkdir(parents=True)
    (data / "models" / "LLM").symlink_to(models_dir)
    (data / "settings.yaml").write_text(yaml.safe_dump({"llm.draft_models": draft_models}), encoding="utf-8")
    return data


# -- the real server -----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def server(tmp_path_factory, models_dir):
    data = data_dir_with(tmp_path_factory.mktemp("spec-server"), models_dir, [f"{TARGET}={DRAFT}"])
    srv = start_server(data, "--api", "--nowebui")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)


def _chat(client, text, speculative, **kw):
    extra = {} if speculative is None else {"speculative": speculative}
    return client.chat.completions.create(model=TARGET, messages=[{"role": "user", "content": text}],
                                          temperature=0, max_tokens=40, extra_body={"ignore_eos": True, **extra},
                                          **kw)


def test_greedy_chat_is_identical_with_and_without_speculative(client):
    for text in PROMPTS:
        plain = _chat(client, text, False)
        spec = _chat(client, text, True)
        assert spec.choices[0].message.content == plain.choices[0].message.content
        assert spec.usage.completion_tokens == plain.usage.completion_tokens == 40
        stats = spec.model_extra["speculative"]
        # some drafts accepted (fewer passes than tokens), some rejected (the correction path ran too)
        assert stats["target_passes"] < 40 and 0 < stats["accepted_tokens"] < stats["draft_tokens"]
        assert "speculative" not in (plain.model_extra or {})


def test_the_setting_turns_it_on_by_default(client):
    """The target has a draft in llm.draft_models: a request that leaves the field out decodes speculatively."""
    reply = _chat(client, PROMPTS[0], None)
    assert reply.model_extra["speculative"]["target_passes"] >= 1


def test_greedy_completions_with_logprobs_match_token_for_token(client):
    args = dict(model=TARGET, prompt=PROMPTS[2], temperature=0, max_tokens=30, logprobs=2)
    plain = client.completions.create(**args, extra_body={"speculative": False, "ignore_eos": True})
    spec = client.completions.create(**args, extra_body={"speculative": True, "ignore_eos": True})
    a, b = plain.choices[0], spec.choices[0]
    assert b.text == a.text and b.logprobs.tokens == a.logprobs.tokens
    # verify-pass logits of several tokens vs one-token steps: the same fp32 numbers up to summation order
    assert b.logprobs.token_logprobs == pytest.approx(a.logprobs.token_logprobs, abs=1e-4)
    assert spec.model_extra["speculative"]["target_passes"] < 30


def test_echo_with_prompt_logprobs_runs_speculatively(client):
    args = dict(model=TARGET, prompt=PROMPTS[1], temperature=0, max_tokens=5, logprobs=0, echo=True)
    plain = client.completions.create(**args, extra_body={"speculative": False})
    spec = client.completions.create(**args, extra_body={"speculative": True})
    assert spec.choices[0].text == plain.choices[0].text
    assert spec.choices[0].logprobs.token_logprobs[1:] == pytest.approx(plain.choices[0].logprobs.token_logprobs[1:],
                                                                        abs=1e-4)


def test_streaming_speculative_equals_non_streaming(client):
    whole = _chat(client, PROMPTS[0], True).choices[0].message.content
    stream = _chat(client, PROMPTS[0], True, stream=True, stream_options={"include_usage": True})
    pieces, stats = [], None
    for chunk in stream:
        if chunk.usage is not None:
            stats = chunk.model_extra.get("speculative")
        pieces.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(pieces) == whole and stats and stats["target_passes"] >= 1


def test_n_samples_decode_batched_unless_speculative_is_asked_for(client):
    kw = dict(model=TARGET, messages=[{"role": "user", "content": "Hi"}], max_tokens=8, n=2, seed=3)
    assert "speculative" not in (client.chat.completions.create(**kw).model_extra or {})
    asked = client.chat.completions.create(**kw, extra_body={"speculative": True})
    assert len(asked.choices) == 2 and asked.model_extra["speculative"]["target_passes"] >= 2


def test_speculative_field_must_be_a_boolean(server):
    body = {"model": TARGET, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2, "speculative": "yes"}
    response = httpx.post(server.url + "/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == 400 and response.json()["error"]["param"] == "speculative"


def test_speculative_without_a_draft_is_a_400_naming_the_setting(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=DRAFT, prompt="Hi", max_tokens=2, extra_body={"speculative": True})
    error = info.value.body
    assert error["param"] == "speculative" and "llm.draft_models" in error["message"]
    # without the field, a model with no draft just decodes
    assert client.completions.create(model=DRAFT, prompt="Hi", max_tokens=2).choices[0].text is not None


def test_a_draft_with_another_tokenizer_is_refused_and_the_server_keeps_serving(server, client):
    options = server.url + "/sdapi/v1/options"
    assert httpx.post(options, json={"llm.draft_models": [f"{TARGET}={OTHER}"]}, timeout=30).status_code == 200
    try:
        with pytest.raises(openai.BadRequestError) as info:
            _chat(client, "Hi", None)
        message = info.value.body["message"]
        assert OTHER in message and "600" in message and "llm.draft_models" in message
        assert _chat(client, "Hi", False).choices[0].message.content is not None
    finally:
        httpx.post(options, json={"llm.draft_models": [f"{TARGET}={DRAFT}"]}, timeout=30)


def test_malformed_draft_setting_is_refused(server):
    response = httpx.post(server.url + "/sdapi/v1/options", json={"llm.draft_models": ["no-equals-sign"]},
                          timeout=30)
    assert response.status_code in (400, 422) and "target=draft" in response.text


# -- in process: the engine's route, the Chat controller ---------------------------------------------------------

@pytest.fixture
def ctx(make_ctx, tmp_path, models_dir):
    return make_ctx(data_dir=data_dir_with(tmp_path, models_dir, [f"{TARGET}={DRAFT}"]))


def test_engine_routes_speculative_requests_to_their_own_batch_key(ctx):
    from modules.llm.engine import GenerationRequest
    from modules.llm.sampling import SamplingParams
    engine = ctx.llm.engine(TARGET)
    ids = ctx.llm.files(TARGET).tokenizer.encode(PROMPTS[0], add_bos=True)

    def run(speculative):
        handle = engine.submit(GenerationRequest(list(ids), SamplingParams(temperature=0, max_new_tokens=20,
                                                                           ignore_eos=True),
                                                 speculative=speculative))
        return handle.job.batch_key, handle.result(60)

    spec_key, spec = run(None)
    plain_key, plain = run(False)
    assert spec_key == f"llm:{TARGET}:spec" and plain_key == f"llm:{TARGET}"
    assert spec.token_ids == plain.token_ids and spec.target_passes >= 1 and plain.target_passes == 0
    # both models were leased through the model manager, and released
    assert ctx.models.is_loaded(f"llm:{TARGET}") and ctx.models.is_loaded(f"llm:{DRAFT}")
    assert ctx.llm.unload(TARGET) and ctx.llm.unload(DRAFT)


def test_chat_controller_shows_acceptance_and_speed_up(ctx):
    from modules.llm.chat_controller import NO_DRAFT, ChatController, ChatSession, ReplySettings, display
    controller = ChatController(ctx.llm, ctx.settings)
    settings = ReplySettings(model=TARGET, sampling={"temperature": 0, "max_new_tokens": 24, "ignore_eos": True})
    session = ChatSession()
    final = list(controller.send(session, settings, text="Hello there"))[-1].messages[-1]
    meta = final["meta"]
    assert meta["target_passes"] >= 1 and 0 <= meta["acceptance"] <= 1
    assert meta["tokens_per_pass"] == round(24 / meta["target_passes"], 2)
    line = display([final])[0]["content"]
    assert f"{meta['acceptance'] * 100:.0f}% of drafts accepted" in line
    assert f"{meta['tokens_per_pass']:.2f}× tokens per target pass" in line
    # turned off in the Chat control: the next reply is plain, and its stats line says nothing about drafts
    assert "off" in controller.set_draft(TARGET, NO_DRAFT)
    assert ctx.settings.get("llm.draft_models") == []
    plain = list(controller.send(session, settings, text="Again"))[-1].messages[-1]
    assert "target_passes" not in plain["meta"] and "speculative" not in display([plain])[0]["content"]


def test_chat_draft_control_lists_models_and_refuses_another_tokenizer(ctx):
    from modules.llm.chat_controller import NO_DRAFT, ChatController
    controller = ChatController(ctx.llm, ctx.settings)
    assert controller.draft_choices(TARGET) == [NO_DRAFT, DRAFT, OTHER]
    assert controller.draft_value(TARGET) == DRAFT and DRAFT in controller.draft_status(TARGET)
    status = controller.set_draft(TARGET, OTHER)
    assert status.startswith("⚠️") and "600" in status
    assert ctx.settings.get("llm.draft_models") == [f"{TARGET}={DRAFT}"]     # refused: nothing changed
    assert controller.draft_value(DRAFT) == NO_DRAFT
    assert DRAFT in controller.set_draft(DRAFT, TARGET) and ctx.llm.draft_of(DRAFT) == TARGET
    saved = yaml.safe_load(ctx.paths.settings_file.read_text(encoding="utf-8"))
    assert saved["llm.draft_models"] == [f"{TARGET}={DRAFT}", f"{DRAFT}={TARGET}"]

"""LLMService over a real app context: models, prompts, context overflow, callbacks, leases."""
import threading

import pytest
import torch

from modules.llm.engine import PromptTooLong
from modules.llm.sampling import SamplingParams
from modules.llm.service import ModelNotFound, ModelUnusable
from modules.model_manager import ModelInUse

MODEL = "tiny-llama-gqa"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from modules.fixtures import llm as fixture
    data = tmp_path_factory.mktemp("svc")
    fixture.write(data)
    broken = data / "models" / "LLM" / "broken"
    broken.mkdir()
    (broken / "config.json").write_text('{"hidden_size": 8}', encoding="utf-8")
    return data


@pytest.fixture
def ctx(make_ctx, data_dir):
    return make_ctx(data_dir=data_dir)


@pytest.fixture
def service(ctx):
    return ctx.llm


def greedy(n=8, **kw):
    return SamplingParams(temperature=0, max_new_tokens=n, **kw)


def test_registered_without_loading_anything(ctx, service):
    assert "chat" in ctx.tabs
    assert any(r.prefix == "/v1" for _owner, r in ctx.api.routers)
    assert ctx.models.loaded("llm") == []
    assert ctx.settings.get("llm.max_new_tokens") == 512


def test_lists_models_and_explains_broken_ones(service):
    models = {m["name"]: m for m in service.list_models()}
    assert models[MODEL]["error"] is None
    assert "vocab_size" in models["broken"]["error"]
    assert service.model_names() == [MODEL]
    with pytest.raises(ModelNotFound, match="no LLM model named 'nope'.*available: tiny-llama-gqa"):
        service.resolve_model("nope")
    with pytest.raises(ModelUnusable, match="broken"):
        service.resolve_model("broken")
    assert service.resolve_model() == MODEL


def test_load_unload_through_the_model_manager(ctx, service):
    info = service.load(MODEL)
    assert info["context_length"] == 256 and info["kv_heads"] == 2
    assert service.current_model == MODEL
    assert [e["key"] for e in ctx.models.loaded("llm")] == [f"llm:{MODEL}"]
    assert service.unload() is True
    assert service.current_model is None and ctx.models.loaded("llm") == []


def test_chat_reply_fires_callbacks_and_counts_tokens(ctx, service):
    seen = []
    ctx.callbacks.add("on_chat_message", lambda **kw: seen.append(kw), owner="test")
    run = service.chat([{"role": "user", "content": "Hello!"}], greedy(6), chat_id="c1", system_prompt="Be nice.")
    text = "".join(d.text for d in run.events())
    result = run.result()
    assert text == result.text and result.completion_tokens <= 6
    assert run.plan.text.startswith("<|system|>\nBe nice.</s>\n<|user|>\nHello!</s>\n<|assistant|>\n")
    assert run.plan.ids[0] == 1 and run.plan.ids.count(1) == 1  # exactly one BOS
    assert [(s["role"], s["content"], s["chat_id"], s["model"]) for s in seen] == [
        ("user", "Hello!", "c1", MODEL), ("assistant", result.text, "c1", MODEL)]
    assert seen[0]["ctx"] is ctx


def test_context_overflow_drops_oldest_turns_and_keeps_system(service):
    lease = service.acquire(MODEL)
    try:
        llm = lease.model
        long_turn = "The quick brown fox jumps over the lazy dog near the river bank. " * 3
        messages = [{"role": "system", "content": "SYSTEM RULES"}]
        for i in range(12):
            messages += [{"role": "user", "content": f"{i} {long_turn}"},
                         {"role": "assistant", "content": f"reply {i}"}]
        messages.append({"role": "user", "content": "last question"})
        plan = service.plan_chat_prompt(llm, messages, max_new_tokens=64)
    finally:
        lease.release()
    assert plan.dropped > 0 and plan.dropped % 2 == 0  # whole turns: user + reply
    assert plan.messages[0] == {"role": "system", "content": "SYSTEM RULES"}
    assert plan.messages[1]["role"] == "user"
    assert plan.messages[-1]["content"] == "last question"
    assert len(plan.ids) <= 256 - 64
    assert plan.messages[1:] == messages[1 + plan.dropped:]
    assert "oldest messages were left out" in plan.notice and "system prompt is kept" in plan.notice


def test_chat_reports_dropped_turns(service):
    messages = []
    for i in range(10):
        messages += [{"role": "user", "content": "Once upon a time there was a little robot. " * 2},
                     {"role": "assistant", "content": "Stars shine brightly on a clear night. " * 2}]
    messages.append({"role": "user", "content": "and then?"})
    run = service.chat(messages, greedy(100), system_prompt="Keep me")
    run.result(60)
    assert run.dropped > 0 and run.plan.text.startswith("<|system|>\nKeep me</s>")


def test_last_message_alone_too_long_is_a_clear_error(service):
    with pytest.raises(PromptTooLong, match="context is 256 tokens"):
        service.chat([{"role": "user", "content": "word " * 400}], greedy())


def test_bad_messages_and_params_are_rejected(service):
    with pytest.raises(ValueError, match=r"messages\[0\].role"):
        service.chat([{"role": "robot", "content": "x"}], greedy())
    with pytest.raises(ValueError, match="temperature=-1"):
        service.chat([{"role": "user", "content": "x"}], SamplingParams(temperature=-1))


def test_stream_reply_and_continue(service):
    history = [{"role": "user", "content": "Hello! How are you today?"}]
    updates = list(service.stream_reply(history, greedy(10, ignore_eos=True)))
    final = updates[-1]
    assert final.result is not None and final.messages[:1] == history
    reply = final.messages[-1]
    assert reply["role"] == "assistant" and reply["meta"]["tokens"] == 10 and reply["meta"]["finish_reason"] == "length"
    assert all(u.messages[-1]["content"] == reply["content"][:len(u.messages[-1]["content"])] for u in updates)
    runs = []
    more = list(service.stream_reply(final.messages, greedy(5, ignore_eos=True), continue_last=True,
                                     on_start=runs.append))[-1]
    assert runs and runs[0].plan.text.endswith(reply["content"])  # no end-of-turn marker after the reply
    assert len(more.messages) == 2 and more.messages[-1]["content"].startswith(reply["content"])
    assert more.messages[-1]["meta"]["tokens"] == 5


def test_lease_is_held_while_generating(ctx, service):
    service.load(MODEL)
    started = threading.Event()
    run = service.chat([{"role": "user", "content": "Hi"}], greedy(200, ignore_eos=True))
    for _ in run.events():
        if started.is_set():
            continue  # deltas already streamed before the Stop; the engine may have let go of the model by now
        started.set()
        with pytest.raises(ModelInUse):
            ctx.models.unload(f"llm:{MODEL}")
        run.interrupt()
    assert run.result().finish_reason == "interrupted" and started.is_set()
    assert service.unload(MODEL) is True


def test_default_params_come_from_settings(ctx, service):
    ctx.settings.set("llm.temperature", 0.3)
    params = service.default_params(top_k=7)
    assert (params.temperature, params.top_k, params.max_new_tokens) == (0.3, 7, 512)


def test_plain_completion(service):
    handle, name = service.complete("The quick brown fox", greedy(5, ignore_eos=True))
    result = handle.result(60)
    assert name == MODEL and result.completion_tokens == 5
    assert result.prompt_tokens == service.count_tokens("The quick brown fox") + 1  # + BOS


def test_abandoned_stream_interrupts_the_reply(service):
    runs = []
    stream = service.stream_reply([{"role": "user", "content": "Hi"}], greedy(200, ignore_eos=True),
                                  on_start=runs.append)
    next(stream)
    stream.close()  # what Gradio does when the browser tab goes away
    result = runs[0].result(60)
    assert result.finish_reason == "interrupted" and result.completion_tokens < 200


def test_models_load_on_the_device_worker_and_prompts_need_no_weights(ctx, service):
    """Every load runs on the job queue's worker, never in the caller's thread; counting tokens and planning
    a prompt read only the tokenizer, so they load nothing."""
    loaded_in = []
    ctx.callbacks.add("on_model_loaded", lambda **kw: loaded_in.append(threading.current_thread().name),
                      owner="test")
    assert service.count_tokens("Hello there") > 0
    assert ctx.models.loaded("llm") == [], "counting tokens does not load the weights"
    run = service.chat([{"role": "user", "content": "Hello!"}], greedy(3))
    assert run.result(60).completion_tokens <= 3
    assert loaded_in == [ctx.jobs._worker.name], f"loaded in {loaded_in}, not on the worker"
    service.unload(MODEL)
    service.load(MODEL)
    assert loaded_in[-1] == ctx.jobs._worker.name
    service.unload(MODEL)


def test_row_parallel_setting_changes_the_loaded_model(ctx, service):
    """``llm.cpu_row_parallel`` (off by default, by measurement) attaches the row-parallel GEMV to models
    loaded afterwards; either way greedy decoding gives the same tokens."""
    ctx.devices.cpu_threads = max(2, ctx.devices.cpu_threads)
    prompt = [{"role": "user", "content": "Once upon a time"}]
    texts = {}
    for enabled in (False, True):
        ctx.settings.set("llm.cpu_row_parallel", enabled)
        lease = service.acquire(MODEL)
        try:
            rp = lease.model.model.row_parallel
            assert (rp is not None) is enabled and (rp is None or rp.threads == ctx.devices.cpu_threads)
        finally:
            lease.release()
        texts[enabled] = service.chat(prompt, greedy(8, ignore_eos=True)).result(60).text
        service.unload(MODEL)
    assert texts[False] == texts[True]


@pytest.mark.skipif(torch.get_num_threads() < 2, reason="needs torch running with at least two threads")
def test_threads_started_during_and_after_decode_get_the_configured_count(ctx, service):
    """torch.set_num_threads is never toggled around a forward pass: a thread whose first torch call happens
    in the middle of a decode step (here: started from a forward hook) or after generation gets the
    configured thread count. Before, decode set one thread for each step, and such a thread kept one."""
    configured = ctx.devices.cpu_threads
    ctx.settings.set("llm.cpu_row_parallel", True)  # the mode that used to toggle the count
    seen = {}

    def fresh_thread_count(label):
        t = threading.Thread(target=lambda: seen.setdefault(label, torch.get_num_threads()))
        t.start()
        t.join()

    calls = []

    def on_layer_output(*_):  # runs inside Llama.forward, on the worker
        calls.append(1)
        if len(calls) == 2:  # the first decode step after the prefill
            fresh_thread_count("during")

    lease = service.acquire(MODEL)
    try:
        hook = lease.model.model.model.layers[0].register_forward_hook(on_layer_output)
    finally:
        lease.release()
    try:
        service.chat([{"role": "user", "content": "Hi"}], greedy(4, ignore_eos=True)).result(60)
    finally:
        hook.remove()
    fresh_thread_count("after")
    assert seen == {"during": configured, "after": configured}
    assert ctx.jobs.call(lambda job: torch.get_num_threads()) == configured, "the worker has the configured count"
    service.unload(MODEL)

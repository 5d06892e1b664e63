"""The llama.cpp backend: the same tokens as Atelier's engine, sampling, stop strings, Stop, prefix reuse,
and the service serving a GGUF file through it (the model manager holds it, the setting switches it)."""
from __future__ import annotations

import shutil
import threading

import pytest

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is a requirement; its build is broken here")

from modules.llm.engine import GenerationRequest, _NullSink, generate  # noqa: E402
from modules.llm.sampling import SamplingParams  # noqa: E402

MODEL = "tiny-llama-gqa"
GGUF = f"{MODEL}.F32.gguf"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """A data dir with the tiny fixture folder and its F32 GGUF export beside it in models/LLM."""
    from modules.fixtures import llm as fixture
    from modules.quantize.gguf_export import export_model
    data = tmp_path_factory.mktemp("llamacpp")
    fixture.write(data)
    llm_dir = data / "models" / "LLM"
    export_model(llm_dir / MODEL, llm_dir / GGUF, "F32")
    return data


@pytest.fixture(scope="module")
def pair(data_dir):
    """(Atelier's fp32 model of the folder, the llama.cpp model of its GGUF) with the same tokenizer."""
    from modules.llm.llamacpp_backend import load_llamacpp
    from modules.llm.loader import load_llm, read_llm_files
    folder = data_dir / "models" / "LLM" / MODEL
    files = read_llm_files(folder)
    native = load_llm(folder, files=files)
    served = load_llamacpp(data_dir / "models" / "LLM" / GGUF, files, threads=2)
    yield native, served
    served.close()


def _run_both(pair, ids, params):
    from modules.llm.llamacpp_backend import generate_llamacpp
    native, served = pair
    a = generate(native, [GenerationRequest(list(ids), params)])[0]
    b = generate_llamacpp(served, GenerationRequest(list(ids), params), _NullSink())
    return a, b


@pytest.mark.parametrize("text", ["Hello world", "def add(a, b):", "The quick brown fox jumps"])
def test_greedy_tokens_equal_the_native_engine(pair, text):
    ids = pair[0].tokenizer.encode(text)
    a, b = _run_both(pair, ids, SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True,
                                               repetition_penalty=1.0))
    assert b.token_ids == a.token_ids and len(b.token_ids) == 24
    assert b.text == a.text and b.finish_reason == "length" and b.prompt_tokens == len(ids)
    assert b.tokens_per_second > 0


def test_seeded_sampling_with_penalties_equals_the_native_engine(pair):
    """Atelier's sampler runs on llama.cpp's logits: the same seed draws the same reply."""
    ids = pair[0].tokenizer.encode("Once upon a time")
    params = SamplingParams(temperature=0.9, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.2,
                            presence_penalty=0.3, max_new_tokens=20, ignore_eos=True, seed=1234)
    a, b = _run_both(pair, ids, params)
    assert b.token_ids == a.token_ids and b.seed == a.seed == 1234


def test_stop_strings_end_the_reply_like_the_native_engine(pair):
    native = pair[0]
    ids = native.tokenizer.encode("Hello world")
    free = generate(native, [GenerationRequest(ids, SamplingParams(temperature=0, max_new_tokens=24,
                                                                   ignore_eos=True))])[0].text
    stop = free.strip()[3:6]
    assert stop
    a, b = _run_both(pair, ids, SamplingParams(temperature=0, max_new_tokens=24, ignore_eos=True, stop=[stop]))
    assert b.finish_reason == a.finish_reason == "stop" and b.stop_string == stop
    assert b.text == a.text and stop not in b.text


def test_prefix_of_the_previous_request_is_reused_and_output_unchanged(pair):
    from modules.llm.llamacpp_backend import generate_llamacpp
    _, served = pair
    tok = served.tokenizer
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    first = tok.encode("A long shared system prompt about painting circles and squares")
    generate_llamacpp(served, GenerationRequest(first, params), _NullSink())
    assert served.cached[:len(first)] == first
    second = first + tok.encode("and then some", add_bos=False)
    reused = generate_llamacpp(served, GenerationRequest(second, params), _NullSink())
    served.reset()
    fresh = generate_llamacpp(served, GenerationRequest(second, params), _NullSink())
    assert reused.token_ids == fresh.token_ids


class _StopAfter:
    """A sink that asks to stop once *n* deltas arrived (what the Stop button does to a job)."""

    def __init__(self, n):
        self.n, self.items = n, []

    def emit(self, item):
        self.items.append(item)

    @property
    def interrupted(self):
        return len(self.items) >= self.n


def test_interrupt_stops_the_reply(pair):
    from modules.llm.llamacpp_backend import generate_llamacpp
    _, served = pair
    ids = served.tokenizer.encode("Hello")
    result = generate_llamacpp(served, GenerationRequest(ids, SamplingParams(temperature=0, max_new_tokens=100,
                                                                             ignore_eos=True)), _StopAfter(3))
    assert result.finish_reason == "interrupted" and result.completion_tokens == 3


def test_a_file_llama_cpp_refuses_gets_a_clear_error(tmp_path, pair):
    from modules.llm.llamacpp_backend import load_llamacpp
    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\0" * 64)
    with pytest.raises(ValueError, match="llama.cpp could not load broken.gguf"):
        load_llamacpp(bad, type("F", (), {"config": pair[0].config, "name": "broken.gguf"})(), threads=1)


# ----------------------------------------------------------------------------------------- the service
def test_service_serves_the_gguf_through_llama_cpp_and_the_setting_switches_it(data_dir, tmp_path, make_ctx):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    ctx = make_ctx(data_dir=data)
    service = ctx.llm
    assert GGUF in service.model_names() and MODEL in service.model_names()
    assert service.backend(GGUF) == "llama.cpp" and service.backend(MODEL) == "atelier"
    params = SamplingParams(temperature=0, max_new_tokens=12, ignore_eos=True)
    messages = [{"role": "user", "content": "Hello there"}]
    served = service.chat(messages, params, model=GGUF).result(timeout=60)
    native = service.chat(messages, params, model=MODEL).result(timeout=60)
    assert served.token_ids == native.token_ids and served.completion_tokens == 12
    loaded = {m["key"]: m for m in ctx.models.loaded()}
    assert f"llm:{GGUF}" in loaded and loaded[f"llm:{GGUF}"]["backend"] == "llama.cpp"

    ctx.settings.set("llm.gguf_backend", "atelier")          # the same file on Atelier's own engine
    assert service.backend(GGUF) == "atelier"
    again = service.chat(messages, params, model=GGUF).result(timeout=60)
    assert again.token_ids == native.token_ids
    assert service.unload(GGUF)


def test_stop_in_one_reply_leaves_the_next_one_running(data_dir, tmp_path, make_ctx):
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    ctx = make_ctx(data_dir=data)
    params = SamplingParams(temperature=0, max_new_tokens=200, ignore_eos=True)
    run = ctx.llm.chat([{"role": "user", "content": "Tell me everything"}], params, model=GGUF)
    other = ctx.llm.chat([{"role": "user", "content": "And you?"}],
                         SamplingParams(temperature=0, max_new_tokens=10, ignore_eos=True), model=GGUF)
    seen = threading.Event()
    for delta in run.events():
        if delta.index >= 2:
            seen.set()
            run.interrupt()
            break
    assert seen.is_set()
    assert run.result(timeout=60).finish_reason == "interrupted"
    assert other.result(timeout=60).completion_tokens == 10


def test_openai_client_streams_from_a_gguf_model(data_dir, tmp_path):
    """The real server and the official client: a GGUF model streams through /v1 like any other."""
    import openai

    from server_utils import start_server
    data = tmp_path / "data"
    shutil.copytree(data_dir, data)
    srv = start_server(data, "--api", "--nowebui")
    try:
        client = openai.OpenAI(base_url=srv.url + "/v1", api_key="unused", max_retries=0, timeout=60)
        assert GGUF in [m.id for m in client.models.list().data]
        stream = client.chat.completions.create(model=GGUF, messages=[{"role": "user", "content": "Hi"}],
                                                temperature=0, max_tokens=10, stream=True,
                                                stream_options={"include_usage": True}, extra_body={"ignore_eos": True})
        chunks = list(stream)
        text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
        assert text and chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 10
        whole = client.chat.completions.create(model=GGUF, messages=[{"role": "user", "content": "Hi"}],
                                               temperature=0, max_tokens=10, extra_body={"ignore_eos": True})
        assert whole.choices[0].message.content == text
    finally:
        srv.stop()

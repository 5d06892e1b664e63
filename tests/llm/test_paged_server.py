"""The paged engine behind the real server: a client that hangs up mid-stream gives its KV blocks back, a request
larger than the whole KV pool is a clear 400, and the server keeps serving."""
import time

import httpx
import pytest

from server_utils import start_server

MODEL = "wide-llama"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    from modules.fixtures import llm as fixture
    data = tmp_path_factory.mktemp("paged-server")
    fixture.write_model(data / "models" / "LLM" / MODEL,      # slow enough to hang up mid-stream
                        dict(fixture.FIXTURE_MODELS["tiny-llama-gqa"], hidden_size=512, intermediate_size=1408,
                             num_hidden_layers=8, num_attention_heads=8, max_position_embeddings=1024))
    # 8 layers x 2 KV heads x 64 dims x fp32, keys and values: 8 KiB per token, so 4 MB hold 512 tokens
    (data / "settings.yaml").write_text("llm.kv_cache_mb: 4\n", encoding="utf-8")
    # fp32 pinned: --precision auto loads a model this wide in bf16 on AVX-512 BF16 CPUs, halving the bytes per token
    srv = start_server(data, "--api", "--nowebui", "--precision", "fp32")
    yield srv
    srv.stop()


def pool_stats(server):
    models = httpx.get(server.url + "/sdapi/v1/memory", timeout=30).json()["models"]["models"]
    entry = next(m for m in models if m["key"] == f"llm:{MODEL}")
    return entry["attached"]["kv_pool"], entry


def test_disconnect_mid_stream_frees_the_blocks(server):
    body = {"model": MODEL, "prompt": "Once upon a time " * 20, "max_tokens": 300, "stream": True,
            "ignore_eos": True, "temperature": 0}
    with httpx.stream("POST", server.url + "/v1/completions", json=body, timeout=60) as response:
        seen = 0
        for line in response.iter_lines():
            if line.startswith("data: {"):
                seen += 1
                if seen == 3:
                    stats, entry = pool_stats(server)           # mid-stream: the row holds blocks
                    assert stats["free_blocks"] < stats["blocks"]
                    assert entry["attached_mb"] == pytest.approx(4, abs=0.2)
                    break                                        # hang up
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        stats, _ = pool_stats(server)
        if stats["free_blocks"] == stats["blocks"] and "finish: interrupted" in server.log():
            break
        time.sleep(0.2)
    assert stats["free_blocks"] == stats["blocks"], stats
    assert "finish: interrupted" in server.log()


def test_request_larger_than_the_pool_is_a_400_and_the_server_keeps_serving(server):
    body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 700, "temperature": 0}
    response = httpx.post(server.url + "/v1/completions", json=body, timeout=60)   # fits the context, not the pool
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "kv_cache_exhausted" and "llm.kv_cache_mb" in error["message"]
    assert "512 tokens" in error["message"]
    ok = httpx.post(server.url + "/v1/completions", json={**body, "max_tokens": 5}, timeout=60)
    assert ok.status_code == 200 and ok.json()["usage"]["completion_tokens"] == 5

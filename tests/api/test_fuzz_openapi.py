"""Property-based fuzzing of every operation in ``/openapi.json`` with schemathesis, in process over ASGI
(loopback only, nothing leaves the machine): whatever a client sends, the answer is never a 5xx.

The data dir holds the tiny LLM, LoRA, VAE and embedding fixtures but no SD checkpoint, so a randomly generated
txt2img body is answered (with the "no usable checkpoint" 422) in milliseconds instead of running a 512x512
generation for each example; the generation paths themselves are covered by tests/diffusion.
"""
from __future__ import annotations

import shutil

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import not_a_server_error

#: bounded, so the whole fuzz run stays around a minute on two cores
MAX_EXAMPLES = 12


@pytest.fixture(scope="module")
def fuzz_schema(fixture_data_dir, tmp_path_factory):
    import webui

    from modules.cli import parse_args
    from modules.server import create_app
    data = tmp_path_factory.mktemp("fuzz")
    for kind in ("LLM", "Lora", "VAE", "embeddings"):
        shutil.copytree(fixture_data_dir / "models" / kind, data / "models" / kind)
    (data / "models" / "Stable-diffusion").mkdir()
    ctx = webui.prepare(parse_args(["--data-dir", str(data), "--api", "--nowebui", "--disable-all-extensions"]),
                        raise_callback_errors=False)
    ctx.settings.set("llm.max_new_tokens", 4)
    app = create_app(ctx)
    yield schemathesis.openapi.from_asgi("/openapi.json", app)
    ctx.close()


schema = schemathesis.pytest.from_fixture("fuzz_schema")


@schema.parametrize()
@settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
def test_no_server_errors(case):
    case.call_and_validate(checks=[not_a_server_error])

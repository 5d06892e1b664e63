"""Each command-line flag changes what Atelier does (issue 7 point 9: no flag that silently does nothing).

One test per flag that had no behaviour test elsewhere; docs/flags.md lists every flag with the test that
proves it. In-process and cheap where possible: ``make_ctx`` (what ``webui.prepare`` builds from parsed
flags), ``modules.server.start`` on a free port for the bind address and the browser, and ``launch.py``'s
steps with the installer injected.
"""
from __future__ import annotations

import logging
import shlex
import shutil
import socket
import sys

import httpx
import pytest
import torch
from fastapi import FastAPI

import launch
from modules.cli import parse_args
from server_utils import free_port

#: flag -> (folder of the fixture data dir it replaces, how the app lists that folder)
FOLDER_FLAGS = {
    "--ckpt-dir": ("Stable-diffusion", lambda ctx: sorted(c.name for c in ctx.diffusion.checkpoints())),
    "--lora-dir": ("Lora", lambda ctx: sorted(x.name for x in ctx.diffusion.loras())),
    "--vae-dir": ("VAE", lambda ctx: sorted(x.name for x in ctx.diffusion.vaes())),
    "--embeddings-dir": ("embeddings", lambda ctx: sorted(x.name for x in ctx.diffusion.embeddings())),
    "--llm-dir": ("LLM", lambda ctx: sorted(ctx.llm.model_names())),
}


@pytest.mark.parametrize("flag", sorted(FOLDER_FLAGS))
def test_model_folder_flag_lists_that_folder(flag, fixture_data_dir, tmp_path, make_ctx):
    folder, listing = FOLDER_FLAGS[flag]
    elsewhere = tmp_path / "elsewhere" / folder
    shutil.copytree(fixture_data_dir / "models" / folder, elsewhere)
    default = make_ctx(data_dir=tmp_path / "plain")
    assert listing(default) == [], "an empty data dir lists nothing"
    ctx = make_ctx(flag, str(elsewhere), data_dir=tmp_path / "data")
    found = listing(ctx)
    assert found, f"{flag}: the fixture models in {elsewhere} are listed"
    assert ctx.paths.model_dir(folder) == elsewhere.resolve()
    assert not any((tmp_path / "data" / "models" / folder).iterdir()), "the default folder stays empty"


def test_models_dir_moves_every_model_folder(fixture_data_dir, tmp_path, make_ctx):
    models = tmp_path / "my-models"
    shutil.copytree(fixture_data_dir / "models", models)
    ctx = make_ctx("--models-dir", str(models), data_dir=tmp_path / "data")
    for folder, listing in FOLDER_FLAGS.values():
        assert listing(ctx), f"{folder} is listed from --models-dir"
        assert ctx.paths.model_dir(folder) == (models / folder).resolve()
    assert ctx.paths.settings_file.parent == (tmp_path / "data").resolve(), "settings stay in the data dir"


def _serve(ctx, app=None, **kw):
    from modules.server import start
    return start(ctx, app or ctx_app(), **kw)


def ctx_app() -> FastAPI:
    app = FastAPI()

    @app.get("/")
    def root():
        return {"ok": True}

    return app


def _bound_address(server) -> str:
    return server.servers[0].sockets[0].getsockname()[0]


def _stop(server, thread) -> None:
    server.should_exit = True
    thread.join(10)


def _refused(host: str, port: int) -> bool:
    with socket.socket() as sock:
        sock.settimeout(2)
        return sock.connect_ex((host, port)) != 0


def test_server_name_binds_that_host_only(make_ctx):
    port = free_port()
    ctx = make_ctx("--server-name", "127.0.0.2", "--port", str(port), "--nowebui")
    server, thread = _serve(ctx)
    try:
        assert _bound_address(server) == "127.0.0.2"
        assert httpx.get(f"http://127.0.0.2:{port}/").json() == {"ok": True}
        assert _refused("127.0.0.1", port), "nothing listens on 127.0.0.1 when --server-name names another host"
        assert ctx.exposed, "a non-loopback-default server name counts as exposed"
    finally:
        _stop(server, thread)
    for loopback in ("localhost", "::1"):
        assert not make_ctx("--server-name", loopback, data_dir=ctx.paths.data_dir).exposed, loopback


def test_listen_binds_every_interface_and_warns(make_ctx, caplog):
    port = free_port()
    ctx = make_ctx("--listen", "--port", str(port), "--nowebui")
    with caplog.at_level(logging.WARNING, logger="modules.server"):
        server, thread = _serve(ctx)
    try:
        assert _bound_address(server) == "0.0.0.0"
        assert httpx.get(f"http://127.0.0.1:{port}/").status_code == 200
        assert "exposed (--listen on 0.0.0.0)" in caplog.text and "--api-auth" in caplog.text
    finally:
        _stop(server, thread)
    plain = make_ctx("--port", str(free_port()), "--nowebui", data_dir=ctx.paths.data_dir)
    server, thread = _serve(plain)
    try:
        assert _bound_address(server) == "127.0.0.1", "without --listen only this machine can connect"
    finally:
        _stop(server, thread)


@pytest.mark.parametrize("flags, opened", [(("--autolaunch",), True), ((), False),
                                           (("--autolaunch", "--nowebui"), False)])
def test_autolaunch_opens_the_local_url_in_a_browser(make_ctx, flags, opened):
    port = free_port()
    ctx = make_ctx("--port", str(port), *flags)
    calls = []
    server, thread = _serve(ctx, open_browser=calls.append)
    try:
        assert calls == ([f"http://127.0.0.1:{port}"] if opened else [])
        if opened:
            assert httpx.get(calls[0]).status_code == 200, "the opened URL is the one served"
    finally:
        _stop(server, thread)


def test_api_flag_serves_the_api_and_gradio_auth_path_gates_the_ui(tmp_path, make_ctx):
    """Without --api no API route exists (404 in the API's shape); --gradio-auth-path alone puts the UI
    behind the login page, with the users from the file."""
    from fastapi.testclient import TestClient

    from modules.server import create_app
    auth = tmp_path / "users.txt"
    auth.write_text("alice:wonder\n")
    ctx = make_ctx("--gradio-auth-path", str(auth))
    with TestClient(create_app(ctx)) as client:
        assert client.get("/sdapi/v1/options").status_code == 404
        page = client.get("/")
        assert page.status_code == 200 and 'id="login-form"' in page.text
        assert client.get("/config").status_code == 401
        login = client.post("/login", data={"username": "alice", "password": "wonder"}, follow_redirects=False)
        assert login.status_code == 303
        assert client.get("/config").status_code == 200
    api = make_ctx("--api", "--nowebui", data_dir=ctx.paths.data_dir)
    with TestClient(create_app(api)) as client:
        assert client.get("/sdapi/v1/options").status_code == 200


def test_precision_sets_the_llm_weights_dtype(fixture_data_dir, tmp_path, make_ctx):
    """--precision reaches the language model too (tests/diffusion/test_flags.py covers Stable Diffusion)."""
    data = tmp_path / "data"
    shutil.copytree(fixture_data_dir / "models" / "LLM", data / "models" / "LLM")
    for precision, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        ctx = make_ctx("--device", "cpu", "--precision", precision, data_dir=data)
        assert ctx.devices.device.type == "cpu" and ctx.models.device.type == "cpu"
        name = ctx.llm.model_names()[0]
        with ctx.llm.acquire(name) as model:
            weights = model.model if hasattr(model, "model") else model
            assert {p.dtype for p in weights.parameters()} == {dtype}, precision
        ctx.close()


@pytest.mark.parametrize("flag, needle", [("--medvram", "--medvram has no effect on the CPU"),
                                          ("--lowvram", "--lowvram saves no memory on the CPU")])
def test_offload_flags_on_the_cpu_say_so_at_start_up(make_ctx, caplog, flag, needle):
    """On an accelerator --medvram parks idle models and --lowvram offloads layers (test_model_manager.py,
    tests/diffusion/test_flags.py); on the CPU there is nowhere to offload to, and start-up says so."""
    with caplog.at_level(logging.WARNING):
        ctx = make_ctx("--device", "cpu", flag)
    assert ctx.devices.offload == flag[2:]
    assert any(needle in n for n in ctx.devices.notes) and needle in caplog.text
    assert not make_ctx("--device", "cpu", data_dir=ctx.paths.data_dir).devices.notes


def test_lowvram_on_an_accelerator_says_what_it_does_for_llms():
    from modules.devices import offload_notes
    [note] = offload_notes("lowvram", torch.device("cuda"))
    assert "language models are offloaded whole" in note
    assert offload_notes("medvram", torch.device("cuda")) == [] and offload_notes("none", torch.device("cpu")) == []


def test_skip_install_installs_nothing(tmp_path):
    """launch.py's preparation: requirements and the enabled extensions' install.py, none under --skip-install."""
    from modules.extensions.loader import discover
    extensions = discover([(launch.REPO / "extensions", "builtin")])
    assert extensions, "the built-in example extension is found"
    for flags, expected in (((), True), (("--skip-install",), False)):
        installed, ran = [], []
        did = launch.prepare_environment(parse_args([*flags, "--data-dir", str(tmp_path)]), extensions,
                                         install=installed.append, installers=ran.append)
        assert did is expected
        if expected:
            assert installed == [launch.REPO / "requirements.txt"]
            assert ran == [[e for e in extensions if e.enabled]]
        else:
            assert installed == [] and ran == []


def test_torch_command_installs_torch_when_it_is_missing(tmp_path, monkeypatch):
    """TORCH_COMMAND replaces the pinned ``pip install torch==...`` (e.g. for a CUDA build)."""
    marker = tmp_path / "ran"
    requirements = tmp_path / "requirements.txt"
    requirements.write_text("torch==0.0.1  # a version that is not installed\n")
    command = [sys.executable, "-c", f"import pathlib; pathlib.Path({str(marker)!r}).write_text('torch')"]
    monkeypatch.setenv("TORCH_COMMAND", shlex.join(command))
    launch.install_requirements(requirements)
    assert marker.read_text() == "torch"
    monkeypatch.setenv("TORCH_COMMAND", shlex.join([sys.executable, "-c", "raise SystemExit(3)"]))
    with pytest.raises(SystemExit, match="TORCH_COMMAND failed"):
        launch.install_requirements(requirements)


def test_run_tests_runs_pytest_on_the_given_args_and_honours_skip_install(tmp_path, monkeypatch):
    tests = tmp_path / "test_probe.py"
    tests.write_text("def test_passes():\n    assert True\n\ndef test_fails():\n    assert False\n")
    installs = []
    monkeypatch.setattr(launch, "install_requirements", installs.append)  # launch.py's own step, recorded
    with pytest.raises(SystemExit) as passed:
        launch.main(["--run-tests", "--skip-install", str(tests), "-k", "passes"])
    with pytest.raises(SystemExit) as failed:
        launch.main(["--run-tests", "--skip-install", str(tests)])
    assert (passed.value.code, failed.value.code) == (0, 1), "pytest ran on the extra args and its code is returned"
    assert installs == [], "--skip-install: --run-tests installs nothing"

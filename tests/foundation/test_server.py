"""The real server in a subprocess: API auth, shared routes, exposure warning, share failure, bad start-ups."""
import base64
import socket
import subprocess
import sys
import time

import httpx
import pytest

from server_utils import REPO, free_port, start_server


@pytest.fixture(scope="module")
def secured(tmp_path_factory):
    data = tmp_path_factory.mktemp("secured")
    server = start_server(data, "--api", "--api-auth", "u:p", "--gradio-auth", "alice:wonder",
                          "--disable-all-extensions", auth=("u", "p"))
    yield server, data
    server.stop()


def test_api_auth_401_then_200(secured):
    server, _ = secured
    for path in ("/sdapi/v1/options", "/sdapi/v1/cmd-flags", "/sdapi/v1/progress", "/sdapi/v1/memory",
                 "/sdapi/v1/extensions", "/internal/ping"):
        assert httpx.get(server.url + path).status_code == 401, path
        assert httpx.get(server.url + path, auth=("u", "wrong")).status_code == 401, path
        assert httpx.get(server.url + path, auth=("u", "p")).status_code == 200, path
    assert httpx.post(server.url + "/sdapi/v1/interrupt").status_code == 401
    assert httpx.post(server.url + "/sdapi/v1/interrupt", auth=("u", "p")).json() == {"interrupted": False}
    assert httpx.post(server.url + "/sdapi/v1/skip", auth=("u", "p")).status_code == 200


def test_shared_routes(secured):
    server, data = secured
    auth = ("u", "p")
    flags = httpx.get(server.url + "/sdapi/v1/cmd-flags", auth=auth).json()
    assert flags["api"] is True and flags["api_auth"] == "***" and flags["gradio_auth"] == "***"
    assert flags["data_dir"] == str(data)
    progress = httpx.get(server.url + "/sdapi/v1/progress", auth=auth).json()
    assert progress["progress"] == 0 and progress["state"]["job_count"] == 0
    memory = httpx.get(server.url + "/sdapi/v1/memory", auth=auth).json()
    assert memory["ram"]["total"] > 0 and "models" in memory
    assert httpx.get(server.url + "/docs", auth=auth).status_code == 200
    assert "/sdapi/v1/options" in httpx.get(server.url + "/openapi.json", auth=auth).text


def test_options_round_trip_and_errors(secured):
    server, data = secured
    auth = ("u", "p")
    r = httpx.post(server.url + "/sdapi/v1/options", json={"memory.reserve_mb": 512}, auth=auth)
    assert r.status_code == 200 and r.json()["memory.reserve_mb"] == 512
    assert httpx.get(server.url + "/sdapi/v1/options", auth=auth).json()["memory.reserve_mb"] == 512
    assert "memory.reserve_mb: 512" in (data / "settings.yaml").read_text()
    bad = httpx.post(server.url + "/sdapi/v1/options", json={"memory.reserve_mb": -1}, auth=auth)
    assert bad.status_code == 400 and "memory.reserve_mb" in bad.text
    unknown = httpx.post(server.url + "/sdapi/v1/options", json={"no_such_option": 1}, auth=auth)
    assert unknown.status_code == 400 and "no_such_option" in unknown.text


def test_ui_requires_login(secured):
    server, _ = secured
    assert httpx.get(server.url + "/config").status_code == 401
    with httpx.Client(base_url=server.url) as client:
        bad = client.post("/login", data={"username": "alice", "password": "nope"})
        assert bad.status_code == 400
        ok = client.post("/login", data={"username": "alice", "password": "wonder"})
        assert ok.status_code == 200
        assert client.get("/config").status_code == 200


def test_exposed_without_auth_warns_and_share_failure_keeps_serving(tmp_path):
    server = start_server(tmp_path, "--listen", "--share", "--disable-all-extensions")
    try:
        deadline = time.monotonic() + 45
        while "could not open a public link" not in server.log() and time.monotonic() < deadline:
            time.sleep(0.5)
        log = server.log()
        assert "exposed" in log and "no login" in log and "--gradio-auth" in log
        assert "--share could not open a public link" in log
        page = httpx.get(server.url + "/config")
        assert page.status_code == 200
        assert "exposure-banner" in page.text, "the UI shows a banner"
    finally:
        server.stop()


def test_nowebui_serves_only_the_api(tmp_path):
    server = start_server(tmp_path, "--nowebui", "--disable-all-extensions")
    try:
        assert httpx.get(server.url + "/sdapi/v1/options").status_code == 200
        assert httpx.get(server.url + "/").status_code == 404
    finally:
        server.stop()


def test_port_in_use_is_a_clear_error(tmp_path):
    port = free_port()
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", port))
        sock.listen()
        out = subprocess.run([sys.executable, "launch.py", "--skip-install", "--data-dir", str(tmp_path),
                              "--port", str(port)], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0
    assert f"--port {port + 1}" in out.stderr and "in use" in out.stderr


def test_unwritable_data_dir_is_a_clear_error(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    out = subprocess.run([sys.executable, "launch.py", "--skip-install", "--data-dir", str(blocker / "d"),
                          "--port", str(free_port())], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "not writable" in out.stderr


def test_diagnose_prints_report(tmp_path):
    out = subprocess.run([sys.executable, "launch.py", "--skip-install", "--diagnose", "--data-dir", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    for needle in ("python:", "torch:", "cuda:", "devices:", "xformers:", "llama.cpp:", "packages:", "free disk:",
                   "model files:", "extensions:", "atelier-example", "log (last 200 lines):"):
        assert needle in out.stdout, needle


@pytest.mark.parametrize("flags, missing", [
    (("--listen", "--nowebui", "--api-auth", "u:p"), None),
    (("--listen", "--nowebui"), "no auth on the API"),
    (("--listen", "--gradio-auth", "a:b"), None),
    (("--listen", "--gradio-auth", "a:b", "--api"), "no auth on the API"),
    (("--listen", "--api", "--api-auth", "u:p"), "no auth on the web UI"),
    (("--listen", "--api"), "no auth on the web UI and the API"),
])
def test_exposure_warning_names_only_what_is_served_without_auth(make_ctx, flags, missing):
    from modules.exposure import exposure_warning
    warning = exposure_warning(make_ctx(*flags))
    if missing is None:
        assert warning is None
    else:
        assert warning.endswith(f"({missing})")
        assert ("--gradio-auth" in warning) == ("web UI" in missing) and ("--api-auth" in warning) == ("API" in missing)

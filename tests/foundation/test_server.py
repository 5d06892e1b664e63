"""The real server in a subprocess: API auth, shared routes, exposure warning, share failure, bad start-ups."""
import json
import re
import shutil
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


def test_wrong_method_is_405_even_with_the_web_ui_mounted(secured):
    """The UI is mounted at "/", which matches every path: a POST to a GET route must still be the API's 405."""
    server, _ = secured
    r = httpx.post(server.url + "/sdapi/v1/progress", auth=("u", "p"))
    assert r.status_code == 405 and "GET" in r.headers["allow"]
    assert r.json()["error"] and "GET" in r.json()["detail"]
    r = httpx.get(server.url + "/v1/chat/completions", auth=("u", "p"))
    assert r.status_code in (404, 405) and "error" in r.json()  # /v1 exists only with the LLM capability
    assert httpx.post(server.url + "/sdapi/v1/progress").status_code == 401, "the fallback is behind the auth"


def test_ui_requires_login(secured):
    server, _ = secured
    assert httpx.get(server.url + "/config").status_code == 401
    with httpx.Client(base_url=server.url) as client:
        bad = client.post("/login", data={"username": "alice", "password": "nope"})
        assert bad.status_code == 401 and "Incorrect username or password" in bad.text
        assert client.post("/login", data={"username": "bob", "password": "wonder"}).status_code == 401
        ok = client.post("/login", data={"username": "alice", "password": "wonder"})
        assert ok.status_code == 303 and ok.headers["location"] == "./"
        assert client.get("/config").status_code == 200
        assert client.get("/logout").status_code == 303
        assert client.get("/config").status_code == 401, "logging out ends the session"


def test_api_docs_need_api_credentials(secured):
    server, _ = secured
    for path in ("/docs", "/redoc", "/openapi.json"):
        assert httpx.get(server.url + path).status_code == 401, path
        assert httpx.get(server.url + path, auth=("u", "wrong")).status_code == 401, path
        assert httpx.get(server.url + path, auth=("u", "p")).status_code == 200, path
    assert "openapi.json" in httpx.get(server.url + "/redoc", auth=("u", "p")).text


SYSTEM_PROMPT = "You are Quillon, keeper of the zanzibar-lantern archive 7731."
CHAT_ID = "chat-secret-plum-4410"
CHAT_TITLE = "Plans for the marmalade heist"


@pytest.fixture(scope="module")
def private(fixture_data_dir, tmp_path_factory):
    """A server with --gradio-auth, fixture models, extensions, a custom system prompt and a saved chat."""
    data = tmp_path_factory.mktemp("private")
    shutil.copytree(fixture_data_dir / "models", data / "models")
    (data / "settings.yaml").write_text(f"llm.system_prompt: {json.dumps(SYSTEM_PROMPT)}\nllm.max_new_tokens: 4321\n")
    (data / "chats").mkdir()
    (data / "chats" / f"{CHAT_ID}.json").write_text(json.dumps(
        {"version": 1, "id": CHAT_ID, "title": CHAT_TITLE, "messages": [{"role": "user", "content": "hi"}]}))
    image = data / "outputs" / "txt2img-images" / "private-image.png"
    image.parent.mkdir(parents=True)
    image.write_bytes(b"\x89PNG\r\n\x1a\n")
    server = start_server(data, "--gradio-auth", "alice:wonder", "--api", "--api-auth", "u:p", auth=("u", "p"))
    yield server, data, image
    server.stop()


def gradio_routes() -> list[tuple[str, str]]:
    """(method, path) of every route Gradio mounts, read from an app Gradio builds here (so a new Gradio
    route is covered without editing this list), path parameters filled with sample values."""
    import gradio as gr
    from fastapi import FastAPI
    from starlette.routing import Mount

    with gr.Blocks() as blocks:
        gr.Textbox()
    app = FastAPI()
    gr.mount_gradio_app(app, blocks, path="/")
    mounted = next(r for r in app.router.routes if isinstance(r, Mount)).app

    def walk(routes, prefix=""):
        for route in routes:
            if hasattr(route, "path"):
                for method in sorted(getattr(route, "methods", None) or ["GET"]):
                    yield method, prefix + route.path
            else:  # an included router
                yield from walk(route.original_router.routes, prefix + route.include_context.prefix)

    return sorted(set(walk(mounted.router.routes)))


def test_nothing_leaks_before_login(private):
    server, data, image = private
    secrets = [SYSTEM_PROMPT, "zanzibar-lantern", CHAT_ID, CHAT_TITLE, "marmalade", "4321", "atelier-example",
               "Word counter", "private-image"]
    secrets += [p.stem for p in (data / "models" / "Stable-diffusion").iterdir()]
    secrets += [p.name for p in (data / "models" / "LLM").iterdir()]
    secrets += [p.stem for p in (data / "models" / "Lora").iterdir()]
    routes = gradio_routes()
    assert len(routes) > 60 and ("GET", "/gradio_api/info") in routes and ("POST", "/gradio_api/queue/join") in routes
    extra = [("GET", "/gradio_api/file=" + str(image)), ("GET", "/file=" + str(image)), ("GET", "/info"),
             ("GET", "/gradio_api/info?all_endpoints=true"), ("GET", "/?view=api"), ("GET", "/index.html"),
             ("GET", "/gradio_api/queue/data?session_hash=x"), ("GET", "/no/such/page")]
    seen = {}
    with httpx.Client(base_url=server.url, timeout=30) as client:
        for method, path in routes + extra:
            url = re.sub(r"\{path_or_url:path\}", str(image), path)
            url = re.sub(r"\{[^}]+\}", "x", url)
            response = client.request(method, url, data={} if method == "POST" else None)
            leaked = [s for s in secrets if s in response.text]
            assert not leaked, f"{method} {url} -> {response.status_code} shows {leaked}"
            seen[(method, url)] = response.status_code
        # the login page and nothing else: every other path is refused (the login form answers 401 too)
        login_page = client.get("/")
        assert login_page.status_code == 200 and 'id="login-form"' in login_page.text
        assert len(login_page.text) < 4000, "the login page is small: no app config or API info"
        allowed = {("GET", "/"), ("HEAD", "/"), ("GET", "/logout")}
        refused = {(m, u): code for (m, u), code in seen.items() if (m, u.split("?")[0]) not in allowed and code != 401}
        assert not refused, refused
        # then log in as the browser does (the form posts to ./login) and get the app
        ok = client.post("/login", data={"username": "alice", "password": "wonder"})
        assert ok.status_code == 303 and "atelier-session" in ok.headers["set-cookie"]
        assert "httponly" in ok.headers["set-cookie"].lower()
        app_page = client.get("/")
        assert app_page.status_code == 200 and SYSTEM_PROMPT in app_page.text and "Word counter" in app_page.text
        assert client.get("/gradio_api/info").status_code == 200
        assert client.get("/gradio_api/file=" + str(image)).status_code == 200
        user = client.get("/gradio_api/user")
        assert user.status_code == 200 and user.json() == "alice", "gr.Request.username names the user"


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
    import importlib.util
    if importlib.util.find_spec("llama_cpp"):   # a requirement: its version and the CPU features of its build
        import re
        assert re.search(r"llama\.cpp: llama-cpp-python \d+\.\d+\.\d+; CPU features: .*AVX", out.stdout)


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


def test_login_gate_closes_websockets_and_keeps_api_routes_open():
    """The gate in-process: a websocket without a session is closed (1008) before the app sees it; with one it
    reaches the app; a path our API routes claim passes untouched."""
    from starlette.applications import Starlette
    from starlette.responses import PlainTextResponse
    from starlette.routing import Route, WebSocketRoute
    from starlette.testclient import TestClient
    from starlette.websockets import WebSocketDisconnect

    from modules.login import COOKIE, LoginGate, LoginSessions

    async def stream(ws):
        await ws.accept()
        await ws.send_text("app data")
        await ws.close()

    inner = Starlette(routes=[WebSocketRoute("/ws", stream),
                              Route("/sdapi/v1/ping", lambda request: PlainTextResponse("api"))])
    sessions = LoginSessions([("alice", "wonder")])
    gate = LoginGate(inner, sessions=sessions, is_api=lambda scope: scope["path"].startswith("/sdapi/"))
    client = TestClient(gate)
    with pytest.raises(WebSocketDisconnect) as closed:
        with client.websocket_connect("/ws") as ws:
            ws.receive_text()
    assert closed.value.code == 1008
    assert client.get("/sdapi/v1/ping").text == "api"
    assert client.get("/anything").status_code == 401 and client.get("/").status_code == 200
    assert sessions.login("alice", "nope") is None and sessions.login("mallory", "wonder") is None
    huge = client.post("/login", content=b"username=alice&password=" + b"x" * 20_000,
                       headers={"content-type": "application/x-www-form-urlencoded"})
    assert huge.status_code == 413
    client.cookies.set(COOKIE, sessions.login("alice", "wonder"))
    with client.websocket_connect("/ws") as ws:
        assert ws.receive_text() == "app data"

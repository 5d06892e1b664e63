"""Assemble the FastAPI app: API routes (with their auth), the Gradio UI mounted at ``/``, and serving.

The app is our own FastAPI instance with Gradio mounted on it (``gr.mount_gradio_app``), so the API
routes, their auth and the error handlers do not depend on Gradio internals, and ``--nowebui`` is the
same app without the mount. With ``--gradio-auth`` the mount sits behind ``modules.login.LoginGate``
(our login page; nothing of the UI before login); ``--api-auth`` covers the API docs too.
"""
from __future__ import annotations

import base64
import logging
import secrets
import socket
import threading
import time
from typing import Any

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse
from starlette.routing import Match, Mount

from modules.api.core_routes import build_core_router
from modules.api.errors import add_api_fallbacks, install_error_handlers
from modules.cli import auth_list
from modules.exposure import bind_host, exposure_warning
from modules.login import LoginGate, LoginSessions

log = logging.getLogger(__name__)

def basic_auth_dependency(credentials: list[tuple[str, str]]):
    """A FastAPI dependency enforcing HTTP Basic auth against *credentials* (constant-time compare)."""
    allowed = {u: p for u, p in credentials}

    def check(request: Request) -> None:
        header = request.headers.get("authorization", "")
        if header.lower().startswith("basic "):
            try:
                user, _, password = base64.b64decode(header[6:]).decode("utf-8").partition(":")
            except (ValueError, UnicodeDecodeError):
                user, password = "", ""
            expected = allowed.get(user)
            if expected is not None and secrets.compare_digest(expected.encode(), password.encode()):
                return
        raise HTTPException(status_code=401, detail="Incorrect or missing API credentials (HTTP Basic auth)",
                            headers={"WWW-Authenticate": "Basic"})

    return check


def create_app(ctx) -> FastAPI:
    """Build the complete ASGI app for *ctx*: API routes (when ``--api``) and the web UI (unless ``--nowebui``)."""
    opts = ctx.opts
    deps = [Depends(basic_auth_dependency(auth_list(opts, api=True)))] if opts.api_auth else []
    # The docs are ours (not FastAPI's defaults) so that --api-auth protects them like every API route.
    app = FastAPI(title="Atelier", docs_url=None, redoc_url=None, openapi_url=None)
    if opts.api:
        _add_docs_routes(app, deps)

    @app.get("/internal/ping", dependencies=deps, tags=["system"])
    def ping() -> dict[str, Any]:
        return {}

    if opts.api:
        app.include_router(build_core_router(ctx), dependencies=deps)
        for _owner, router in ctx.api.routers:
            app.include_router(router, dependencies=deps)

    install_error_handlers(app)  # every error in the documented shape of its API family (modules/api/errors.py)
    add_api_fallbacks(app, deps)  # 405 / 404 for API paths before the UI mount at "/" can claim them

    if not opts.nowebui:
        import gradio as gr

        from modules.ui.app import build_ui
        blocks = build_ui(ctx)
        ui_auth = auth_list(opts)
        sessions = LoginSessions(ui_auth) if ui_auth else None
        extensions = ctx.extensions
        gr.mount_gradio_app(
            app, blocks, path="/", auth_dependency=sessions.user if sessions else None,
            allowed_paths=[str(ctx.paths.outputs_dir)],
            blocked_paths=[str(ctx.paths.models_dir), str(ctx.paths.settings_file), str(ctx.paths.logs_dir),
                           str(ctx.paths.chats_dir)],
            css=(extensions.css() if extensions else "") + UI_CSS,
            head=_script_tags(extensions.javascript() if extensions else ""),
            show_error=True,
        )
        if sessions is not None:
            app.add_middleware(LoginGate, sessions=sessions, is_api=lambda scope: _is_api_path(app, scope),
                               message="Atelier: log in with the credentials given to --gradio-auth")
    return app


def _add_docs_routes(app: FastAPI, deps: list) -> None:
    """``/openapi.json``, ``/docs`` (Swagger UI) and ``/redoc`` behind the API's own auth dependencies."""
    from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html

    @app.get("/openapi.json", dependencies=deps, include_in_schema=False)
    def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @app.get("/docs", dependencies=deps, include_in_schema=False)
    def docs():
        return get_swagger_ui_html(openapi_url="openapi.json", title="Atelier API")

    @app.get("/redoc", dependencies=deps, include_in_schema=False)
    def redoc():
        return get_redoc_html(openapi_url="openapi.json", title="Atelier API")


def _is_api_path(app: FastAPI, scope: dict) -> bool:
    """True when *scope* fully matches one of our own FastAPI routes (path and method), not the Gradio mount.

    A partial match (right path, wrong method: ``HEAD /openapi.json``) does not count, because Starlette
    then hands the request to the next full match, the Gradio mount at ``/``."""
    return any(not isinstance(route, Mount) and route.matches(scope)[0] == Match.FULL for route in app.router.routes)


UI_CSS = """
.atelier-banner { background: #b91c1c; color: white; padding: 8px 12px; border-radius: 6px; font-weight: 600; }
.atelier-banner p { color: white; margin: 0; }
"""


def _script_tags(js: str) -> str | None:
    if not js.strip():
        return None
    return "<script>\n" + js.replace("</script>", "<\\/script>") + "\n</script>"


class PortInUse(SystemExit):
    pass


def check_port(host: str, port: int) -> None:
    """Fail early and clearly when the port is taken (uvicorn's own message is easy to miss)."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError as exc:
            raise PortInUse(f"Cannot listen on {host}:{port}: {exc.strerror or exc}. Another program (or another "
                            f"Atelier) is using the port; stop it or start with --port {port + 1}.") from None


def start_share_tunnel(host: str, port: int) -> None:
    """Try to open a gradio.live link in the background; failure is a clear message, the local server stays up."""
    def run() -> None:
        from gradio import networking
        try:
            url = networking.setup_tunnel("127.0.0.1" if host == "0.0.0.0" else host, port,
                                          secrets.token_urlsafe(32), None, None)
            log.warning("Public share link (valid while this process runs): %s", url)
            print(f"Running on public URL: {url}", flush=True)
        except Exception as exc:  # noqa: BLE001 - no internet is a normal situation
            message = (f"--share could not open a public link ({type(exc).__name__}: {exc}). Check the internet "
                       f"connection; the app keeps serving locally on port {port}.")
            log.error(message)
            print(message, flush=True)

    threading.Thread(target=run, name="share-tunnel", daemon=True).start()


def start(ctx, app: FastAPI, *, open_browser=None):
    """Start serving *app* in a background thread and return ``(server, thread)`` once it listens.

    Binds ``--server-name`` / ``--listen``'s address on ``--port``, logs the exposure warning, fires
    ``on_app_started``, opens the ``--share`` tunnel and, with ``--autolaunch`` and a web UI, opens the
    local URL with *open_browser* (default ``webbrowser.open``; a parameter so tests can see the call).
    """
    import uvicorn

    opts = ctx.opts
    host = bind_host(opts)
    check_port(host, opts.port)
    warning = exposure_warning(ctx)
    if warning:
        bar = "!" * min(100, len(warning))
        log.warning("\n%s\n%s\n%s", bar, warning, bar)
    config = uvicorn.Config(app, host=host, port=opts.port, log_level="warning", timeout_graceful_shutdown=3)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, name="uvicorn", daemon=True)
    thread.start()
    while not server.started:
        if not thread.is_alive():
            raise SystemExit(f"The server failed to start on {host}:{opts.port}; see the log above.")
        time.sleep(0.05)
    shown = "127.0.0.1" if host == "0.0.0.0" else host
    print(f"Running on local URL: http://{shown}:{opts.port}", flush=True)
    if opts.api:
        print(f"API docs: http://{shown}:{opts.port}/docs", flush=True)
    ctx.callbacks.fire("on_app_started", app=app, ctx=ctx)
    if opts.share:
        start_share_tunnel(host, opts.port)
    if opts.autolaunch and not opts.nowebui:
        if open_browser is None:
            import webbrowser
            open_browser = webbrowser.open
        open_browser(f"http://{shown}:{opts.port}")
    return server, thread


def serve(ctx, app: FastAPI) -> None:
    """Run the server until interrupted."""
    server, thread = start(ctx, app)
    try:
        while thread.is_alive():
            thread.join(0.5)
    except KeyboardInterrupt:
        print("Stopping.", flush=True)
        server.should_exit = True
        thread.join(5)
    finally:
        ctx.close()

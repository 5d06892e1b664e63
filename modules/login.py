"""The web UI's login: our own login page and a gate in front of the Gradio mount.

Gradio's built-in ``auth`` protects only some routes: ``GET /`` still answers 200 before login and
embeds the app's whole API description (model, checkpoint and extension names, saved-chat ids,
setting values), and ``/theme.css``, ``/gradio_api/heartbeat``, static files and more need no login
at all. So with ``--gradio-auth`` a visitor who is not logged in gets our login page at ``/`` and a
401 (or a closed websocket) from every other path the Gradio mount serves; nothing of the app is sent
before a successful login.

Gradio learns who is logged in through its public ``auth_dependency`` hook (``LoginSessions.user``),
so ``gr.Request.username`` still names the user. API routes (``/sdapi``, ``/v1``, ``/docs`` ...) pass
the gate untouched: they have their own HTTP Basic auth (``--api-auth``).
"""
from __future__ import annotations

import html
import json
import secrets
import threading
from http.cookies import SimpleCookie
from typing import Any, Callable
from urllib.parse import parse_qs

COOKIE = "atelier-session"
MAX_FORM_BYTES = 16 * 1024


class LoginSessions:
    """Who is logged in: a random token per successful login, kept in memory (a restart logs everyone out)."""

    def __init__(self, credentials: list[tuple[str, str]]):
        self._credentials = dict(credentials)
        self._tokens: dict[str, str] = {}
        self._lock = threading.Lock()

    def login(self, username: str, password: str) -> str | None:
        """A new session token when *username* / *password* are right (constant-time compare), else None."""
        expected = self._credentials.get(username)
        # compare against something even for an unknown user, so timing does not tell which users exist
        candidate = expected if expected is not None else secrets.token_hex(16)
        if not secrets.compare_digest(candidate.encode(), password.encode()) or expected is None:
            return None
        token = secrets.token_urlsafe(32)
        with self._lock:
            self._tokens[token] = username
        return token

    def logout(self, token: str | None) -> None:
        with self._lock:
            self._tokens.pop(token or "", None)

    def user_for_token(self, token: str | None) -> str | None:
        with self._lock:
            return self._tokens.get(token or "")

    def user(self, request: Any) -> str | None:
        """Gradio's ``auth_dependency``: the logged-in user of *request*, or None."""
        return self.user_for_token(request.cookies.get(COOKIE))


def _cookie_token(scope: dict) -> str | None:
    for name, value in scope.get("headers", []):
        if name == b"cookie":
            jar = SimpleCookie()
            try:
                jar.load(value.decode("latin-1"))
            except Exception:  # noqa: BLE001 - a garbled cookie header is just "not logged in"
                continue
            if COOKIE in jar:
                return jar[COOKIE].value
    return None


class LoginGate:
    """ASGI middleware: everything headed for the web UI needs a session; ``/`` shows the login page.

    *is_api(scope)* tells the paths that belong to our own FastAPI routes (they pass untouched).
    """

    def __init__(self, app: Callable, sessions: LoginSessions, is_api: Callable[[dict], bool], message: str = ""):
        self.app = app
        self.sessions = sessions
        self.is_api = is_api
        self.message = message

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] not in ("http", "websocket") or self.is_api(scope):
            await self.app(scope, receive, send)
            return
        path = scope["path"].rstrip("/") or "/"
        method = scope.get("method", "GET")
        token = _cookie_token(scope)
        if scope["type"] == "http" and path == "/login" and method == "POST":
            await self._login(scope, receive, send)
            return
        if scope["type"] == "http" and path == "/logout":
            self.sessions.logout(token)
            await _respond(send, 303, b"", "text/plain", [(b"location", b"./"), _clear_cookie()])
            return
        if self.sessions.user_for_token(token) is not None:
            await self.app(scope, receive, send)
            return
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
        elif path == "/" and method in ("GET", "HEAD"):
            await _respond(send, 200, self.page().encode(), "text/html; charset=utf-8", head=method == "HEAD")
        else:
            body = json.dumps({"error": "Unauthorized", "detail": "Log in first: open / in a browser and sign in "
                               "with the credentials given to --gradio-auth."}).encode()
            await _respond(send, 401, body, "application/json", head=method == "HEAD")

    async def _login(self, scope: dict, receive: Callable, send: Callable) -> None:
        body = b""
        while True:
            message = await receive()
            body += message.get("body", b"")
            if len(body) > MAX_FORM_BYTES:
                await _respond(send, 413, b'{"error": "Payload Too Large", "detail": "the login form is too '
                               b'large"}', "application/json")
                return
            if not message.get("more_body"):
                break
        form = parse_qs(body.decode("utf-8", errors="replace"), keep_blank_values=True)
        username = (form.get("username") or [""])[0].strip()
        token = self.sessions.login(username, (form.get("password") or [""])[0])
        if token is None:
            page = self.page(error="Incorrect username or password.", username=username)
            await _respond(send, 401, page.encode(), "text/html; charset=utf-8")
            return
        secure = "; Secure" if scope.get("scheme") in ("https", "wss") else ""
        cookie = f"{COOKIE}={token}; Path=/; HttpOnly; SameSite=Lax{secure}".encode()
        await _respond(send, 303, b"", "text/plain", [(b"location", b"./"), (b"set-cookie", cookie)])

    def page(self, error: str = "", username: str = "") -> str:
        """The login page: a plain form, nothing about the app behind it."""
        notice = f'<p class="error" id="login-error" role="alert">{html.escape(error)}</p>' if error else ""
        message = f"<p>{html.escape(self.message)}</p>" if self.message else ""
        return LOGIN_PAGE.format(message=message, notice=notice, username=html.escape(username, quote=True))


def _clear_cookie() -> tuple[bytes, bytes]:
    return b"set-cookie", f"{COOKIE}=; Path=/; Max-Age=0; HttpOnly; SameSite=Lax".encode()


async def _respond(send: Callable, status: int, body: bytes, content_type: str,
                   headers: list[tuple[bytes, bytes]] = (), head: bool = False) -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", content_type.encode()), (b"content-length", str(len(body)).encode()),
                            (b"cache-control", b"no-store"), *headers]})
    await send({"type": "http.response.body", "body": b"" if head else body})


LOGIN_PAGE = """<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Log in</title>
<style>
body {{ font-family: system-ui, sans-serif; background: #f4f4f5; display: flex; justify-content: center;
       align-items: center; min-height: 100vh; margin: 0; }}
form {{ background: white; padding: 2rem; border-radius: 8px; box-shadow: 0 1px 4px #0002; width: 18rem; }}
label {{ display: block; margin-top: 1rem; font-size: .9rem; }}
input {{ width: 100%; box-sizing: border-box; padding: .5rem; margin-top: .25rem; }}
button {{ margin-top: 1.5rem; width: 100%; padding: .6rem; font-weight: 600; }}
.error {{ color: #b91c1c; }}
</style>
</head>
<body>
<form method="post" action="login" id="login-form">
<h1>Log in</h1>
{message}{notice}
<label>Username <input name="username" id="login-username" autocomplete="username" value="{username}" required autofocus></label>
<label>Password <input name="password" id="login-password" type="password" autocomplete="current-password" required></label>
<button type="submit" id="login-submit">Log in</button>
</form>
</body>
</html>
"""

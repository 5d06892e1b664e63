"""Who submitted a job: the owner string that Interrupt, Skip and progress match jobs by.

* Web UI: ``"user:<name>"`` when the visitor logged in with ``--gradio-auth`` (the same person in two
  tabs, or after a reload, can still stop their own job), else ``"session:<session_hash>"`` (one
  browser tab).
* API: ``"api:<name>"`` for the HTTP Basic user when ``--api-auth`` is on (the credentials were checked
  before the route runs), else ``"api"``: without API credentials the API has no notion of identity,
  so its clients share one owner, as they share A1111's one ``shared.state``. They still never reach a
  UI session's job or any chat.

Nothing here imports Gradio: the UI passes its ``gr.Request`` (anything with ``username`` and
``session_hash`` attributes).
"""
from __future__ import annotations

import base64
from typing import Any, Mapping

#: the owner of API requests when --api-auth is off
ANONYMOUS_API = "api"


def ui_owner(request: Any) -> str | None:
    """The owner for a Gradio event's ``gr.Request`` (None when Gradio gave none, e.g. a direct call)."""
    if request is None:
        return None
    username = getattr(request, "username", None)
    if username:
        return f"user:{username}"
    session = getattr(request, "session_hash", None)
    return f"session:{session}" if session else None


def api_owner(headers: Mapping[str, str], *, api_auth: bool) -> str:
    """The owner for an API request with *headers*; the Basic-auth user counts only under --api-auth."""
    if api_auth:
        user = basic_auth_user(headers.get("authorization", ""))
        if user:
            return f"{ANONYMOUS_API}:{user}"
    return ANONYMOUS_API


def basic_auth_user(header: str) -> str | None:
    """The user name in an ``Authorization: Basic ...`` header, or None."""
    if not header.lower().startswith("basic "):
        return None
    try:
        user, sep, _password = base64.b64decode(header[6:], validate=True).decode("utf-8").partition(":")
    except (ValueError, UnicodeDecodeError):
        return None
    return user if sep and user else None

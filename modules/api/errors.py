"""The documented error bodies of Atelier's two API families, and the app-wide handlers that use them.

Under ``/v1`` (OpenAI's shape): ``{"error": {"message", "type", "param", "code"}}``. Everywhere else (A1111's
shape, as its ``api.py`` answers): ``{"error": <kind>, "detail": <what to do>, "body": <request part>,
"errors": {field: message}}``. FastAPI's own errors (validation 422, 404, 405) and any unexpected exception
are answered in the shape of the path they happened on, so no client ever sees a bare ``{"detail": ...}``.
"""
from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

log = logging.getLogger(__name__)

OPENAI_PREFIX = "/v1/"

_OPENAI_TYPES = {401: "authentication_error", 403: "permission_error", 404: "not_found_error",
                 405: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error"}


def sdapi_error(status: int, error: str, detail: str, *, errors: dict[str, str] | None = None,
                body: Any = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """An A1111-shaped error response."""
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": error, "detail": detail, "body": body, "errors": errors or {}})


def openai_error(status: int, message: str, *, param: str | None = None, code: str | None = None,
                 kind: str | None = None, headers: dict[str, str] | None = None) -> JSONResponse:
    """An OpenAI-shaped error response."""
    kind = kind or ("server_error" if status >= 500 else _OPENAI_TYPES.get(status, "invalid_request_error"))
    return JSONResponse(status_code=status, headers=headers,
                        content={"error": {"message": message, "type": kind, "param": param, "code": code}})


def _is_openai(request: Request) -> bool:
    return request.url.path.startswith(OPENAI_PREFIX)


def _field(loc: tuple | list) -> str:
    parts = [str(p) for p in loc if p not in ("body", "query", "path", "header")]
    return ".".join(parts) or "body"


def install_error_handlers(app: FastAPI) -> None:
    """Answer FastAPI's validation errors, HTTP errors (404, 405, 401...) and unexpected exceptions in the
    error shape of the API family the path belongs to."""

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError):
        errors = {_field(e.get("loc", ())): e.get("msg", "invalid") for e in exc.errors()}
        detail = "; ".join(f"{k}: {v}" for k, v in errors.items()) or "invalid request"
        if _is_openai(request):
            return openai_error(400, f"invalid request: {detail}", param=next(iter(errors), None))
        return sdapi_error(422, "RequestValidationError", detail, errors=errors)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException):
        detail = exc.detail if isinstance(exc.detail, str) else str(exc.detail)
        if exc.status_code == 405:
            detail = f"{request.method} is not allowed on {request.url.path}; {detail}"
        headers = getattr(exc, "headers", None)
        if _is_openai(request):
            return openai_error(exc.status_code, detail, headers=headers)
        return sdapi_error(exc.status_code, "HTTPException", detail, headers=headers)

    @app.exception_handler(Exception)
    async def unhandled(request: Request, exc: Exception):  # the server keeps serving; the client gets JSON
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        if _is_openai(request):
            return openai_error(500, f"{type(exc).__name__}: {exc}")
        return sdapi_error(500, type(exc).__name__, str(exc))


API_PREFIXES = ("/sdapi/", "/v1/", "/internal/")


def add_api_fallbacks(app: FastAPI, dependencies: list | None = None) -> None:
    """Answer a wrong method on an API path with 405 (and ``Allow``), an unknown API path with 404, in the API's
    error shape. Call after every API route is included and before the web UI is mounted at ``/``: the mount
    matches every path, so without this a POST to a GET route would reach Gradio instead of being a 405."""
    from starlette.routing import Match, Mount

    methods = ["GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]

    async def fallback(request: Request):
        routes = [r for r in app.router.routes  # not the UI's mount: it matches every path
                  if getattr(r, "endpoint", None) is not fallback and not isinstance(r, Mount)]
        allowed = sorted(m for m in methods if any(
            r.matches({**request.scope, "method": m})[0] == Match.FULL for r in routes))
        if allowed:
            allow = ", ".join(allowed)
            raise StarletteHTTPException(405, f"use {allow}", headers={"Allow": allow})
        raise StarletteHTTPException(404, "no such API route; /docs lists them")

    for prefix in API_PREFIXES:
        app.add_api_route(prefix + "{rest:path}", fallback, methods=methods, include_in_schema=False,
                          dependencies=dependencies or [])

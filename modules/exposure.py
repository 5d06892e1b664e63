"""Who can reach the server and whether that is safe: the bind address and the exposure warning.

Shared by the server (log) and the UI (banner), so it lives outside both and neither imports the other.
"""
from __future__ import annotations

from modules.cli import auth_list

EXPOSED_WARNING = (
    "WARNING: the server is exposed ({how}) and has no login. Anyone who can reach it can use your "
    "models and read your outputs. Add --gradio-auth user:password (and --api-auth for the API)."
)


def bind_host(opts) -> str:
    if opts.server_name:
        return opts.server_name
    return "0.0.0.0" if opts.listen else "127.0.0.1"


def exposure_warning(ctx) -> str | None:
    """The warning text when the server is reachable by others without UI auth, else None."""
    if not ctx.exposed:
        return None
    if auth_list(ctx.opts) and (not ctx.opts.api or ctx.opts.api_auth):
        return None
    how = "--share" if ctx.opts.share else f"--listen on {bind_host(ctx.opts)}"
    missing = "web UI" if not auth_list(ctx.opts) else "API"
    return EXPOSED_WARNING.format(how=how) + f" (no auth on the {missing})"

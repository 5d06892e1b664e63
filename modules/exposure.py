"""Who can reach the server and whether that is safe: the bind address and the exposure warning.

Shared by the server (log) and the UI (banner), so it lives outside both and neither imports the other.
"""
from __future__ import annotations

from modules.cli import auth_list

EXPOSED_WARNING = (
    "WARNING: the server is exposed ({how}) and has no login. Anyone who can reach it can use your "
    "models and read your outputs. Add {advice}."
)
_ADVICE = {"web UI": "--gradio-auth user:password", "API": "--api-auth user:password"}


def bind_host(opts) -> str:
    if opts.server_name:
        return opts.server_name
    return "0.0.0.0" if opts.listen else "127.0.0.1"


def exposure_warning(ctx) -> str | None:
    """The warning text when the server is reachable by others and a part it serves has no login, else None.

    Only the parts actually served count: under ``--nowebui`` there is no web UI to protect, and without
    ``--api`` no API.
    """
    if not ctx.exposed:
        return None
    opts = ctx.opts
    missing = [part for part, served, protected in (("web UI", not opts.nowebui, bool(auth_list(opts))),
                                                    ("API", opts.api, bool(opts.api_auth)))
               if served and not protected]
    if not missing:
        return None
    how = "--share" if opts.share else f"--listen on {bind_host(opts)}"
    advice = " and ".join(f"{_ADVICE[part]} (for the {part})" for part in missing)
    return EXPOSED_WARNING.format(how=how, advice=advice) + f" (no auth on the {' and the '.join(missing)})"

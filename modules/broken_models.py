"""One wording for "these model files cannot be used, and why", shown under the model dropdowns.

Why: a broken file is left out of every list a model is picked from (so it can never be chosen or
become a default), but silently hiding it would leave the user wondering where their download went.
The UI therefore shows this line beside the dropdown; the API lists the same entries in full
(``GET /atelier/v1/broken-models``, and ``unusable`` in ``GET /v1/models``).
"""
from __future__ import annotations

from typing import Iterable, Mapping

#: longest reason shown per file in a UI line (the API and the log carry it in full)
REASON_CHARS = 160


def summary(entries: Iterable[Mapping[str, str]], *, limit: int = 5) -> str:
    """``"Not usable: a.safetensors (reason); b (reason)"`` for entries with ``name`` and ``error``; "" if none."""
    entries = [e for e in entries if e.get("error")]
    if not entries:
        return ""
    shown = []
    for entry in entries[:limit]:
        reason = str(entry["error"])
        if reason.startswith(f"{entry['name']}: "):
            reason = reason[len(entry["name"]) + 2:]
        if len(reason) > REASON_CHARS:
            reason = reason[:REASON_CHARS - 1] + "…"
        shown.append(f"{entry['name']} ({reason})")
    more = f"; and {len(entries) - limit} more" if len(entries) > limit else ""
    return "Not usable: " + "; ".join(shown) + more

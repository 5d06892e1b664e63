"""The speculative-decoding settings: which draft model drafts for which target, and how far it looks ahead.

``llm.draft_models`` is a list of ``"target=draft"`` entries (folder names in models/LLM), one per target
model, so speculative decoding is turned on per model: a target with an entry decodes speculatively unless a
request says ``speculative: false``; a target without one never does unless a request asks (and then it is
a 400 naming this setting). A list of strings, not a mapping, because settings are typed values that the
YAML file, ``/sdapi/v1/options`` and the UI all carry as they are; the Chat tab edits the entry of the model
it shows through a dropdown of the installed models (:meth:`~modules.llm.service.LLMService.set_draft`).

No torch here: the capability declares these settings at start-up.
"""
from __future__ import annotations

DRAFT_MODELS_KEY = "llm.draft_models"
SPECULATIVE_K_KEY = "llm.speculative_k"
#: the most tokens a draft proposes per round unless the ``llm.speculative_k`` setting says otherwise
DEFAULT_MAX_K = 8
#: the largest ``llm.speculative_k`` accepted (vLLM's MAX_SPEC_LEN is 128; a tiny draft is wrong long before)
MAX_K_LIMIT = 32


def parse_draft_models(entries: list) -> dict[str, str]:
    """``{target: draft}`` from the setting's entries; ValueError naming the first malformed one."""
    out: dict[str, str] = {}
    for entry in entries:
        if not isinstance(entry, str) or "=" not in entry:
            raise ValueError(f"entry {entry!r} must be \"target=draft\" (two model folder names)")
        target, _, draft = (part.strip() for part in entry.partition("="))
        if not target or not draft:
            raise ValueError(f"entry {entry!r} must name both models: \"target=draft\"")
        if target == draft:
            raise ValueError(f"entry {entry!r}: a model cannot draft for itself")
        if target in out:
            raise ValueError(f"target {target!r} has two entries; keep one")
        out[target] = draft
    return out


def check_draft_models(entries: list) -> list[str]:
    """The SettingSpec check: the entries, normalised (``"target=draft"`` without spaces)."""
    return [f"{target}={draft}" for target, draft in parse_draft_models(entries).items()]


def with_draft(entries: list, target: str, draft: str | None) -> list[str]:
    """The setting's value with *target*'s entry set to *draft* (None or "": removed)."""
    mapping = parse_draft_models(entries)
    mapping.pop(target, None)
    if draft:
        mapping[target] = draft
    return check_draft_models([f"{t}={d}" for t, d in mapping.items()])

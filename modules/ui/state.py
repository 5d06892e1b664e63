"""What the web UI's tabs share while they are built and used: the generation forms by tab id, so PNG Info
can fill txt2img / img2img. It lives on ``ctx.ui`` (set by ``build_ui``), never in a service, so the
capability services stay free of Gradio objects and usable with ``--nowebui``."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class UiState:
    #: ``GenerationForm`` by tab id ("txt2img", "img2img")
    forms: dict[str, Any] = field(default_factory=dict)
    #: components other tabs update, by name ("chat_model": the Chat tab's model dropdown, which the Train
    #: tab's "Load in Chat" refreshes)
    components: dict[str, Any] = field(default_factory=dict)

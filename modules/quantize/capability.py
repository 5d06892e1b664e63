"""Registers the quantize capability: ``ctx.quantize`` (the Quantize tab's controller) and the Quantize tab.

Cheap on purpose, like the other capabilities: nothing here imports gguf, llama.cpp or Gradio; the tab's
module is imported only when the UI is built. Without the LLM capability there is nothing to quantize,
so nothing is registered.
"""
from __future__ import annotations

from typing import Any

from modules.tabs import TabSpec, lazy_build


def register(ctx: Any) -> None:
    if ctx.llm is None:
        return
    from modules.quantize.controller import QuantizeController
    ctx.quantize = QuantizeController(ctx)
    # after Train (50), before Settings (900)
    ctx.tabs.add(TabSpec("quantize", "Quantize", lazy_build("modules.ui.tabs.quantize"), order=55))

"""Registers the training capability: ``ctx.training`` (the Train tab's controller) and the Train tab.

Cheap on purpose, like the other capabilities: nothing here imports torch's training code or Gradio; the
tab's module is imported only when the UI is built.
"""
from __future__ import annotations

from typing import Any

from modules.tabs import TabSpec, lazy_build


def register(ctx: Any) -> None:
    from modules.training.llm.train_controller import TrainController

    ctx.training = TrainController(ctx)
    # after Extras / PNG Info (35, 40), before Settings (900)
    ctx.tabs.add(TabSpec("train", "Train", lazy_build("modules.ui.tabs.train"), order=50))

"""Registers the training capability: ``ctx.training`` and ``ctx.training_images`` (the Train tab's LLM and
image controllers, sharing one training slot) and the Train tab.

Cheap on purpose, like the other capabilities: nothing here imports torch's training code or Gradio; the
tab's module is imported only when the UI is built.
"""
from __future__ import annotations

from typing import Any

from modules.tabs import TabSpec, lazy_build


def register(ctx: Any) -> None:
    from modules.training.images.train_controller import ImageTrainController
    from modules.training.llm.train_controller import TrainController
    from modules.training.training_slot import TrainingSlot

    slot = TrainingSlot()                      # one training at a time, LLM or image
    ctx.training = TrainController(ctx, slot)
    ctx.training_images = ImageTrainController(ctx, slot)
    # after Extras / PNG Info (35, 40), before Settings (900)
    ctx.tabs.add(TabSpec("train", "Train", lazy_build("modules.ui.tabs.train"), order=50))

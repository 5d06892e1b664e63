"""The built-in capabilities. Each module named here has ``register(ctx)``, which adds its
settings sections, services, tabs and API routes to the context. Listed in tab order."""
from __future__ import annotations

import importlib
import logging

log = logging.getLogger(__name__)

BUILTIN = (
    "modules.llm.capability",        # Chat tab, /v1 OpenAI API
    "modules.diffusion.capability",  # txt2img, img2img, PNG Info tabs, /sdapi/v1 generation routes
    "modules.training.capability",   # Train tab (LLM pretraining runs on the device queue)
    "modules.quantize.capability",   # Quantize tab (GGUF export, llama.cpp, torch int8/int4)
)


def register_builtin(ctx) -> list[str]:
    """Register every built-in capability that is present; return the problems (never raises)."""
    problems = []
    for name in BUILTIN:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as exc:
            if exc.name == name:
                continue  # capability not built yet
            problems.append(f"{name}: {exc}")
            log.exception("capability %s failed to import", name)
            continue
        try:
            module.register(ctx)
        except Exception as exc:  # noqa: BLE001 - one broken capability must not stop the app
            problems.append(f"{name}: {type(exc).__name__}: {exc}")
            log.exception("capability %s failed to register", name)
    return problems

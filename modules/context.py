"""The app context: everything a capability needs, passed explicitly (no module globals).

``build_context`` is called once by ``webui.main`` (and by tests with their own
options). Capabilities receive the context in ``register(ctx)`` and in their
UI/API builders.
"""
from __future__ import annotations

import argparse
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from modules.api.registry import ApiRegistry
from modules.devices import Devices, choose_devices
from modules.extensions.callbacks import Callbacks
from modules.extensions.scripts import ScriptRunner
from modules.jobs import JobQueue
from modules.model_manager import MB, ModelManager
from modules.paths import Paths
from modules.settings import Settings
from modules.tabs import TabRegistry

if TYPE_CHECKING:  # the capability services import heavy modules lazily; the context only names them
    from modules.diffusion.service import DiffusionService
    from modules.extensions.loader import ExtensionSet
    from modules.llm.service import LLMService
    from modules.ui.state import UiState

log = logging.getLogger(__name__)


@dataclass
class AppContext:
    opts: argparse.Namespace  # the parsed command line (read-only by convention)
    paths: Paths
    settings: Settings
    devices: Devices
    models: ModelManager
    jobs: JobQueue
    callbacks: Callbacks
    tabs: TabRegistry = field(default_factory=TabRegistry)
    api: ApiRegistry = field(default_factory=ApiRegistry)
    scripts: ScriptRunner = field(default_factory=ScriptRunner)
    extensions: ExtensionSet | None = None  # set by the extension loader
    #: the LLM capability (Chat, /v1), set by modules.llm.capability.register; None when not registered
    llm: LLMService | None = None
    #: image generation (txt2img, img2img, /sdapi/v1), set by modules.diffusion.capability.register
    diffusion: DiffusionService | None = None
    #: the Train tab's controller (modules.training.capability.register); None when not registered
    training: Any = None
    #: the Train tab's image-section controller, set beside ``training``; None when not registered
    training_images: Any = None
    #: the Quantize tab's controller (modules.quantize.capability.register); None when not registered
    quantize: Any = None
    #: what the web UI shares between its tabs (the generation forms), set by modules.ui.app.build_ui;
    #: None with --nowebui. Services never hold UI objects.
    ui: UiState | None = None

    @property
    def exposed(self) -> bool:
        """True when the server is reachable from other machines (--listen or --share)."""
        return bool(self.opts.listen or self.opts.share or (self.opts.server_name not in (None, "", "127.0.0.1", "localhost", "::1")))

    @property
    def extension_changes_allowed(self) -> bool:
        return not self.exposed or bool(self.opts.enable_insecure_extension_access)

    def close(self) -> None:
        self.jobs.shutdown()
        self.models.unload_all()


def build_context(opts: argparse.Namespace, *, raise_callback_errors: bool = False) -> AppContext:
    paths = Paths.from_options(opts.data_dir, opts.models_dir, opts.ckpt_dir, opts.lora_dir, opts.llm_dir,
                               getattr(opts, "vae_dir", None), getattr(opts, "embeddings_dir", None))
    paths.ensure()
    settings = Settings(paths.settings_file)
    settings.load()
    devices = choose_devices(opts.device, opts.precision, opts.xformers, opts.medvram, opts.lowvram,
                             no_half=getattr(opts, "no_half", False), no_half_vae=getattr(opts, "no_half_vae", False))
    callbacks = Callbacks(raise_errors=raise_callback_errors)
    ctx_ref: list[AppContext] = []

    def on_loaded(key: str, model: Any) -> None:
        callbacks.fire("on_model_loaded", key=key, model=model, ctx=ctx_ref[0] if ctx_ref else None)

    models = ModelManager(devices.device, reserve_bytes=settings.get("memory.reserve_mb") * MB,
                          max_loaded=settings.get("memory.max_loaded_models"), offload=devices.offload,
                          on_loaded=on_loaded)
    settings.on_change(lambda key, value: _apply_memory_setting(models, key, value))
    jobs = JobQueue(str(devices.device), on_worker_start=devices.setup_worker_thread)
    ctx = AppContext(opts=opts, paths=paths, settings=settings, devices=devices, models=models, jobs=jobs,
                     callbacks=callbacks, scripts=ScriptRunner(report_error=callbacks.hook_failed))
    ctx_ref.append(ctx)
    ctx.scripts.context = ctx
    return ctx


def _apply_memory_setting(models: ModelManager, key: str, value: Any) -> None:
    if key == "memory.reserve_mb":
        models.reserve_bytes = int(value) * MB
    elif key == "memory.max_loaded_models":
        models.max_loaded = int(value)

"""The diffusion service (``ctx.diffusion``): checkpoints, the current model, and jobs.

Both the UI and the API go through here, so they share one model in memory and
one queue: every generation is a job on ``ctx.jobs`` (one worker per device),
and the checkpoint is leased from ``ctx.models`` under ``"sd:" + title`` for the
duration of the job, so the model manager can never evict it mid-run.
Heavy imports (torch models, diffusers) happen inside methods, never at import.
"""
from __future__ import annotations

import logging
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from modules.diffusion.processing import (GenerationParams, InvalidGenerationParams, Processed,
                                          parameter_problems)

log = logging.getLogger(__name__)

#: the kind of the image jobs this service queues (what /sdapi/v1/interrupt and progress look at)
JOB_KIND = "diffusion"

#: A1111 option names accepted in ``override_settings`` and what they map to here.
OVERRIDE_ALIASES = {"sd_model_checkpoint": "checkpoint", "sd_vae": "vae",
                    "CLIP_stop_at_last_layers": "clip_skip", "sd.clip_skip": "clip_skip"}


class DiffusionService:
    def __init__(self, ctx):
        self.ctx = ctx
        self._lock = threading.RLock()
        self._checkpoints: list | None = None
        self._vaes: list | None = None
        self._loras: list | None = None
        self._tools = None

    # -- listings -------------------------------------------------------------------
    @property
    def ckpt_dir(self) -> Path:
        return self.ctx.paths.model_dir("Stable-diffusion")

    def checkpoints(self, refresh: bool = False) -> list:
        """CheckpointInfo for every checkpoint (broken ones carry ``error``), listed once and cached."""
        from modules.diffusion.checkpoints import list_checkpoints
        with self._lock:
            if self._checkpoints is None or refresh:
                self._checkpoints = list_checkpoints(self.ckpt_dir, self.ctx.paths.cache_dir, compute_hashes=False)
            return list(self._checkpoints)

    def usable_checkpoints(self) -> list:
        """Checkpoints that can be loaded: not broken, and not pickled unless --allow-unsafe-pickle is on."""
        return [c for c in self.checkpoints() if self._usable(c)]

    def _usable(self, info) -> bool:
        return not info.error and (not info.is_pickle or self._allow_pickle())

    def vaes(self, refresh: bool = False) -> list:
        from modules.diffusion.checkpoints import list_vaes
        with self._lock:
            if self._vaes is None or refresh:
                self._vaes = list_vaes(self.ctx.paths.model_dir("VAE"), self.ctx.paths.cache_dir,
                                       compute_hashes=False)
            return list(self._vaes)

    def loras(self, refresh: bool = False) -> list:
        """LoraInfo for every file in models/Lora (broken ones carry ``error``), scanned once until refreshed."""
        from modules.diffusion.lora import list_loras
        with self._lock:
            if self._loras is None or refresh:
                self._loras = list_loras(self.ctx.paths.model_dir("Lora"))
                _log_broken("LoRA", self._loras)
            return list(self._loras)

    def embeddings(self) -> list:
        """EmbeddingInfo for models/embeddings; pickled files are read only under --allow-unsafe-pickle."""
        from modules.diffusion.embeddings import list_embeddings
        return list_embeddings(self.ctx.paths.model_dir("embeddings"), allow_unsafe_pickle=self._allow_pickle())

    def broken_files(self) -> dict[str, list[dict[str, str]]]:
        """Every model file that cannot be used, by folder, with the reason (the UI and the API show it)."""
        return {"Stable-diffusion": self.broken_checkpoints(),
                "VAE": [{"name": v.name, "filename": v.filename, "error": v.error} for v in self.vaes() if v.error],
                "Lora": [{"name": x.name, "filename": x.filename, "error": x.error} for x in self.loras() if x.error],
                "embeddings": [{"name": e.name, "filename": e.filename, "error": e.error}
                               for e in self.embeddings() if e.error]}

    def broken_checkpoints(self) -> list[dict[str, str]]:
        """The checkpoints left out of :meth:`usable_checkpoints`, with the reason."""
        return [{"name": c.name, "filename": c.filename, "error": c.error or _PICKLE_REFUSED}
                for c in self.checkpoints() if not self._usable(c)]

    def _allow_pickle(self) -> bool:
        return bool(getattr(self.ctx.opts, "allow_unsafe_pickle", False))

    def refresh(self) -> None:
        self.checkpoints(refresh=True)
        self.vaes(refresh=True)
        self.loras(refresh=True)

    def find(self, query: str | None):
        """The checkpoint *query* names (title, name or hash), or the current one when *query* is empty.
        Raises ValueError listing the available checkpoints."""
        from modules.diffusion.checkpoints import find_checkpoint, looks_like_hash, with_hash
        infos = self.checkpoints()
        if query:
            info = find_checkpoint(infos, query)
            if info is None and looks_like_hash(query):  # hash every checkpoint only when a hash can match
                # (settings.yaml is checked at start-up: a stale name must not read gigabytes there)
                hashed = [with_hash(i, self.ctx.paths.cache_dir) for i in infos if not i.error]
                info = find_checkpoint(hashed, query)
            if info is None:
                names = ", ".join(i.title for i in infos if not i.error) or "none"
                raise ValueError(f"checkpoint {query!r} not found in {self.ckpt_dir}; available: {names}")
        else:
            usable = [i for i in infos if self._usable(i)]  # a broken model is never the default
            if not usable:
                raise ValueError(f"no usable Stable Diffusion checkpoint in {self.ckpt_dir}: put a .safetensors "
                                 "checkpoint or a diffusers folder there and press refresh")
            info = usable[0]
        if info.error:
            raise ValueError(f"checkpoint {info.name} is broken: {info.error}")
        return self._hashed(info)

    def _hashed(self, info):
        from modules.diffusion.checkpoints import with_hash
        hashed = with_hash(info, self.ctx.paths.cache_dir)
        if hashed is not info:
            with self._lock:
                if self._checkpoints is not None:
                    self._checkpoints = [hashed if c.filename == info.filename else c for c in self._checkpoints]
        return hashed

    def current_title(self) -> str:
        """The selected checkpoint's title (A1111's ``sd_model_checkpoint`` option)."""
        try:
            return self.find(self.ctx.settings.get("sd.sd_model_checkpoint") or None).title
        except ValueError:
            return self.ctx.settings.get("sd.sd_model_checkpoint") or ""

    def select_checkpoint(self, query: str, *, load: bool = True) -> str:
        """Make *query* the current checkpoint (validated), load it through the model manager on the job
        queue, and drop the previously loaded checkpoint. Returns its title.

        A switch that fails (unknown or broken file, a pickle without --allow-unsafe-pickle, a load error)
        changes nothing: the previous model stays loaded and ``sd.sd_model_checkpoint`` keeps its value;
        the reason is raised as :class:`CheckpointSwitchFailed` (a ValueError: the API answers 400)."""
        info = self.find(query)
        previous = self.ctx.settings.get("sd.sd_model_checkpoint")
        self.ctx.settings.set("sd.sd_model_checkpoint", info.title)
        if load:
            try:
                self.ctx.jobs.call(lambda job: self._switch_to(info), name=f"load {info.title}")
            except BaseException as exc:
                self.ctx.settings.set("sd.sd_model_checkpoint", previous)
                if isinstance(exc, _SWITCH_ERRORS):
                    raise CheckpointSwitchFailed(f"could not switch to checkpoint {info.title}; the current "
                                                 f"model is kept: {exc}") from exc
                raise
        return info.title

    def _switch_to(self, info) -> None:
        """Load *info* first, then drop the other idle checkpoints: a failed load leaves them in place."""
        key = "sd:" + info.title
        with self._lease(info):
            pass
        for entry in self.ctx.models.loaded("diffusion"):
            if entry["key"] != key and entry["leases"] == 0:
                self.ctx.models.unload(entry["key"])

    def select_vae(self, name: str) -> str:
        from modules.diffusion.checkpoints import find_vae
        if name in ("", "None", "Automatic", None):
            value = name or "Automatic"
        else:
            vae = find_vae(self.vaes(), name)
            if vae is None:
                names = ", ".join(v.name for v in self.vaes()) or "none"
                raise ValueError(f"VAE {name!r} not found in {self.ctx.paths.model_dir('VAE')}; available: "
                                 f"Automatic, None, {names}")
            value = vae.name
        self.ctx.settings.set("sd.sd_vae", value)
        return value

    # -- models -------------------------------------------------------------------------
    def _lease(self, info):
        from modules.diffusion.loading import load_sd_model
        from modules.weight_bytes import estimate_load_bytes
        ctx = self.ctx

        def load():
            return load_sd_model(info, device=ctx.devices.device, dtype=ctx.devices.dtype,
                                 allow_unsafe_pickle=bool(getattr(ctx.opts, "allow_unsafe_pickle", False)),
                                 vae_dtype=ctx.devices.vae_dtype, attention=ctx.devices.attention,
                                 offload=ctx.devices.offload)

        # the EMA copy and training leftovers in a full checkpoint are not loaded (see loading.py)
        size = estimate_load_bytes(info.filename, ctx.devices.dtype, ignore_prefixes=("model_ema.", "loss."))
        return ctx.models.acquire("sd:" + info.title, load, kind="diffusion", size_bytes=size,
                                  meta={"title": info.title, "filename": info.filename})

    def _apply_vae(self, sd, vae_setting: str) -> None:
        from modules.diffusion.checkpoints import find_vae
        from modules.diffusion.loading import apply_vae
        vae = find_vae(self.vaes(), vae_setting) if vae_setting not in ("", "None", "Automatic") else None
        wanted = Path(vae.filename).name if vae is not None else None
        if getattr(sd, "vae_name", None) != wanted:
            apply_vae(sd, vae.filename if vae is not None else None,
                      allow_unsafe_pickle=bool(getattr(self.ctx.opts, "allow_unsafe_pickle", False)))

    def tools(self):
        if self._tools is None:
            from modules.diffusion.generation import Tools
            self._tools = Tools.default()
        return self._tools

    # -- generation ------------------------------------------------------------------------
    def overrides(self, p: GenerationParams) -> dict[str, Any]:
        """``override_settings`` resolved to {checkpoint, vae, clip_skip}; unknown names raise ValueError."""
        out: dict[str, Any] = {}
        unknown = []
        for key, value in (p.override_settings or {}).items():
            name = OVERRIDE_ALIASES.get(key)
            if name is None:
                if key in self.ctx.settings.as_dict():
                    continue  # a plain setting: nothing in generation reads it per job
                unknown.append(key)
                continue
            out[name] = value
        if unknown:
            raise ValueError(f"override_settings: unknown option(s) {', '.join(unknown)}; "
                             f"supported: {', '.join(OVERRIDE_ALIASES)} and the settings from GET /sdapi/v1/options")
        return out

    def check_inputs(self, p: GenerationParams, *, img2img: bool = False,
                     defaults: bool = True) -> "CheckedParams":
        """The one validation of a request: sampler names, override_settings, checkpoint, script and every
        field, collected into one :class:`InvalidGenerationParams` naming each field, value and fix.

        Returns a copy of *p* made ready to run (canonical sampler names, the default clip skip, the
        ``override_settings`` clip skip) with the checkpoint and VAE it runs on, so nothing downstream
        resolves them again. *defaults* False leaves a script-made ``clip_skip`` of 1 as asked."""
        from modules.diffusion import samplers
        p = p.copy()
        problems: list[str] = []
        tab = "img2img" if img2img else "txt2img"
        if p.styles and defaults:  # A1111 applies styles once, before anything else sees the prompts
            from modules.diffusion.styles import style_store
            try:
                p.prompt, p.negative_prompt = style_store(self.ctx).apply(p.prompt, p.negative_prompt, p.styles)
            except ValueError as exc:
                problems.append(f"styles={p.styles!r}: {exc}")
        over: dict[str, Any] = {}
        try:
            over = self.overrides(p)
        except ValueError as exc:
            problems.append(str(exc))
        if "clip_skip" in over:
            value = over["clip_skip"]
            p.clip_skip = int(value) if isinstance(value, (int, float, str)) and str(value).strip().isdigit() \
                else value
        elif p.clip_skip == 1 and defaults:
            p.clip_skip = int(self.ctx.settings.get("sd.clip_skip"))
        names_ok = True
        try:
            p.sampler_name, p.scheduler = samplers.resolve_sampler(p.sampler_name, p.scheduler)
        except ValueError as exc:
            problems.append(f"sampler_name={p.sampler_name!r}, scheduler={p.scheduler!r}: {exc}")
            names_ok = False
        info = None
        checkpoint = over.get("checkpoint") or self.ctx.settings.get("sd.sd_model_checkpoint") or None
        if checkpoint is not None and not isinstance(checkpoint, str):
            problems.append(f"override_settings.sd_model_checkpoint={checkpoint!r}: must be a checkpoint title "
                            "or name from GET /sdapi/v1/sd-models")
        else:
            try:
                info = self.find(checkpoint)
            except ValueError as exc:
                problems.append(str(exc))
        problems += parameter_problems(
            p, samplers=list(samplers.SAMPLERS) if names_ok else None,
            schedules=list(samplers.SCHEDULE_TYPES) if names_ok else None,
            memory_budget=self.ctx.models.budget_free() if hasattr(self.ctx.models, "budget_free") else None,
            img2img=img2img)
        if p.script_name:
            try:
                script = self.ctx.scripts.by_title(p.script_name, tab)
                p.script_args = self.ctx.scripts.named_args(script, p.script_args or {})
            except ValueError as exc:
                problems.append(f"script_name={p.script_name!r}: {exc}")
        for title, values in list((p.alwayson_scripts or {}).items()):
            if isinstance(values, (list, tuple)):  # A1111's {"args": [...]}: by the script's declared order
                try:
                    script = self.ctx.scripts.by_title(title, tab)
                    del p.alwayson_scripts[title]
                    p.alwayson_scripts[script.title()] = self.ctx.scripts.named_args(script, values)
                except ValueError as exc:
                    problems.append(f"alwayson_scripts[{title!r}]: {exc}")
        if problems:
            raise InvalidGenerationParams(problems)
        return CheckedParams(p, info, str(over.get("vae", self.ctx.settings.get("sd.sd_vae"))))

    def submit(self, p: GenerationParams, *, img2img: bool = False, owner: str | None = None):
        """Check *p* (:meth:`check_inputs`) and queue it; returns the Job (its result is a Processed).
        *owner* (see :mod:`modules.job_owner`) is who may interrupt or skip it."""
        checked = self.check_inputs(p, img2img=img2img)
        tab = "img2img" if img2img else "txt2img"
        name = f"{tab}: {checked.params.prompt[:40]}"

        return self.ctx.jobs.submit(lambda job: self.run_job(job, checked, tab), name=name, kind=JOB_KIND,
                                    owner=owner)

    def jobs_of(self, owner: str | None, *, running_only: bool = False) -> list:
        """*owner*'s unfinished image jobs, running first (the owners of other jobs are never matched)."""
        return self.ctx.jobs.find(kind=JOB_KIND, owner=owner, running_only=running_only)

    def interrupt(self, owner: str | None, *, queued_too: bool = False) -> bool:
        """Interrupt *owner*'s running image generation (A1111's Interrupt), and with *queued_too* also the
        ones still waiting (a UI session stopping everything it asked for). Chats and other owners' images
        are never touched. True when a job was interrupted."""
        jobs = self.jobs_of(owner, running_only=not queued_too)
        for job in jobs:
            job.interrupt()
        return bool(jobs)

    def skip(self, owner: str | None) -> bool:
        """Skip the current batch of *owner*'s running image job (the next batch, if any, goes on)."""
        jobs = self.jobs_of(owner, running_only=True)
        for job in jobs:
            job.skip()
        return bool(jobs)

    def generate(self, p: GenerationParams, *, img2img: bool = False, timeout: float | None = None,
                 owner: str | None = None) -> Processed:
        return self.submit(p, img2img=img2img, owner=owner).result(timeout)

    def run_job(self, job, checked: "CheckedParams", tab: str) -> Processed:
        """Inside the worker: run the selected script, or plain generation. Parameters a script makes
        (X/Y/Z changes the sampler or checkpoint per cell) go through :meth:`check_inputs` too."""
        p = checked.params
        p.runner = lambda q: self._process(job, self.check_inputs(q, img2img=tab == "img2img",
                                                                         defaults=False), tab)
        if p.script_name:
            script = self.ctx.scripts.by_title(p.script_name, tab)
            result = script.run(p, **(p.script_args or {}))
            if not isinstance(result, Processed):
                raise TypeError(f"script {p.script_name!r} returned {type(result).__name__}, not Processed")
            if result.grid is not None and p.save_images:
                from modules.diffusion.outputs import ImageSaver
                saver = ImageSaver(self.ctx.paths.outputs_dir, self.ctx.callbacks, self.ctx)
                seed = result.seeds[0] if result.seeds else p.seed
                result.paths.insert(0, str(saver.save(result.grid, f"{tab}-grids", seed,
                                                      result.infotexts[0] if result.infotexts else None)))
            return result
        return self._process(job, checked, tab)

    def _process(self, job, checked: "CheckedParams", tab: str) -> Processed:
        from modules.diffusion.generation import Run, process_images
        from modules.diffusion.outputs import ImageSaver
        ctx = self.ctx
        p, info = checked.params, checked.checkpoint
        with self._lease(info) as sd:
            self._apply_vae(sd, checked.vae)
            run = Run(sd=sd, tools=self.tools(), job=job, tab=tab,
                      preview_every=int(ctx.settings.get("ui.show_progress_every_n_steps")),
                      saver=ImageSaver(ctx.paths.outputs_dir, ctx.callbacks, ctx) if p.save_images else None,
                      scripts=ctx.scripts, lora_dir=ctx.paths.model_dir("Lora"),
                      embeddings_dir=ctx.paths.model_dir("embeddings"),
                      model_name=info.model_name, model_hash=info.shorthash or "",
                      vae_name=getattr(sd, "vae_name", None), device=ctx.devices.device, dtype=ctx.devices.dtype)
            return process_images(run, p)


_PICKLE_REFUSED = ("a pickled checkpoint, which can run code when loaded: convert it to safetensors, or start with "
                   "--allow-unsafe-pickle if you trust its source")


class CheckpointSwitchFailed(ValueError):
    """Switching checkpoints failed; the previous model and setting were kept. The message says why."""


#: what a failed checkpoint load raises for a bad file (UnsafeCheckpoint is a PermissionError, a missing
#: tokenizer a FileNotFoundError); anything else is a server fault and propagates as it is
_SWITCH_ERRORS = (ValueError, OSError, KeyError)


def _log_broken(kind: str, infos: list) -> None:
    for info in infos:
        if info.error:
            log.warning("%s %s is not usable: %s", kind, info.name, info.error)


@dataclass
class CheckedParams:
    """A request that passed :meth:`DiffusionService.check_inputs`, with what it resolved to."""
    params: GenerationParams
    checkpoint: Any  # checkpoints.CheckpointInfo
    vae: str  # the SD VAE setting for this job: Automatic, None or a file name


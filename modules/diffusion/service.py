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
from pathlib import Path
from typing import Any

from modules.diffusion.processing import GenerationParams, Processed

log = logging.getLogger(__name__)

#: A1111 option names accepted in ``override_settings`` and what they map to here.
OVERRIDE_ALIASES = {"sd_model_checkpoint": "checkpoint", "sd_vae": "vae",
                    "CLIP_stop_at_last_layers": "clip_skip", "sd.clip_skip": "clip_skip"}


class DiffusionService:
    def __init__(self, ctx):
        self.ctx = ctx
        self._lock = threading.RLock()
        self._checkpoints: list | None = None
        self._vaes: list | None = None
        self._tools = None
        self._jobs: set = set()  # this service's queued and running jobs (for Interrupt / Skip)

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
        return [c for c in self.checkpoints() if not c.error]

    def vaes(self, refresh: bool = False) -> list:
        from modules.diffusion.checkpoints import list_vaes
        with self._lock:
            if self._vaes is None or refresh:
                self._vaes = list_vaes(self.ctx.paths.model_dir("VAE"), self.ctx.paths.cache_dir,
                                       compute_hashes=False)
            return list(self._vaes)

    def refresh(self) -> None:
        self.checkpoints(refresh=True)
        self.vaes(refresh=True)

    def find(self, query: str | None):
        """The checkpoint *query* names (title, name or hash), or the current one when *query* is empty.
        Raises ValueError listing the available checkpoints."""
        from modules.diffusion.checkpoints import find_checkpoint, with_hash
        infos = self.checkpoints()
        if query:
            info = find_checkpoint(infos, query)
            if info is None:
                hashed = [with_hash(i, self.ctx.paths.cache_dir) for i in infos if not i.error]
                info = find_checkpoint(hashed, query)
            if info is None:
                names = ", ".join(i.title for i in infos if not i.error) or "none"
                raise ValueError(f"checkpoint {query!r} not found in {self.ckpt_dir}; available: {names}")
        else:
            usable = [i for i in infos if not i.error]
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
        queue, and drop the previously loaded checkpoint. Returns its title."""
        info = self.find(query)
        self.ctx.settings.set("sd.sd_model_checkpoint", info.title)
        if load:
            self.ctx.jobs.call(lambda job: self._switch_to(info), name=f"load {info.title}")
        return info.title

    def _switch_to(self, info) -> None:
        key = "sd:" + info.title
        for entry in self.ctx.models.loaded("diffusion"):
            if entry["key"] != key and entry["leases"] == 0:
                self.ctx.models.unload(entry["key"])
        with self._lease(info):
            pass

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
                                 allow_unsafe_pickle=bool(getattr(ctx.opts, "allow_unsafe_pickle", False)))

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

    def validate(self, p: GenerationParams, *, img2img: bool = False) -> None:
        from modules.diffusion import samplers
        problems = []
        names_ok = True
        try:
            p.sampler_name, p.scheduler = samplers.resolve_sampler(p.sampler_name, p.scheduler)
        except ValueError as exc:
            problems.append(str(exc))
            names_ok = False
        try:
            over = self.overrides(p)
            self.find(over.get("checkpoint") or self.ctx.settings.get("sd.sd_model_checkpoint") or None)
        except ValueError as exc:
            problems.append(str(exc))
        try:
            p.validate(samplers=list(samplers.SAMPLERS) if names_ok else None,
                       schedules=list(samplers.SCHEDULE_TYPES) if names_ok else None,
                       memory_budget=self.ctx.models.budget_free() if hasattr(self.ctx.models, "budget_free")
                       else None, img2img=img2img)
        except ValueError as exc:
            problems.append(str(exc))
        if p.script_name:
            try:
                self.ctx.scripts.by_title(p.script_name, "img2img" if img2img else "txt2img")
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))

    def submit(self, p: GenerationParams, *, img2img: bool = False):
        """Validate *p* and queue it; returns the Job (its result is a Processed)."""
        p = p.copy()
        if p.clip_skip == 1:
            p.clip_skip = int(self.ctx.settings.get("sd.clip_skip"))
        self.validate(p, img2img=img2img)
        tab = "img2img" if img2img else "txt2img"
        name = f"{tab}: {p.prompt[:40]}"

        def work(job):
            try:
                return self.run_job(job, p, tab)
            finally:
                self._jobs.discard(job)

        job = self.ctx.jobs.submit(work, name=name)
        self._jobs = {j for j in self._jobs if not j.done} | {job}
        return job

    def interrupt(self) -> bool:
        """Interrupt every image job (queued or running); other capabilities' jobs are left alone."""
        jobs = [j for j in list(self._jobs) if not j.done]
        for job in jobs:
            job.interrupt()
        return bool(jobs)

    def skip(self) -> bool:
        """Skip the current batch of the running image job(s)."""
        jobs = [j for j in list(self._jobs) if j.state == "running"]
        for job in jobs:
            job.skip()
        return bool(jobs)

    def generate(self, p: GenerationParams, *, img2img: bool = False, timeout: float | None = None) -> Processed:
        return self.submit(p, img2img=img2img).result(timeout)

    def run_job(self, job, p: GenerationParams, tab: str) -> Processed:
        """Inside the worker: run the selected script, or plain generation."""
        p.runner = lambda q: self._process(job, q, tab)
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
        return self._process(job, p, tab)

    def _process(self, job, p: GenerationParams, tab: str) -> Processed:
        from modules.diffusion.generation import Run, process_images
        from modules.diffusion.outputs import ImageSaver
        ctx = self.ctx
        over = self.overrides(p)
        if "clip_skip" in over:
            p = p.copy(clip_skip=int(over["clip_skip"]))
        info = self.find(over.get("checkpoint") or ctx.settings.get("sd.sd_model_checkpoint") or None)
        with self._lease(info) as sd:
            self._apply_vae(sd, str(over.get("vae", ctx.settings.get("sd.sd_vae"))))
            run = Run(sd=sd, tools=self.tools(), job=job, tab=tab,
                      preview_every=int(ctx.settings.get("ui.show_progress_every_n_steps")),
                      saver=ImageSaver(ctx.paths.outputs_dir, ctx.callbacks, ctx) if p.save_images else None,
                      scripts=ctx.scripts, lora_dir=ctx.paths.model_dir("Lora"),
                      embeddings_dir=ctx.paths.model_dir("embeddings"),
                      model_name=info.model_name, model_hash=info.shorthash or "",
                      vae_name=getattr(sd, "vae_name", None), device=ctx.devices.device, dtype=ctx.devices.dtype)
            return process_images(run, p)


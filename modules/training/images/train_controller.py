"""The Train tab's image section, without Gradio: base checkpoint, dataset folder (with its preview),
training type, preset and parameters; Start / Stop / Resume; the live view read back from the run folder
(loss points, progress with ETA and it/s, the samples gallery); and "Use in txt2img" for a finished run.

Built like the LLM section (:mod:`modules.training.llm.train_controller`) and for the same reasons: the tab
(``modules/ui/tabs/train_images.py``) only forwards widget values here, so all of it is tested without a
browser; the view is read from ``metrics.jsonl`` and ``samples/`` so a page reload or an earlier session's
run shows the same way; only the live run's job is held in memory (to Stop it).

A run is ONE job of kind ``"training"`` on the device queue ``ctx.jobs`` running
:func:`~modules.training.images.train_command.run_image_training` (the ``lora`` / ``finetune`` commands'
body) in-process, with its base model leased from the model manager (:mod:`modules.training.model_lease`).
The app trains one run at a time, LLM or image (:class:`~modules.training.training_slot.TrainingSlot`).
Stop sets the trainer's ``should_stop`` hook: the run ends after the current step with a checkpoint,
which Resume continues exactly.
"""
from __future__ import annotations

import json
import logging
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.training.checkpoints import list_checkpoints
from modules.training.config import ConfigError
from modules.training.images.config import MODES, PRESETS, ImageTrainConfig, base_problems, load_image_config
from modules.training.metrics import read_metrics
from modules.training.run_dir import RunDirError, default_run_name, is_image_run, open_run_dir, training_root
from modules.training.training_slot import TrainingBusy, TrainingSlot

log = logging.getLogger(__name__)

#: the parameters the tab shows (ImageTrainConfig keys); everything else goes in "more config keys"
PARAMETERS = ("rank", "alpha", "unet_lr", "text_encoder_lr", "train_text_encoder", "lr_scheduler", "warmup_steps",
              "max_steps", "batch_size", "gradient_accumulation", "resolution", "seed", "sample_prompts",
              "sample_every", "sample_steps", "save_every_steps", "output_name")
#: a new run trains this long unless the form says otherwise (the config itself has no default length)
DEFAULT_MAX_STEPS = 1000
SAMPLE_FILE = re.compile(r"step-(\d+)-(\d+)\.png$")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class ImageTrainTabError(ValueError):
    """An image-section action that cannot be done; the message says what to do."""


@dataclass
class ImageRunView:
    """What the tab shows for one run. ``loss``: ``{"step", "loss"}`` rows; ``samples``: (path, caption),
    newest first."""
    run: str | None
    status: str
    live: bool
    step: int = 0
    total_steps: int = 0
    fraction: float = 0.0
    eta_s: float | None = None
    it_s: float | None = None
    loss: list[dict] = field(default_factory=list)
    samples: list[tuple[str, str]] = field(default_factory=list)
    #: what the run trains ("lora of tiny-sd15, rank 4, 64 px, peak 900 MB")
    detail: str = ""

    @property
    def progress_line(self) -> str:
        if not self.total_steps:
            return self.status
        speed = "" if self.it_s is None else f", {self.it_s:.2f} it/s"
        eta = "" if self.eta_s is None else f", ETA {format_seconds(self.eta_s)}"
        return f"{self.status} — step {self.step}/{self.total_steps} ({self.fraction:.0%}){speed}{eta}"


@dataclass(frozen=True)
class Txt2imgUse:
    """What "Use in txt2img" puts into the txt2img tab: text for the prompt (``<lora:name:1>``; empty for a
    fine-tuned checkpoint) and the checkpoint to select (its title in the txt2img list), with a message."""
    prompt: str
    checkpoint: str | None
    message: str


@dataclass
class _Active:
    run: str
    job: Any
    stop: threading.Event


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


class ImageTrainController:
    """One per app (``ctx.training_images``); safe to call from several UI sessions at once."""

    def __init__(self, ctx: Any, slot: TrainingSlot | None = None):
        self.ctx = ctx
        #: one training at a time, shared with the LLM section
        self.slot = slot or TrainingSlot()
        self._lock = threading.Lock()
        self._active: _Active | None = None

    # ---------------------------------------------------------------------------------- folders and lists
    @property
    def data_dir(self) -> Path:
        return Path(self.ctx.paths.data_dir)

    @property
    def runs_dir(self) -> Path:
        return training_root(self.data_dir)

    @property
    def datasets_dir(self) -> Path:
        """Where image datasets are listed from: ``<data-dir>/datasets/<name>/`` (kohya ``N_concept``
        folders or images with captions); any other folder can be typed as a path."""
        return self.data_dir / "datasets"

    @property
    def ckpt_dir(self) -> Path:
        return self.ctx.paths.model_dir("Stable-diffusion")

    def base_choices(self) -> list[tuple[str, str]]:
        """(label, name) of the checkpoints a run can start from: every readable SD 1.x / 2.x / XL checkpoint
        of models/Stable-diffusion, not inpainting ones (their UNet takes a mask), not pickles unless the app
        runs with --allow-unsafe-pickle."""
        from modules.diffusion.checkpoints import list_checkpoints as list_sd
        allow_pickle = bool(getattr(self.ctx.opts, "allow_unsafe_pickle", False))
        out = []
        for info in list_sd(self.ckpt_dir, compute_hashes=False):
            if info.error or info.is_inpaint or info.kind is None or (info.is_pickle and not allow_pickle):
                continue
            out.append((f"{info.model_name} ({info.kind})", info.model_name))
        return out

    def dataset_choices(self) -> list[str]:
        """Folders of ``<data-dir>/datasets/`` that hold images (directly or in ``N_concept`` folders)."""
        if not self.datasets_dir.is_dir():
            return []
        return sorted(p.name for p in self.datasets_dir.iterdir()
                      if p.is_dir() and not p.name.startswith(".") and _has_images(p))

    @staticmethod
    def type_choices() -> list[str]:
        """The training types the image trainer has (its config's MODES: lora, finetune, ...)."""
        return list(MODES)

    @staticmethod
    def preset_choices() -> list[str]:
        return ["", *PRESETS]

    @staticmethod
    def defaults(preset: str = "") -> dict[str, Any]:
        """The tab's parameters: ImageTrainConfig's defaults with the preset's values over them (choosing a
        preset in the tab fills the form with these, so what is shown is what trains)."""
        config = ImageTrainConfig()
        values = {name: getattr(config, name) for name in PARAMETERS}
        values["max_steps"] = DEFAULT_MAX_STEPS
        values.update({k: v for k, v in PRESETS.get(preset or "", {}).items() if k in values})
        return values

    def run_choices(self) -> list[str]:
        """Image run folders of ``<data-dir>/training/`` (newest first)."""
        if not self.runs_dir.is_dir():
            return []
        runs = [p for p in self.runs_dir.iterdir() if p.is_dir() and is_image_run(p)]
        return [p.name for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]

    def dataset_path(self, dataset: str) -> Path:
        """A listed dataset name, or a typed path (absolute, ``~``, or relative to the data dir)."""
        text = (dataset or "").strip()
        path = Path(text).expanduser()
        if path.is_absolute():
            return path
        for candidate in (self.datasets_dir / text, self.data_dir / text):
            if candidate.is_dir():
                return candidate.resolve()
        return (self.datasets_dir / text).resolve()

    # ---------------------------------------------------------------------------------- preview
    def preview(self, dataset: str, *, resolution: int = 512, enable_bucket: bool = True, batch_size: int = 1):
        """The dataset preview (:func:`~modules.training.images.preview.preview_dataset`) with the run's
        bucket settings; a dataset that cannot be trained on carries ``error``."""
        from modules.training.images.buckets import BucketSpec
        from modules.training.images.preview import preview_dataset
        if not (dataset or "").strip():
            raise ImageTrainTabError(f"Pick a dataset folder (from {self.datasets_dir}) or type the path of one.")
        path = self.dataset_path(dataset)
        if not path.is_dir():
            raise ImageTrainTabError(f"Dataset {dataset!r}: {path} is not a folder; pick one from the list "
                                     f"({self.datasets_dir}) or type the path of a folder of images.")
        resolution = int(resolution or 512)
        if resolution < 64 or resolution % 64:
            raise ImageTrainTabError(f"resolution must be a multiple of 64, got {resolution}; try "
                                     f"{max(64, round(resolution / 64) * 64)}")
        return preview_dataset(path, buckets=BucketSpec(resolution=resolution, enabled=bool(enable_bucket)),
                               batch_size=int(batch_size or 1))

    @staticmethod
    def describe_preview(preview) -> str:
        """The preview as Markdown: counts, buckets, skipped files and warnings (each by name)."""
        lines = []
        if preview.error:
            lines.append(f"**Cannot train on this folder:** {preview.error}")
        lines.append(f"**{preview.image_count} images** ({preview.images_per_epoch} samples per epoch with repeats) "
                     f"in {len(preview.concepts)} concept folder(s): " + ", ".join(
                         f"`{c['folder']}` ({c['images']} images x {c['repeats']}, {c['captioned']} captioned)"
                         for c in preview.concepts))
        if preview.buckets:
            lines.append("Buckets: " + ", ".join(f"{b['width']}x{b['height']}: {b['count']} images"
                                                 for b in preview.buckets))
        for item in preview.skipped:
            lines.append(f"- skipped `{item['path']}`: {item['reason']}")
        for item in preview.warnings:
            lines.append(f"- warning `{item['path']}`: {item['reason']}")
        return "\n\n".join(lines)

    # ---------------------------------------------------------------------------------- start / stop
    def running(self) -> str | None:
        """The image run this app is training now (or has queued), else None."""
        with self._lock:
            active = self._active
            return active.run if active is not None and not active.job.done else None

    def start(self, *, base: str, dataset: str, mode: str = "lora", preset: str = "",
              params: dict[str, Any] | None = None, run_name: str = "", extra: list[str] | None = None) -> str:
        """Check the form (every problem at once), then queue the run as one training job; returns its name."""
        run_name = (run_name or "").strip() or default_run_name(mode or "lora")
        overrides = [f"mode={mode}", _override("preset", preset or "")]
        if (base or "").strip():
            overrides.append(_override("base_model", base.strip()))
        if (dataset or "").strip():
            overrides.append(_override("dataset", str(self.dataset_path(dataset))))
        overrides.append(_override("run_name", run_name))
        for key, value in (params or {}).items():
            if key == "sample_prompts" and isinstance(value, str):
                value = [line.strip() for line in value.splitlines() if line.strip()]
            if value is None or (value == "" and key != "output_name"):
                continue
            overrides.append(_override(key, value))
        overrides += list(extra or [])
        problems: list[str] = []
        try:
            config = load_image_config(None, overrides)
        except ConfigError as exc:
            problems += exc.problems
            config = None
        if self.slot.running():          # said first: whatever else the form has, this blocks it
            problems.insert(0, f"A training is running: {self.slot.running()}; Stop it (or wait for it to finish) "
                               "before starting another")
        if config is not None:
            problems += self._base_problems(config) + self._output_problems(config)
            problems += self._dataset_problems(config)
        if (self.runs_dir / run_name).exists():
            problems.append(f"A run named {run_name!r} already exists; Resume it, or give another run name")
        if problems:
            raise ImageTrainTabError(str(ConfigError(problems, "from the Train tab")))
        return self._submit(run_name, overrides, mode=config.mode, resume=None, config=config)

    def resume(self, run: str, *, extra: list[str] | None = None) -> str:
        """Continue ``run`` from its latest checkpoint (``extra``: e.g. ``max_steps=`` to train longer)."""
        if not run:
            raise ImageTrainTabError("Pick the run to resume.")
        if not _plain_name(run):
            raise ImageTrainTabError(f"{run!r} is not a run name; pick one from the list.")
        try:
            run_dir = open_run_dir(self.runs_dir / run)
            saved = run_dir.read_config()
        except RunDirError as exc:
            raise ImageTrainTabError(str(exc)) from None
        if not is_image_run(run_dir.root):
            raise ImageTrainTabError(f"{run!r} is an LLM run; resume it in the Train tab's LLM section.")
        if not list_checkpoints(run_dir.checkpoints):
            raise ImageTrainTabError(f"Run {run!r} has no checkpoint to resume from; start a new run instead.")
        try:
            config = load_image_config(None, list(extra or []), base=saved)
        except ConfigError as exc:
            raise ImageTrainTabError(str(exc)) from None
        return self._submit(run, list(extra or []), mode=config.mode, resume=str(run_dir.root), config=config)

    def stop(self) -> str:
        """Ask the live image run to stop after its current step, with a checkpoint."""
        with self._lock:
            active = self._active
        if active is None or active.job.done:
            return "No image training is running."
        active.stop.set()
        return f"Stopping {active.run} after the current step (a checkpoint is saved; Resume continues it)."

    def wait(self, timeout: float | None = None) -> Any:
        """The live run's result (for tests and scripts); None when nothing was started."""
        with self._lock:
            active = self._active
        return None if active is None else active.job.result(timeout)

    def _base_problems(self, config: ImageTrainConfig) -> list[str]:
        """The base checkpoint exists and fits the settings (read from its header; nothing is loaded)."""
        if config.init == "random" or not config.base_model:
            return []
        from modules.training.images.base_model import find_base
        try:
            info = find_base(config.base_model, self.ckpt_dir)
        except ConfigError as exc:
            return exc.problems
        if info.is_inpaint:
            return [f"base_model {info.name} is an inpainting checkpoint (its UNet takes a mask); pick a plain one"]
        return base_problems(config, info.kind, info.name) if info.kind else []

    def _output_problems(self, config: ImageTrainConfig) -> list[str]:
        """Nothing the user made is overwritten: the LoRA / checkpoint file must not exist yet."""
        name = config.output_name or config.run_name
        if config.mode == "finetune":
            taken = [self.ckpt_dir / f"{name}.safetensors", self.ckpt_dir / name]
        else:
            taken = [self.ctx.paths.model_dir("Lora") / f"{name}.safetensors"] \
                if "kohya" in config.output_formats else []
        return [f"{path} exists already and is never overwritten; give another output name (or run name)"
                for path in taken if path.exists()]

    @staticmethod
    def _dataset_problems(config: ImageTrainConfig) -> list[str]:
        """What the trainer would stop on at its first step: no usable image in the folder."""
        from modules.training.images.buckets import BucketSpec
        from modules.training.images.dataset import scan_dataset
        if not Path(config.dataset).is_dir():
            return []                                  # the config check said so already
        spec = BucketSpec(resolution=config.resolution, min_side=config.min_bucket_reso,
                          max_side=config.max_bucket_reso, enabled=config.enable_bucket)
        error = scan_dataset(config.dataset, spec).error
        return [f"dataset {config.dataset}: {error}"] if error else []

    def _submit(self, run: str, overrides: list[str], *, mode: str, resume: str | None,
                config: ImageTrainConfig) -> str:
        from modules.training.images.train_command import run_image_training
        from modules.training.model_lease import manager_base_lease
        full = (("unet", "text_encoder", "text_encoder_2") if config.train_text_encoder else ("unet",)) \
            if mode == "finetune" else ()
        with self._lock:
            stop = threading.Event()

            def work(job):
                def on_log(record: dict) -> None:
                    if record.get("kind") == "train":
                        job.progress.text = f"{run}: loss {record['loss']:.4f}"
                        job.progress.step, job.progress.total = record["step"], record["total_steps"]

                leases: list = []
                try:
                    result = run_image_training(None, overrides, data_dir=self.data_dir, mode=mode, resume=resume,
                                                should_stop=lambda: stop.is_set() or job.interrupted,
                                                on_log=on_log,
                                                base_lease=manager_base_lease(self.ctx.models, run, leases,
                                                                              full=full))
                finally:
                    for lease in leases:            # the model leaves the manager with the run
                        lease.release()
                        self.ctx.models.unload(lease.key)
                if result.finished:
                    self._refresh_lists()           # the new LoRA / checkpoint is listed with no restart
                return result

            try:
                job = self.slot.submit(f"image run {run!r}", lambda: self.ctx.jobs.submit(
                    work, name=f"training {run}", kind="training"))
            except TrainingBusy as exc:
                raise ImageTrainTabError(str(exc)) from None
            self._active = _Active(run, job, stop)
        return run

    def _refresh_lists(self) -> None:
        """Rescan the lists txt2img and /sdapi/v1/loras serve (the diffusion service caches them)."""
        if self.ctx.diffusion is not None:
            self.ctx.diffusion.loras(refresh=True)
            self.ctx.diffusion.checkpoints(refresh=True)

    # ---------------------------------------------------------------------------------- live state
    def current_run(self) -> str | None:
        """The run to show on page load: the live one, else the newest image run."""
        live = self.running()
        if live:
            return live
        runs = self.run_choices()
        return runs[0] if runs else None

    def _config(self, run: str) -> dict:
        try:
            return open_run_dir(self.runs_dir / run).read_config()
        except RunDirError:
            return {}

    def view(self, run: str | None) -> ImageRunView:
        """Status, progress, loss points and samples of ``run``, read from its folder."""
        if not run:
            return ImageRunView(None, "No image run yet: pick a base and a dataset, then Start.", live=False)
        folder = self.runs_dir / run
        with self._lock:
            active = self._active if self._active is not None and self._active.run == run else None
        live = active is not None and not active.job.done
        if not _plain_name(run) or not ((folder / "config.yaml").is_file() or live):
            return ImageRunView(None, f"There is no image run {run!r} in {self.runs_dir}; pick one from the list.",
                                live=False)
        config = self._config(run)
        steps = [r for r in read_metrics(folder / "metrics.jsonl") if r.get("kind") == "train"]
        view = ImageRunView(run, "", live)
        view.loss = [{"step": r["step"], "loss": _num(r.get("loss"))} for r in steps]
        view.step = steps[-1]["step"] if steps else 0
        view.total_steps = int(steps[-1].get("total_steps") or 0) if steps else int(config.get("max_steps") or 0)
        view.fraction = min(1.0, view.step / view.total_steps) if view.total_steps else 0.0
        recent = [r for r in steps[-20:] if r.get("it_s")]
        if recent:
            view.it_s = len(recent) / sum(1 / float(r["it_s"]) for r in recent)
        if live and active.job.started is not None:
            view.eta_s = _eta([r for r in steps if (r.get("time") or 0) >= active.job.started], view.total_steps)
        view.samples = self._samples(folder, config)
        view.detail = _detail(config, steps)
        view.status = self._status(run, config, view, active, live)
        return view

    def _samples(self, folder: Path, config: dict) -> list[tuple[str, str]]:
        prompts = config.get("sample_prompts") or []
        found = []
        for path in (folder / "samples").glob("step-*.png"):
            match = SAMPLE_FILE.search(path.name)
            if match:
                step, number = int(match.group(1)), int(match.group(2))
                prompt = prompts[number] if number < len(prompts) else ""
                found.append(((step, number), str(path), f"step {step}: {prompt}"))
        return [(path, caption) for _, path, caption in sorted(found, key=lambda f: (-f[0][0], f[0][1]))]

    def _status(self, run: str, config: dict, view: ImageRunView, active: _Active | None, live: bool) -> str:
        if live:
            if active.job.state == "queued":
                return f"{run}: waiting in the device queue behind other jobs"
            return f"{run}: stopping after this step" if active.stop.is_set() else f"{run}: training"
        if active is not None and active.job.error is not None:
            return f"{run}: failed — {active.job.error}"
        output = self._output(config)
        if output is not None and view.total_steps and view.step >= view.total_steps:
            return f"{run}: finished ({output.name} is ready: Use in txt2img)"
        if list_checkpoints(self.runs_dir / run / "checkpoints"):
            return f"{run}: stopped (Resume continues from the latest checkpoint)"
        return f"{run}: not started"

    def _output(self, config: dict) -> Path | None:
        """The file the finished run wrote: its LoRA in models/Lora, or its checkpoint in
        models/Stable-diffusion (None while it has not written one)."""
        name = config.get("output_name") or config.get("run_name")
        if not name:
            return None
        lora = self.ctx.paths.model_dir("Lora") / f"{name}.safetensors"
        checkpoint = self.ckpt_dir / f"{name}.safetensors"
        candidates = [checkpoint] if config.get("mode") == "finetune" else [lora, checkpoint]
        return next((p for p in candidates if p.is_file()), None)

    # ---------------------------------------------------------------------------------- use the result
    def use_in_txt2img(self, run: str) -> Txt2imgUse:
        """What the finished ``run`` puts into txt2img: ``<lora:name:1>`` and the base it was trained on for a
        LoRA, the new checkpoint for a fine-tune. The lists txt2img and the API serve are rescanned first, so
        the new file is there with no restart."""
        if not run or not _plain_name(run):
            raise ImageTrainTabError("Pick a finished image run first.")
        if self.running() == run:
            raise ImageTrainTabError(f"{run} is still training; its file is written when it finishes.")
        config = self._config(run)
        if not config:
            raise ImageTrainTabError(f"There is no image run {run!r} in {self.runs_dir}; pick one from the list.")
        output = self._output(config)
        view = self.view(run)
        if output is None:
            raise ImageTrainTabError(f"{run} has not written its result yet (step {view.step} of "
                                     f"{view.total_steps}); Resume it to the end first.")
        self._refresh_lists()
        if output.parent == self.ctx.paths.model_dir("Lora"):
            from modules.diffusion.lora import find_lora, list_loras
            infos = self.ctx.diffusion.loras() if self.ctx.diffusion is not None else list_loras(output.parent)
            info = find_lora(infos, output.stem)
            if info is None or info.error:
                raise ImageTrainTabError(f"{output} cannot be read as a LoRA"
                                         f"{': ' + info.error if info is not None else ''}.")
            base = self._checkpoint_title(config.get("base_model") or "")
            on = f" on {base}" if base else ""
            return Txt2imgUse(f"<lora:{output.stem}:1>", base,
                              f"Added <lora:{output.stem}:1> to the txt2img prompt{on} (the model it was trained on).")
        title = self._checkpoint_title(str(output))
        return Txt2imgUse("", title or output.stem, f"Selected the new checkpoint {title or output.stem} in txt2img.")

    def _checkpoint_title(self, name: str) -> str | None:
        """The txt2img list's title of a checkpoint given by name or path (None when it is not listed)."""
        if not name:
            return None
        from modules.training.images.base_model import find_base
        try:
            info = find_base(name, self.ckpt_dir)
        except ConfigError:
            return None
        if self.ctx.diffusion is not None:
            for listed in self.ctx.diffusion.checkpoints():
                if Path(listed.filename) == Path(info.filename):
                    return listed.title
        return info.title

    def lora_names(self) -> list[str]:
        """The LoRA list as txt2img's ``<lora:…>`` and /sdapi/v1/loras see it."""
        if self.ctx.diffusion is not None:
            return [i.name for i in self.ctx.diffusion.loras() if not i.error]
        from modules.diffusion.lora import list_loras
        return [i.name for i in list_loras(self.ctx.paths.model_dir("Lora")) if not i.error]


def _override(key: str, value: Any) -> str:
    """``key=value`` whose value reads back as exactly this (JSON is YAML: "no" stays a string; the config
    check turns a whole float from a Gradio number into an int)."""
    return f"{key}={json.dumps(value)}"


def _has_images(folder: Path, depth: int = 2) -> bool:
    try:
        children = list(folder.iterdir())
    except OSError:
        return False
    if any(c.is_file() and c.suffix.lower() in IMAGE_SUFFIXES for c in children):
        return True
    return depth > 1 and any(c.is_dir() and _has_images(c, depth - 1) for c in children)


def _plain_name(name: str) -> bool:
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def _num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _eta(steps: list[dict], total: int) -> float | None:
    """Seconds left, from the wall time per step over the last logged steps of this session."""
    recent = [r for r in steps[-20:] if r.get("time") is not None]
    if len(recent) < 2 or not total:
        return None
    first, last = recent[0], recent[-1]
    done = last["step"] - first["step"]
    if done <= 0:
        return None
    return max(0.0, (last["time"] - first["time"]) / done * (total - last["step"]))


def _detail(config: dict, steps: list[dict]) -> str:
    parts = []
    if config.get("mode"):
        base = Path(str(config.get("base_model") or "random init")).name
        parts.append(f"{config['mode']} of {base}")
    if config.get("mode") != "finetune" and config.get("rank"):
        parts.append(f"rank {config['rank']}")
    if config.get("resolution"):
        parts.append(f"{config['resolution']} px")
    if steps and steps[-1].get("peak_memory_mb"):
        parts.append(f"peak {steps[-1]['peak_memory_mb']:.0f} MB")
    return ", ".join(parts)

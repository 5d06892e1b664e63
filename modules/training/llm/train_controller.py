"""The Train tab's LLM section, without Gradio: data, size, hyper-parameters, Start / Stop / Resume, live
state read back from ``metrics.jsonl``, and the checkpoints of a run with "Load in Chat" and "Evaluate".

The tab (``modules/ui/tabs/train.py``) only builds widgets and forwards their values here by name, so all
of this is tested without a browser (``tests/training/test_train_controller.py``).

Why the state is read from the run folder and not from memory: a page reload (or a second browser) must
bring the plots and the progress back, and a run folder from an earlier session must show the same way.
The only thing held in memory is the job of the run that this app is training now (to Stop it and to
refuse a second Start).

A run is ONE job of kind ``"training"`` on the device queue ``ctx.jobs``: chats and image jobs submitted
meanwhile wait behind it (the tab says so, :data:`QUEUE_NOTE`). Stop sets the trainer's ``should_stop``
hook: the run ends after the current optimizer step with a checkpoint, which Resume continues exactly.
"""
from __future__ import annotations

import logging
import shutil
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from modules.training.checkpoints import list_checkpoints, read_marker
from modules.training.config import ConfigError, PretrainConfig, load_config
from modules.training.metrics import read_metrics
from modules.training.run_dir import RunDirError, default_run_name, is_image_run, open_run_dir, training_root
from modules.training.training_slot import TrainingBusy, TrainingSlot

log = logging.getLogger(__name__)

QUEUE_NOTE = ("Training runs as one job on the device queue, with its model held by the model manager (idle "
              "models are unloaded first when memory is short): while training runs, chats and image jobs wait "
              "in the queue until it finishes or is stopped.")
#: what the tab offers to prepare a dataset from
TEXT_SUFFIXES = (".txt", ".md", ".py", ".jsonl")
#: folders of the data dir that hold Atelier's own files, never training text ...
ATELIER_FOLDERS = {"training", "models", "outputs", "logs", "cache", "tmp", "extensions", "chats"}
#: ... and folders skipped at any depth
SKIPPED_FOLDERS = {"node_modules", "__pycache__", "venv"}
MAX_LISTED_FILES = 500
#: the hyper-parameters the tab shows, all with PretrainConfig's defaults (TinyLlama's recipe)
HYPER_PARAMETERS = ("seq_len", "micro_batch", "global_batch_tokens", "lr", "min_lr", "warmup_steps", "max_steps",
                    "weight_decay", "grad_clip", "eval_every", "log_every", "save_every_tokens", "seed", "compile")
#: the tab's model sizes: a preset of modules.llm.config.PRESETS with LlamaConfig fields overridden. The
#: vocabulary always comes from the dataset's tokenizer, so the counts below are for a 4096-piece one.
SIZES: dict[str, tuple[str, dict[str, int]]] = {
    "tiny-gqa": ("tiny-gqa", {}),                                           # ~0.4M: tests, smoke runs
    "small-5m": ("tiny-gqa", dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4,
                                  num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024)),
    "medium-30m": ("tiny-gqa", dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8,
                                    num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048)),
    "tinyllama-1.1b": ("tinyllama-1.1b", {}),                               # TinyLlama-1.1B's shape
}
#: held-out sequences scored by Evaluate at most (keeps it to seconds on a CPU)
EVAL_MAX_SEQUENCES = 256


class TrainTabError(ValueError):
    """A Train-tab action that cannot be done; the message says what to do."""


@dataclass
class RunView:
    """What the tab shows for one run: status, progress and the plot series (lists of row dicts)."""
    run: str | None
    status: str
    live: bool
    fraction: float = 0.0
    eta_s: float | None = None
    step: int = 0
    total_steps: int = 0
    loss: list[dict] = field(default_factory=list)          # {"step", "loss", "split": train|validation}
    lr: list[dict] = field(default_factory=list)            # {"step", "lr"}
    throughput: list[dict] = field(default_factory=list)    # {"step", "tokens_per_s"}
    mfu: list[dict] = field(default_factory=list)           # {"step", "mfu"} (percent)
    #: what the run trains, from its latest start record ("0.1M parameters, float32 on cpu, ...")
    detail: str = ""

    @property
    def progress_line(self) -> str:
        if not self.total_steps:
            return self.status
        eta = "" if self.eta_s is None else f", ETA {format_seconds(self.eta_s)}"
        return f"{self.status} — step {self.step}/{self.total_steps} ({self.fraction:.0%}){eta}"


@dataclass
class _Active:
    run: str
    run_dir: Path
    job: Any
    stop: threading.Event


def format_seconds(seconds: float) -> str:
    seconds = int(round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h {minutes:02d}m" if hours else f"{minutes}m {secs:02d}s" if minutes else f"{secs}s"


class TrainController:
    """One per app (``ctx.training``); every method is safe to call from several UI sessions at once."""

    def __init__(self, ctx: Any, slot: TrainingSlot | None = None):
        self.ctx = ctx
        #: one training at a time, shared with the image section (:mod:`modules.training.training_slot`)
        self.slot = slot or TrainingSlot()
        self._lock = threading.Lock()
        self._active: _Active | None = None

    # ---------------------------------------------------------------------------------- folders
    @property
    def data_dir(self) -> Path:
        return Path(self.ctx.paths.data_dir)

    @property
    def runs_dir(self) -> Path:
        return training_root(self.data_dir)

    @property
    def datasets_dir(self) -> Path:
        return self.runs_dir / "data"

    def dataset_choices(self) -> list[str]:
        """Prepared datasets: folders of ``<data-dir>/training/data/`` with a ``meta.json``."""
        if not self.datasets_dir.is_dir():
            return []
        return sorted(p.name for p in self.datasets_dir.iterdir() if (p / "meta.json").is_file())

    def source_choices(self) -> list[str]:
        """Text and code files (and the folders holding them) under the data dir, relative to it, to prepare
        a dataset from. Atelier's own folders (models, outputs, training runs) and hidden ones are left out."""
        found: list[str] = []
        folders: set[str] = set()
        root = self.data_dir
        stack = [root]
        while stack and len(found) < MAX_LISTED_FILES:
            folder = stack.pop()
            try:
                children = sorted(folder.iterdir())
            except OSError:
                continue
            for child in children:
                if child.name.startswith("."):
                    continue
                if child.is_dir():
                    if not (folder == root and child.name in ATELIER_FOLDERS) and child.name not in SKIPPED_FOLDERS:
                        stack.append(child)
                elif child.suffix in TEXT_SUFFIXES:
                    rel = child.relative_to(root)
                    found.append(str(rel))
                    if rel.parent != Path("."):
                        folders.add(str(rel.parent) + "/")
        return sorted(folders) + sorted(found)

    @staticmethod
    def size_choices() -> list[str]:
        return list(SIZES)

    def size_overrides(self, size: str, dataset: str | None = None) -> list[str]:
        """``model_preset=`` and ``model.*=`` overrides of a size; the vocabulary is the dataset's."""
        if size not in SIZES:
            raise TrainTabError(f"Unknown size {size!r}; pick one of {', '.join(SIZES)}.")
        preset, fields = SIZES[size]
        out = [f"model_preset={preset}", *(f"model.{k}={v}" for k, v in fields.items())]
        meta = self._dataset_meta(dataset) if dataset else None
        if meta is not None:
            out.append(f"model.vocab_size={int(meta['vocab_size'])}")
        return out

    def size_note(self, size: str, dataset: str | None = None) -> str:
        """The exact parameter count of ``size`` with the dataset's vocabulary (built on the meta device)."""
        import torch

        from modules.llm.config import LlamaConfig
        from modules.llm.model import Llama
        if size not in SIZES:
            return f"Unknown size {size!r}; pick one of {', '.join(SIZES)}."
        preset, fields = SIZES[size]
        meta = self._dataset_meta(dataset) if dataset else None
        vocab = {"vocab_size": int(meta["vocab_size"])} if meta is not None else {}
        config = LlamaConfig.from_name(preset, **{**fields, **vocab})
        with torch.device("meta"):
            parameters = sum(p.numel() for p in Llama(config).parameters())
        return (f"{size}: {parameters / 1e6:.1f}M parameters ({config.num_hidden_layers} layers, width "
                f"{config.hidden_size}, {config.num_attention_heads} heads / {config.num_key_value_heads} KV heads, "
                f"vocabulary {config.vocab_size})")

    def _dataset_meta(self, dataset: str) -> dict | None:
        import json
        try:
            return json.loads((self.datasets_dir / dataset / "meta.json").read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return None

    def model_choices(self) -> list[str]:
        """Existing models to continue from (folders of models/LLM)."""
        return self.ctx.llm.model_names() if self.ctx.llm is not None else []

    def run_choices(self) -> list[str]:
        """LLM run folders (newest first): the ones with a config.yaml (image runs are the image section's)."""
        if not self.runs_dir.is_dir():
            return []
        runs = [p for p in self.runs_dir.iterdir() if p.is_dir() and (p / "config.yaml").is_file()
                and not is_image_run(p)]
        return [p.name for p in sorted(runs, key=lambda p: p.stat().st_mtime, reverse=True)]

    @staticmethod
    def defaults() -> dict[str, Any]:
        """The hyper-parameters' defaults, from PretrainConfig (one definition). max_steps has none there
        (a run must say how long it trains); the tab starts from a short run."""
        config = PretrainConfig()
        values = {name: getattr(config, name) for name in HYPER_PARAMETERS}
        values["max_steps"] = 1000
        return values

    # ---------------------------------------------------------------------------------- prepare
    def prepare_dataset(self, name: str, sources: list[str], *, vocab_size: int = 4096, seq_len: int = 256,
                        val_fraction: float = 0.05) -> str:
        """Tokenizer + packed dataset from files/folders under the data dir (prepare-data's code); returns a
        summary line. Runs on the device queue like training (it is CPU-heavy)."""
        from modules.training.llm.data_config import DataConfigError, validate
        from modules.training.llm.documents import DataError
        from modules.training.llm.prepare_data import prepare
        from modules.training.llm.tokenizer_train import TokenizerTrainingError
        if not sources:
            raise TrainTabError("Pick at least one file or folder to prepare a dataset from.")
        if self.slot.running():
            raise TrainTabError(f"A training run is using the device ({self.slot.running()}); prepare the dataset "
                                "when it has finished or been stopped.")
        paths = []
        for item in sources:
            path = (self.data_dir / item).resolve()
            if not path.exists():
                raise TrainTabError(f"{item} does not exist under the data dir {self.data_dir}; refresh the list.")
            paths.append(str(path / "**" / "*") if path.is_dir() else str(path))
        raw = {"name": (name or "").strip(), "seq_len": int(seq_len), "val_fraction": float(val_fraction),
               "tokenizer": {"vocab_size": int(vocab_size)},
               "sources": [{"name": "text", "paths": paths}]}
        try:
            config = validate(raw, where="the dataset form")
            summary = self.ctx.jobs.submit(lambda job: prepare(config, self.ctx.paths), name="prepare-data",
                                           kind="training").result()
        except (DataConfigError, DataError, TokenizerTrainingError) as exc:
            raise TrainTabError(str(exc)) from None
        return f"Dataset {config.name!r}: {summary['tokens']} tokens in {summary['dataset']}"

    # ---------------------------------------------------------------------------------- start / stop
    def running(self) -> str | None:
        """The run this app is training now (or has queued), else None."""
        with self._lock:
            active = self._active
            return active.run if active is not None and not active.job.done else None

    def start(self, *, dataset: str, size: str = "", init_from: str = "", run_name: str = "",
              hyper: dict[str, Any] | None = None, extra: list[str] | None = None) -> str:
        """Validate the form into a config, then queue the run as one training job; returns the run name."""
        if not dataset:
            raise TrainTabError("Pick a prepared dataset first (or prepare one from files under the data dir).")
        data_path = self.datasets_dir / dataset
        meta = self._dataset_meta(dataset)
        if meta is None:
            raise TrainTabError(f"Dataset {dataset!r} is not in {self.datasets_dir}; refresh the list.")
        run_name = (run_name or "").strip() or default_run_name()
        if not _plain_name(run_name):
            raise TrainTabError(f"Run name {run_name!r} must be a plain folder name (no '/', no leading '.').")
        # the dataset's sequences fix the context trained on
        hyper = {**(hyper or {}), "seq_len": int(meta["seq_len"])}
        overrides = [f"data={data_path}", f"run_name={run_name}"]
        if init_from:
            folder = self.ctx.llm.models_dir / init_from if self.ctx.llm is not None else Path(init_from)
            if not (folder / "config.json").is_file():
                raise TrainTabError(f"Model {init_from!r} is not an HF folder in models/LLM; refresh the list.")
            overrides.append(f"init_from={folder}")
        else:
            overrides += self.size_overrides(size or "tiny-gqa", dataset)
        overrides += [f"{k}={v}" for k, v in hyper.items() if v is not None and v != ""]
        overrides += list(extra or [])
        self._check_config(overrides)
        if (self.runs_dir / run_name).exists():
            raise TrainTabError(f"A run named {run_name!r} already exists; Resume it, or give another run name.")
        return self._submit(run_name, self.runs_dir / run_name, overrides, resume=None)

    def resume(self, run: str, *, extra: list[str] | None = None) -> str:
        """Continue ``run`` from its latest checkpoint (``extra``: e.g. ``max_steps=`` to train longer)."""
        if not run:
            raise TrainTabError("Pick the run to resume.")
        if not _plain_name(run):
            raise TrainTabError(f"{run!r} is not a run name; pick one from the list.")
        try:
            run_dir = open_run_dir(self.runs_dir / run)
        except RunDirError as exc:
            raise TrainTabError(str(exc)) from None
        if not list_checkpoints(run_dir.checkpoints):
            raise TrainTabError(f"Run {run!r} has no checkpoint to resume from; start a new run instead.")
        self._check_config(list(extra or []), base=run_dir.read_config())
        return self._submit(run, run_dir.root, list(extra or []), resume=str(run_dir.root))

    def stop(self) -> str:
        """Ask the live run to stop after its current step, with a checkpoint."""
        with self._lock:
            active = self._active
        if active is None or active.job.done:
            return "No training run is running."
        active.stop.set()
        return f"Stopping {active.run} after the current step (a checkpoint is saved; Resume continues it)."

    def wait(self, timeout: float | None = None) -> Any:
        """The live run's result (for tests and scripts); None when nothing runs."""
        with self._lock:
            active = self._active
        return None if active is None else active.job.result(timeout)

    def _check_config(self, overrides: list[str], base: dict | None = None) -> PretrainConfig:
        try:
            return load_config(None, overrides, base=base)
        except ConfigError as exc:
            raise TrainTabError(str(exc)) from None

    def _submit(self, run: str, run_dir: Path, overrides: list[str], *, resume: str | None) -> str:
        from modules.training.llm.pretrain_command import run_pretrain
        from modules.training.model_lease import manager_lease
        with self._lock:
            stop = threading.Event()

            def work(job):
                def on_log(record: dict) -> None:
                    if record.get("kind") == "train":
                        job.progress.text = f"{run}: loss {record['loss']:.4f}"
                        job.progress.step, job.progress.total = record["step"], record["total_steps"]

                leases: list = []
                try:
                    return run_pretrain(None, overrides, data_dir=self.data_dir, resume=resume, on_log=on_log,
                                        should_stop=lambda: stop.is_set() or job.interrupted,
                                        model_lease=manager_lease(self.ctx.models, run, leases))
                finally:
                    for lease in leases:            # the model leaves the manager with the run
                        lease.release()
                        self.ctx.models.unload(lease.key)

            try:
                job = self.slot.submit(f"LLM run {run!r}", lambda: self.ctx.jobs.submit(
                    work, name=f"training {run}", kind="training"))
            except TrainingBusy as exc:
                raise TrainTabError(str(exc)) from None
            self._active = _Active(run, run_dir, job, stop)
        return run

    # ---------------------------------------------------------------------------------- live state
    def current_run(self) -> str | None:
        """The run to show on page load: the live one, else the newest run folder."""
        live = self.running()
        if live:
            return live
        runs = self.run_choices()
        return runs[0] if runs else None

    def view(self, run: str | None) -> RunView:
        """Status, progress and plot series of ``run``, read from its metrics.jsonl."""
        if not run:
            return RunView(None, "No run yet: pick a dataset and a size, then Start.", live=False)
        if not _plain_name(run) or not ((self.runs_dir / run / "config.yaml").is_file() or self.running() == run):
            return RunView(None, f"There is no run {run!r} in {self.runs_dir}; pick one from the list.", live=False)
        run_dir = self.runs_dir / run
        records = read_metrics(run_dir / "metrics.jsonl")
        with self._lock:
            active = self._active if self._active is not None and self._active.run == run else None
        live = active is not None and not active.job.done
        view = RunView(run, "", live)
        total = 0
        for r in records:
            kind = r.get("kind")
            if kind == "start":
                total = int(r.get("total_steps") or total)
                view.detail = _detail(r)
            elif kind == "train":
                view.loss.append({"step": r["step"], "loss": _num(r.get("loss")), "split": "train"})
                view.lr.append({"step": r["step"], "lr": _num(r.get("lr"))})
                view.throughput.append({"step": r["step"], "tokens_per_s": _num(r.get("tokens_per_s"))})
                if r.get("mfu") is not None:
                    view.mfu.append({"step": r["step"], "mfu": 100 * _num(r["mfu"])})
            elif kind == "val":
                view.loss.append({"step": r["step"], "loss": _num(r.get("val_loss")), "split": "validation"})
        steps = [r for r in records if r.get("kind") == "train"]
        starts = [i for i, r in enumerate(records) if r.get("kind") == "start"]
        this_session = [r for r in records[starts[-1]:] if r.get("kind") == "train"] if starts else steps
        view.step = steps[-1]["step"] if steps else 0
        view.total_steps = total
        view.fraction = min(1.0, view.step / total) if total else 0.0
        view.eta_s = _eta(this_session, total) if live else None
        view.status = self._status(run, run_dir, records, active, live)
        return view

    def _status(self, run: str, run_dir: Path, records: list[dict], active: _Active | None, live: bool) -> str:
        if live:
            if active.job.state == "queued":
                return f"{run}: waiting in the device queue behind other jobs"
            return f"{run}: stopping after this step" if active.stop.is_set() else f"{run}: training"
        if active is not None and active.job.error is not None:
            return f"{run}: failed — {active.job.error}"
        if (run_dir / "final" / "config.json").is_file() and any(r.get("kind") == "end" for r in records):
            return f"{run}: finished (final/ is ready for Load in Chat)"
        if list_checkpoints(run_dir / "checkpoints"):
            return f"{run}: stopped (Resume continues from the latest checkpoint)"
        return f"{run}: not started"

    # ---------------------------------------------------------------------------------- checkpoints
    def checkpoints(self, run: str | None) -> list[dict]:
        """Rows of the checkpoints table: ``final`` first when there is one, then checkpoints newest first,
        each with its last held-out perplexity when it was evaluated."""
        if not run or not _plain_name(run):
            return []
        run_dir = self.runs_dir / run
        rows = []
        if (run_dir / "final" / "config.json").is_file():
            rows.append({"name": "final", "step": _final_step(run_dir), "tokens": None})
        for folder in reversed(list_checkpoints(run_dir / "checkpoints")):
            marker = read_marker(folder)
            rows.append({"name": folder.name, "step": marker.get("step"), "tokens": marker.get("tokens")})
        for row in rows:
            row["ppl"] = _last_ppl(run_dir / "eval" / f"{row['name']}.json")
        return rows

    def _checkpoint_folder(self, run: str, name: str) -> Path:
        if not run or not name:
            raise TrainTabError("Pick a run and one of its checkpoints first.")
        if not _plain_name(run) or not _plain_name(name):
            raise TrainTabError(f"{run!r} / {name!r}: run and checkpoint names are plain folder names; pick them "
                                "from the lists.")
        run_dir = self.runs_dir / run
        folder = run_dir / "final" if name == "final" else run_dir / "checkpoints" / name
        if name == "final" and (folder / "config.json").is_file():
            return folder
        if name != "final" and folder in list_checkpoints(run_dir / "checkpoints"):
            return folder
        raise TrainTabError(f"Run {run!r} has no checkpoint {name!r} (it may have been pruned); refresh the list.")

    def _load_model(self, run: str, name: str):
        """(model, run config) of checkpoint ``name`` of ``run``: final/ is an HF folder; a checkpoint's
        architecture comes from the run's config."""
        from modules.llm.checkpoint import load_model
        folder = self._checkpoint_folder(run, name)
        config = load_config(None, [], base=open_run_dir(self.runs_dir / run).read_config())
        model_config = None if name == "final" else config.model_config()
        return load_model(folder, config=model_config), config

    def load_in_chat(self, run: str, name: str) -> str:
        """Put checkpoint ``name`` of ``run`` into models/LLM as an HF folder the Chat tab lists:
        ``<run>`` for final/, ``<run>-step-N`` for a checkpoint; an existing folder is never overwritten
        (the new one gets a ``-2``, ``-3`` ... suffix). Returns the folder name."""
        from modules.llm.checkpoint import save_hf_folder
        from modules.training.llm.pretrain_command import resolve_tokenizer_dir
        if self.ctx.llm is None:
            raise TrainTabError("The Chat capability is not loaded, so there is no Chat model list to add to.")
        folder = self._checkpoint_folder(run, name)
        base = run if name == "final" else f"{run}-step-{int(read_marker(folder)['step'])}"
        models_dir = self.ctx.llm.models_dir
        models_dir.mkdir(parents=True, exist_ok=True)
        target, n = models_dir / base, 1
        while target.exists():
            n += 1
            target = models_dir / f"{base}-{n}"
        tmp = models_dir / f".{target.name}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        try:
            if name == "final":
                shutil.copytree(folder, tmp)
            else:
                model, config = self._load_model(run, name)
                tokenizer = resolve_tokenizer_dir(config, None)
                if tokenizer is None:
                    raise TrainTabError(f"Run {run!r} has no tokenizer folder any more ({config.data}/tokenizer); "
                                        "without it the model cannot chat.")
                mc = model.config
                save_hf_folder(model, tmp, tokenizer, generation_config={
                    "bos_token_id": mc.bos_token_id, "eos_token_id": mc.eos_token_id,
                    "max_length": mc.max_position_embeddings})
            tmp.rename(target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return target.name

    def evaluate(self, run: str, name: str) -> dict:
        """Perplexity of checkpoint ``name`` on the run's dataset's held-out split (evaluate.py's scorer, on
        the device queue), kept in ``<run>/eval/<name>.json`` like the eval command's results."""
        from datetime import datetime, timezone

        from modules.training.llm.data import Mixture, PackedDataset
        from modules.training.llm.documents import DataError
        from modules.training.llm.eval_command import append_result, result_path
        from modules.training.llm.evaluate import loglikelihoods
        if self.slot.running():
            raise TrainTabError(f"A training run is using the device ({self.slot.running()}); Stop it (or wait for "
                                "it to finish), then Evaluate.")
        folder = self._checkpoint_folder(run, name)

        def work(job):
            started = time.perf_counter()
            model, config = self._load_model(run, name)
            try:
                data = Mixture(PackedDataset(config.data), seed=config.seed)
                rows = []
                for batch in data.val_batches(config.micro_batch):
                    rows += batch.tolist()
                    if len(rows) >= EVAL_MAX_SEQUENCES:
                        break
            except DataError as exc:
                raise TrainTabError(f"The run's dataset cannot be read: {exc}") from None
            rows = rows[:EVAL_MAX_SEQUENCES]
            requests = [(row[:1], row[1:]) for row in rows]
            total = sum(ll for ll, _ in loglikelihoods(model, requests, max_len=len(rows[0]), batch_size=8))
            tokens = sum(len(row) - 1 for row in rows)
            import math
            figures = {"task": "ppl:heldout", "kind": "ppl", "ppl": math.exp(-total / tokens),
                       "nll": -total / tokens, "tokens": tokens, "sequences": len(rows), "file": str(config.data)}
            entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"),
                     "checkpoint": {"name": name, "path": str(folder), "run": run},
                     "seconds": round(time.perf_counter() - started, 3), "tasks": [figures]}
            append_result(result_path(self.data_dir, None, folder), entry)
            return figures

        return self.ctx.jobs.submit(work, name=f"evaluate {run}/{name}", kind="training").result()


def _plain_name(name: str) -> bool:
    """A single folder name (what the lists offer), never a path out of the training folder."""
    return bool(name) and "/" not in name and "\\" not in name and not name.startswith(".")


def _num(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None         # "nan" strings written for non-finite values


def _eta(steps: list[dict], total: int) -> float | None:
    """Seconds left, from the wall time per step over the last logged steps of this session of the run."""
    recent = [r for r in steps[-20:] if r.get("time") is not None]
    if len(recent) < 2 or not total:
        return None
    first, last = recent[0], recent[-1]
    done = last["step"] - first["step"]
    if done <= 0:
        return None
    return max(0.0, (last["time"] - first["time"]) / done * (total - last["step"]))


def _detail(start: dict) -> str:
    parts = []
    if start.get("parameters"):
        parts.append(f"{start['parameters'] / 1e6:.1f}M parameters")
    if start.get("precision") and start.get("device"):
        parts.append(f"{start['precision']} on {start['device']}")
    if start.get("processes", 1) > 1:
        parts.append(f"{start['processes']} processes ({start.get('parallel')})")
    if start.get("peak_source"):
        parts.append(f"MFU against the {start['peak_source']} peak")
    if start.get("resumed_from"):
        parts.append(f"resumed from {Path(start['resumed_from']).name}")
    return ", ".join(parts)


def _final_step(run_dir: Path) -> int | None:
    ends = [r for r in read_metrics(run_dir / "metrics.jsonl") if r.get("kind") == "end"]
    return ends[-1]["step"] if ends else None


def _last_ppl(path: Path) -> float | None:
    import json
    try:
        history = json.loads(path.read_text(encoding="utf-8"))
        return float(history["evaluations"][-1]["tasks"][0]["ppl"])
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None

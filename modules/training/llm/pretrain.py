"""The pretraining loop (TinyLlama's recipe) on :class:`modules.llm.model.Llama`, with exact resume.

One optimizer step = gradient accumulation over ``global_batch_tokens / (micro_batch x seq_len x processes)``
micro-batches; then gradient clipping, AdamW (fused where torch has it for the device, else foreach), and a
learning rate from linear warmup then cosine decay to ``min_lr`` (a pure function of the step, so resuming
needs nothing but the step). Weights stay fp32 (the master copy); bf16 runs under autocast.

Data comes from any object with the training-data protocol (:class:`TrainingData`): ``next_batch(n)`` ->
LongTensor (n, seq_len + 1), ``val_batches(n)`` -> iterable of those, ``state_dict()`` / ``load_state_dict()``
(the read position; JSON-serialisable). The packed-dataset ``Mixture`` is one.

Multi-process (``torchrun --nproc-per-node N``): the model is wrapped by DDP (FSDP2 with
``parallel: fsdp``, see parallel.py), each rank reads its slice of every global batch (the data object is
made for its rank), gradients are all-reduced once per optimizer step (``no_sync`` on the other
micro-steps), and the logged loss is the mean over every rank, so the curve equals a single process with the
same global batch. Only rank 0 writes the run folder; every rank restores the same checkpoint on resume, each
with its own RNG state (``rng.pt`` is rank 0's, ``rng-rank-R.pt`` the others').

Exact resume: a checkpoint holds the weights (safetensors), the optimizer state, the scheduler step, every
RNG state (torch, CUDA, python, numpy) and the data position, so a run killed after step k and resumed
makes the same updates as one never interrupted: on CPU in fp32 with a fixed seed the final weights are
bit-identical (tests/training/test_exact_resume.py kills a real process with SIGKILL).
"""
from __future__ import annotations

import hashlib
import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import torch

from modules.devices import cpu_supports_bf16
from modules.training.rng_state import rng_state, set_rng_state
from modules.llm.config import LlamaConfig
from modules.llm.model import Llama
from modules.training.checkpoints import CheckpointWriter, latest_checkpoint, read_marker
from modules.training.config import PretrainConfig
from modules.training.distributed import Distributed
from modules.training.llm import mfu as mfu_lib
from modules.training.llm import parallel
from modules.training.metrics import MetricsLog, truncate_after
from modules.training.run_dir import RunDir

log = logging.getLogger(__name__)

#: LlamaConfig fields that define the tensors; a checkpoint only resumes into the same values
ARCHITECTURE_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                       "num_attention_heads", "num_key_value_heads", "head_dim", "tie_word_embeddings",
                       "attention_bias", "mlp_bias", "rope_theta", "rms_norm_eps")
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json")


class TrainingError(RuntimeError):
    """A run that cannot start or go on; the message says why and what to try."""


class TrainingData(Protocol):
    def next_batch(self, batch_size: int) -> torch.Tensor: ...
    def val_batches(self, batch_size: int) -> Iterable[torch.Tensor]: ...
    def state_dict(self) -> dict: ...
    def load_state_dict(self, state: dict) -> None: ...


@dataclass
class TrainResult:
    run_dir: Path
    step: int
    tokens: int
    finished: bool              # reached max_steps / max_tokens (False: stopped on request)
    final_dir: Path | None
    last_checkpoint: Path | None


# --------------------------------------------------------------------------------------- recipe parts
def lr_at(step: int, config: PretrainConfig, total_steps: int) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup, then cosine to min_lr."""
    if config.warmup_steps and step < config.warmup_steps:
        return config.lr * (step + 1) / config.warmup_steps
    decay_steps = max(1, total_steps - config.warmup_steps)
    progress = min(1.0, (step - config.warmup_steps) / decay_steps)
    return config.min_lr + 0.5 * (config.lr - config.min_lr) * (1 + math.cos(math.pi * progress))


def init_weights(model: Llama, seed: int) -> None:
    """TinyLlama's init (lit-gpt): normal std sqrt(2 / 5d) everywhere, the residual-stream outputs
    (o_proj, down_proj) std 1 / sqrt(d) / n_layer, norms 1. Seeded so runs are reproducible."""
    config = model.config
    d, layers = config.hidden_size, config.num_hidden_layers
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.copy_(torch.ones_like(param) if name.endswith("norm.weight") else torch.zeros_like(param))
                continue
            std = 1 / math.sqrt(d) / layers if name.endswith(("o_proj.weight", "down_proj.weight")) \
                else math.sqrt(2 / (5 * d))
            param.copy_(torch.randn(param.shape, generator=gen) * std)


def resolve_device(name: str, dist: Distributed | None = None) -> torch.device:
    """The training device; under torchrun on GPUs, the rank's own ``cuda:<local_rank>``."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise TrainingError(f"device={name} was asked for but torch sees no CUDA GPU; use device=cpu or auto")
    if device.type == "cuda" and dist is not None and dist.active:
        return dist.device("cuda")
    return device


def seed_all(seed: int) -> None:
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)


def rank_rng_file(rank: int) -> str:
    """Rank 0's RNG file keeps the single-process name, so checkpoints resume with any process count."""
    return "rng.pt" if rank == 0 else f"rng-rank-{rank}.pt"


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype (None: plain fp32)."""
    if precision == "fp32":
        return None
    supported = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_supports_bf16()
    if precision == "bf16":
        if not supported:
            log.warning("precision=bf16 on a %s without native bf16: it will be slow", device.type)
        return torch.bfloat16
    return torch.bfloat16 if supported else None


def check_compiler(device: torch.device) -> None:
    """``compile=true`` needs what inductor builds kernels with: a C++ compiler on a CPU, Triton on CUDA.
    Checked before the model is built, so a missing one is a clear message rather than a traceback at step 1."""
    if device.type == "cpu" and not any(shutil.which(c) for c in ("g++", "c++", "clang++")):
        raise TrainingError("compile=true needs a C++ compiler for torch.compile's CPU kernels: install one "
                            "(apt-get install g++) or set compile=false")
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            raise TrainingError("compile=true on CUDA needs triton (pip install triton, matching your torch), "
                                "or set compile=false") from None


def build_optimizer(model: Llama, config: PretrainConfig, device: torch.device) -> tuple[torch.optim.Optimizer, str]:
    """AdamW; weight decay on matrices only (norm gains are not decayed, as in nanoGPT/torchtitan)."""
    decay = [p for p in model.parameters() if p.requires_grad and p.ndim >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.ndim < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    kwargs = dict(lr=config.lr, betas=tuple(config.betas), eps=1e-8)
    try:
        return torch.optim.AdamW(groups, fused=True, **kwargs), "fused"
    except (RuntimeError, TypeError, ValueError) as exc:          # no fused kernel for this device/dtype
        log.info("fused AdamW unavailable on %s (%s); using foreach", device, exc)
        return torch.optim.AdamW(groups, foreach=True, **kwargs), "foreach"


def architecture(config: LlamaConfig) -> dict[str, Any]:
    return {name: getattr(config, name) for name in ARCHITECTURE_FIELDS}


def tokenizer_fingerprint(folder: str | Path | None) -> str | None:
    """sha256 over the tokenizer files of ``folder`` (None when it has none)."""
    if folder is None:
        return None
    digest, found = hashlib.sha256(), False
    for name in TOKENIZER_FILES:
        path = Path(folder) / name
        if path.is_file():
            digest.update(name.encode() + b"\0" + path.read_bytes())
            found = True
    return digest.hexdigest() if found else None


def compatibility_problems(saved: dict, arch: dict, tokenizer: str | None) -> list[str]:
    """Why a checkpoint made with ``saved`` cannot continue as ``arch`` / ``tokenizer``."""
    out = []
    diffs = [f"{k}: checkpoint {saved['architecture'].get(k)!r}, config {v!r}"
             for k, v in arch.items() if saved["architecture"].get(k) != v]
    if diffs:
        out.append("the model architecture differs (" + "; ".join(diffs) + ")")
    if saved.get("tokenizer") and tokenizer and saved["tokenizer"] != tokenizer:
        out.append(f"the tokenizer differs (checkpoint sha256 {saved['tokenizer'][:12]}, "
                   f"this data's tokenizer {tokenizer[:12]})")
    return out


# ---------------------------------------------------------------------------------- RNG and state I/O
def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, (np.ndarray, torch.Tensor)):
        return value.tolist()
    raise TypeError(f"{type(value).__name__} in the data state is not JSON-serialisable")


def weights_for_saving(model: Llama, state: dict[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors (``state``: gathered full weights; default: ``model``'s own)."""
    if state is None:
        state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    state = dict(state)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    return state


# ------------------------------------------------------------------------------------------- trainer
class Pretrainer:
    """One pretraining run in ``run`` (new, or resumed from its latest checkpoint)."""

    def __init__(self, config: PretrainConfig, data: TrainingData, run: RunDir, *, resume: bool = False,
                 tokenizer_dir: str | Path | None = None, tokenizer_hash: str | None = None,
                 on_log: Callable[[dict], None] | None = None, should_stop: Callable[[], bool] | None = None,
                 dist: Distributed | None = None,
                 model_lease: Callable[[Callable[[], Llama], int], Llama] | None = None):
        """``model_lease(build, num_parameters)``, when given, builds the model through the app's model manager
        (:func:`modules.training.model_lease.manager_lease`), so its memory is admitted and accounted there."""
        self.config, self.data, self.run = config, data, run
        self.dist = dist or Distributed()
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.on_log, self.should_stop = on_log, should_stop
        self.tokenizer_dir = Path(tokenizer_dir) if tokenizer_dir else None
        self.tokenizer_hash = tokenizer_hash or tokenizer_fingerprint(self.tokenizer_dir)
        self.device = resolve_device(config.device, self.dist)
        if config.compile:
            check_compiler(self.device)
        self.autocast_dtype = resolve_precision(config.precision, self.device)
        self.total_steps = config.total_steps()
        self.accum = config.grad_accum_steps(self.world_size)
        seed_all(config.seed)            # the same on every rank: every rank builds the same initial weights

        self.model_config = config.model_config()
        self._check_tokenizer()
        build = lambda: self._build_model().to(self.device)      # noqa: E731
        self.model = model_lease(build, self.model_config.num_parameters()) if model_lease else build()
        self.model.activation_checkpointing = config.activation_checkpointing
        if config.compile:
            self.model.compile_for_training()
        if self.rank:
            seed_all(config.seed + self.rank)      # from here on each rank draws its own random numbers
        self.train_model = parallel.wrap_model(self.model, config.parallel, self.dist, self.device)
        self.optimizer, self.optimizer_kind = build_optimizer(self.model, config, self.device)
        self.step, self.tokens = 0, 0
        self.writer = CheckpointWriter(run.checkpoints, keep_last=config.keep_last) if self.dist.is_main else None
        self.resumed_from: Path | None = None
        if resume:
            self._resume()

    # ---------------------------------------------------------------------------------- set-up
    def _check_tokenizer(self) -> None:
        if self.tokenizer_dir is None:
            return
        from modules.llm.tokenizer import Tokenizer, TokenizerError
        try:
            vocab = Tokenizer.from_dir(self.tokenizer_dir).vocab_size
        except TokenizerError as exc:
            raise TrainingError(str(exc)) from None
        if vocab > self.model_config.vocab_size:
            raise TrainingError(f"The tokenizer in {self.tokenizer_dir} has {vocab} tokens but the model's "
                                f"vocab_size is {self.model_config.vocab_size}; set model.vocab_size={vocab} "
                                "(or more)")

    def _build_model(self) -> Llama:
        if self.config.init_from:
            from modules.llm.checkpoint import load_model
            model = load_model(self.config.init_from, dtype=torch.float32)
            return model.requires_grad_(True).train()
        model = Llama(self.model_config)
        init_weights(model, self.config.seed)
        return model.train()

    def _resume(self) -> None:
        checkpoint = latest_checkpoint(self.run.checkpoints)
        if checkpoint is None:
            raise TrainingError(f"{self.run.root} has no complete checkpoint to resume from; start it again "
                                "without --resume (under another run_name to keep this folder)")
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        problems = compatibility_problems(state, architecture(self.model_config), self.tokenizer_hash)
        if problems:
            raise TrainingError(f"Cannot resume from {checkpoint}: " + "; and ".join(problems) +
                                ". Resume with the run's own config.yaml and data, or start a new run.")
        saved_format, wanted = state.get("optimizer_format", "ids"), parallel.optimizer_format(self.model)
        if saved_format != wanted:
            how = {"names": "under torchrun with parallel=fsdp", "ids": "with parallel=ddp or in one process"}
            raise TrainingError(f"Cannot resume from {checkpoint}: it was written by a run with FSDP "
                                f"sharding {'on' if saved_format == 'names' else 'off'}; resume it "
                                f"{how[saved_format]}.")
        from safetensors.torch import load_file
        weights = load_file(str(checkpoint / "model.safetensors"), device=str(self.device))
        if self.model_config.tie_word_embeddings:
            weights["lm_head.weight"] = weights["model.embed_tokens.weight"]
        parallel.load_weights(self.model, weights)
        parallel.load_optimizer_state(self.model, self.optimizer,
                                      torch.load(checkpoint / "optimizer.pt", map_location=self.device,
                                                 weights_only=True))
        rng_file = checkpoint / rank_rng_file(self.rank)
        if rng_file.is_file():
            set_rng_state(torch.load(rng_file, weights_only=True))
        else:                              # the run was saved with fewer processes
            log.warning("%s has no RNG state for rank %d; seeding it from the seed and step", checkpoint, self.rank)
            seed_all(self.config.seed + self.rank + 1_000_003 * state["step"])
        self.data.load_state_dict(state["data"])
        self.step, self.tokens = state["step"], state["tokens"]
        self.resumed_from = checkpoint
        if self.dist.is_main:
            dropped = truncate_after(self.run.metrics_file, self.step)
            log.info("resumed %s at step %d (%d tokens) on %d process(es); %d metric lines after it dropped",
                     checkpoint, self.step, self.tokens, self.world_size, dropped)

    # ---------------------------------------------------------------------------------- the loop
    def train(self) -> TrainResult:
        config = self.config
        flops_token = mfu_lib.flops_per_token(self.model_config, config.seq_len)
        flops_token_tl = mfu_lib.flops_per_token(self.model_config, config.seq_len, "tinyllama")
        peak_dtype = self.autocast_dtype or torch.float32
        peak, peak_source = mfu_lib.peak_flops(self.device, peak_dtype)
        # only rank 0 writes metrics (and TensorBoard); the other ranks compute the same records and drop them
        metrics = MetricsLog(self.run.metrics_file, tensorboard_dir=self.run.root / "tensorboard") \
            if self.dist.is_main else None
        last_checkpoint = self.resumed_from
        finished = self.step >= self.total_steps
        try:
            if not finished:
                self._log(metrics, {"kind": "start", "step": self.step, "tokens": self.tokens,
                             "parameters": self.model.num_parameters(), "flops_per_token": flops_token,
                             "flops_per_token_tinyllama": flops_token_tl, "peak_flops": peak,
                             "peak_source": peak_source, "precision": str(peak_dtype).replace("torch.", ""),
                             "optimizer": self.optimizer_kind, "grad_accum": self.accum,
                             "total_steps": self.total_steps, "device": str(self.device),
                             "processes": self.world_size,
                             "parallel": self.config.parallel if self.dist.active else "none",
                             "resumed_from": str(self.resumed_from) if self.resumed_from else None})
            # throughput counts training time only (not validation or checkpoint writing)
            window_seconds, window_tokens = 0.0, 0
            while self.step < self.total_steps:
                started = time.perf_counter()
                loss, grad_norm, lr = self._optimizer_step()
                window_seconds += time.perf_counter() - started
                window_tokens += config.global_batch_tokens
                step = self.step
                if step % config.log_every == 0 or step == self.total_steps:
                    tps = window_tokens / window_seconds if window_seconds > 0 else 0.0
                    record = {"kind": "train", "step": step, "tokens": self.tokens, "loss": loss, "lr": lr,
                              "grad_norm": grad_norm, "tokens_per_s": tps,
                              "mfu": mfu_lib.mfu(tps, flops_token, peak, self.world_size),
                              "mfu_tinyllama": mfu_lib.mfu(tps, flops_token_tl, peak, self.world_size),
                              "time": time.time()}
                    self._log(metrics, record, notify=True)
                    window_seconds, window_tokens = 0.0, 0
                if config.eval_every and step % config.eval_every == 0:
                    record = {"kind": "val", "step": step, "tokens": self.tokens, "val_loss": self.evaluate(),
                              "time": time.time()}
                    self._log(metrics, record, notify=True)
                milestone = self._crossed_milestone()
                stop = self.should_stop is not None and self.dist.any(self.should_stop())
                if milestone or self._save_due() or stop:
                    last_checkpoint = self.save_checkpoint(milestone=milestone)
                if stop:
                    break
            finished = self.step >= self.total_steps
            if finished:
                if last_checkpoint is None or read_marker(last_checkpoint)["step"] != self.step:
                    last_checkpoint = self.save_checkpoint(milestone=False)
                final = self.write_final()
                self._log(metrics, {"kind": "end", "step": self.step, "tokens": self.tokens, "final": str(final)})
            return TrainResult(self.run.root, self.step, self.tokens, finished,
                               self.run.final if finished else None, last_checkpoint)
        finally:
            if metrics is not None:
                metrics.close()

    def _log(self, metrics: MetricsLog | None, record: dict, *, notify: bool = False) -> None:
        if metrics is not None:
            metrics.log(record)
            if notify:
                self._notify(record)

    def _optimizer_step(self) -> tuple[float, float, float]:
        config, model = self.config, self.model
        lr = lr_at(self.step, config, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = torch.zeros((), device=self.device)
        for micro in range(self.accum):
            batch = self.data.next_batch(config.micro_batch).to(self.device, non_blocking=True)
            # gradients are all-reduced once per optimizer step, on its last micro-step
            with parallel.gradient_sync(self.train_model, micro == self.accum - 1):
                loss = self._loss(batch, self.train_model)
                (loss / self.accum).backward()
            loss_sum += loss.detach()
        loss_value = float(self.dist.all_reduce(loss_sum)) / (self.accum * self.world_size)
        grad_norm = parallel.clip_gradients(model, config.grad_clip)
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            what = "loss" if not math.isfinite(loss_value) else "gradient norm"
            value = loss_value if what == "loss" else grad_norm
            last = latest_checkpoint(self.run.checkpoints)
            raise TrainingError(
                f"The {what} became {value} at step {self.step + 1} ({self.tokens} tokens trained); the run "
                "stopped without saving these weights. Try a lower lr (now "
                f"{config.lr}) or more warmup_steps, precision=fp32 instead of bf16, and check the data for "
                "broken or out-of-vocabulary tokens. " +
                (f"The last good checkpoint is {last}." if last else "No checkpoint was written yet."))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.tokens += config.global_batch_tokens
        return loss_value, grad_norm, lr

    def _loss(self, batch: torch.Tensor, module: torch.nn.Module) -> torch.Tensor:
        inputs, targets = batch[:, :-1], batch[:, 1:]
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            return module(inputs, targets=targets)

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss over up to ``eval_batches`` held-out batches (the data's validation split). With N
        processes each rank takes its slice of every global batch of N x micro_batch sequences, so
        ``eval_batches`` micro-batches are split over the ranks and the mean is taken over all of them."""
        self.model.eval()
        totals = torch.zeros(2, dtype=torch.float64, device=self.device)       # loss sum, batch count
        try:
            for batch in self.data.val_batches(self.config.micro_batch):
                totals[0] += self._loss(batch.to(self.device), self.model).double()
                totals[1] += 1
                if int(totals[1]) * self.world_size >= self.config.eval_batches:
                    break
        finally:
            self.model.train()
        total, count = self.dist.all_reduce(totals).tolist()
        return total / count if count else float("nan")

    def _crossed_milestone(self) -> bool:
        before = self.tokens - self.config.global_batch_tokens
        return any(before < m <= self.tokens for m in self.config.milestones)

    def _save_due(self) -> bool:
        every = self.config.save_every_tokens
        if not every:
            return False
        before = self.tokens - self.config.global_batch_tokens
        return self.tokens // every > before // every

    def _notify(self, record: dict) -> None:
        if self.on_log is not None:
            self.on_log({**record, "total_steps": self.total_steps})

    # ---------------------------------------------------------------------------------- outputs
    def save_checkpoint(self, *, milestone: bool = False) -> Path:
        from safetensors.torch import save_file

        state = {"step": self.step, "tokens": self.tokens,
                 "scheduler": {"kind": "warmup_cosine", "step": self.step, "total_steps": self.total_steps,
                               "lr": lr_at(max(0, self.step - 1), self.config, self.total_steps)},
                 "data": self.data.state_dict(), "architecture": architecture(self.model_config),
                 "tokenizer": self.tokenizer_hash, "config": self.config.to_dict(),
                 "processes": self.world_size, "optimizer_format": parallel.optimizer_format(self.model)}
        state_text = json.dumps(state, indent=2, default=_json_default) + "\n"
        # collectives first, on every rank in the same order; then rank 0 alone writes the folder
        rng_states = self.dist.gather_objects(rng_state())
        sharded = parallel.is_fsdp(self.model)              # FSDP: gathering is itself a collective
        weights = parallel.full_weights(self.model) if sharded or self.dist.is_main else None
        optimizer_state = parallel.full_optimizer_state(self.model, self.optimizer) \
            if sharded or self.dist.is_main else None

        def write(folder: Path) -> None:
            save_file(weights_for_saving(self.model, weights), str(folder / "model.safetensors"),
                      metadata={"format": "pt"})
            torch.save(optimizer_state, folder / "optimizer.pt")
            for rank, states in enumerate(rng_states):
                torch.save(states, folder / rank_rng_file(rank))
            (folder / "trainer_state.json").write_text(state_text, encoding="utf-8")

        def save() -> Path:
            path = self.writer.save(self.step, write, tokens=self.tokens, milestone=milestone)
            log.info("checkpoint %s (%d tokens)", path, self.tokens)
            return path

        return self.dist.on_main(save, share_result=True)

    def write_final(self) -> Path:
        """``final/``: an HF folder (config, safetensors, tokenizer) for transformers and the Chat tab."""
        import shutil

        from modules.llm.checkpoint import save_hf_folder
        final = self.run.final
        config = self.model_config
        generation = {"bos_token_id": config.bos_token_id, "eos_token_id": config.eos_token_id,
                      "max_length": config.max_position_embeddings}
        if parallel.is_fsdp(self.model):                    # gather the shards (every rank takes part)
            weights = parallel.full_weights(self.model)
            model = parallel.plain_copy(self.model, weights) if weights is not None else None
        else:
            model = self.model

        def write() -> Path:
            tmp = final.with_name("final.tmp")
            shutil.rmtree(tmp, ignore_errors=True)
            save_hf_folder(model, tmp, self.tokenizer_dir, generation_config=generation)
            if final.exists():
                shutil.rmtree(final)
            tmp.replace(final)
            return final

        self.dist.on_main(write)
        return final

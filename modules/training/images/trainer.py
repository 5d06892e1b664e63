"""The image trainer: LoRA or full fine-tuning of SD 1.5 / SD 2 / SDXL with accelerate, exactly resumable.

Why accelerate: ``Accelerator(mixed_precision=..., gradient_accumulation_steps=...)`` gives autocast, loss
scaling for fp16, gradient accumulation without needless all-reduces, and DDP (gloo on the CPU, NCCL on
GPUs) under ``accelerate launch`` or torchrun, all from one loop.

One optimizer step = ``gradient_accumulation`` micro-steps, each on one global batch of
``batch_size x processes`` samples from the :class:`~.sampler.BucketBatchSampler` (this process takes its
slice). The noise and timestep of a sample come from its own generator (:mod:`.loss`), so N processes train
exactly what one process does with the same global batch.

A checkpoint (every ``save_every_steps``, on a stop request, and before the final files) holds the
trainable weights, optimizer, LR scheduler, each process's RNG states (torch, numpy, python: LoRA dropout
draws from them) and the sampler's position; resuming from it continues bit for bit on CPU fp32.
Only the main process writes files.

:class:`~.dreambooth.DreamBoothTrainer` builds on it through ``_make_sampler`` (the batch stream) and
``_micro_step`` (forward and backward of one micro-batch, returning the losses to log).
"""
from __future__ import annotations

import json
import math
import random
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from modules.training.checkpoints import CheckpointWriteError, CheckpointWriter, latest_checkpoint, read_marker
from modules.training.images import loss as L
from modules.training.images.base_model import BaseModel, add_lora, load_trainable_state, trainable_state
from modules.training.images.finetune import make_full_trainable
from modules.training.metrics import MetricsLog, truncate_after
from modules.training.rng_state import rng_state, set_rng_state
from modules.training.run_dir import RunDir


class ImageTrainingError(RuntimeError):
    """The run cannot go on; the message says what happened and what to try."""


@dataclass
class UNetInputs:
    """One micro-batch as the UNet takes it, with its target and per-sample loss weights; ``added`` is
    SDXL's ``added_cond_kwargs`` (None for SD 1.5 / 2)."""
    noisy: torch.Tensor
    timesteps: torch.Tensor
    embeddings: torch.Tensor
    added: dict | None
    target: torch.Tensor
    weights: torch.Tensor


@dataclass
class TrainResult:
    step: int
    finished: bool
    run_dir: Path
    outputs: list[Path] = field(default_factory=list)


def rank_rng_file(rank: int) -> str:
    return "rng.pt" if rank == 0 else f"rng-rank-{rank}.pt"


def _load_state(path: Path):
    """A checkpoint's optimizer / scheduler / RNG state, weights-only: resuming never runs pickled code."""
    import pickle
    try:
        return torch.load(path, weights_only=True)
    except pickle.UnpicklingError as e:
        raise ImageTrainingError(f"{path} holds objects only pickle can load (written by an older Atelier, or not "
                                 "by Atelier), so it is not loaded and nothing in the run folder is changed; start "
                                 "the run again without --resume") from e


def peak_memory_mb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024      # Linux: KiB


class ImageTrainer:
    """One run of *config* on *base* (loaded, frozen) and *dataset*, in *run*'s folder.

    *finish(trainer)* writes the outputs (the LoRA file...) and returns their paths; it runs on the main
    process only, after the last checkpoint.
    """

    def __init__(self, config, base: BaseModel, dataset, run: RunDir, accelerator, *, resume: bool = False,
                 finish: Callable[["ImageTrainer"], list[Path]] | None = None,
                 should_stop: Callable[[], bool] | None = None, on_log: Callable[[dict], None] | None = None):
        from accelerate.utils import set_seed
        from diffusers import DDPMScheduler

        self.config, self.base, self.dataset, self.run, self.acc = config, base, dataset, run, accelerator
        self.finish, self.should_stop, self.on_log = finish, should_stop or (lambda: False), on_log
        self.device = accelerator.device
        self.world = accelerator.num_processes
        self.noise_scheduler = DDPMScheduler.from_config(base.pipe.scheduler.config)
        prediction = config.prediction_type
        self.prediction_type = (self.noise_scheduler.config.get("prediction_type") or "epsilon"
                                if prediction == "auto" else prediction)
        set_seed(config.seed)                          # the LoRA's initial A matrices
        if config.trains_lora:
            add_lora(base, config)
        else:
            make_full_trainable(base, config)
        self.sampler = self._make_sampler()
        self.steps_per_epoch = -(-self.sampler.batches_per_epoch // config.gradient_accumulation)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        pipe = base.pipe
        pipe.vae.to(self.device, torch.float32)                # the VAE always in fp32 (it overflows in fp16)
        for name, encoder in base.text_encoders:
            encoder.to(self.device)
        pipe.unet.to(self.device)
        if config.gradient_checkpointing:
            pipe.unet.enable_gradient_checkpointing()
            for name in base.trained:
                if name != "unet":                 # transformers 5 renamed it
                    encoder = base.trained[name]
                    (getattr(encoder, "activation_checkpointing_enable", None)
                     or encoder.gradient_checkpointing_enable)()
        self.optimizer = self._optimizer()
        self.lr_scheduler = self._lr_scheduler()
        names = list(base.trained)
        prepared = accelerator.prepare(*[base.trained[n] for n in names], self.optimizer)
        self.models = dict(zip(names, prepared[:-1]))          # DDP-wrapped under several processes
        self.optimizer = prepared[-1]
        self.cache = self._latent_cache(dataset)
        self.step = 0
        if resume:
            self._resume()
        self.is_main = accelerator.is_main_process

    # ------------------------------------------------------------------------------------ set-up
    def _make_sampler(self):
        """The batch stream (resumable through its ``state_dict``)."""
        from modules.training.images.sampler import BucketBatchSampler
        return BucketBatchSampler(self.dataset, batch_size=self.config.batch_size * self.world,
                                  seed=self.config.seed, rank=self.acc.process_index, world_size=self.world)

    def _param_groups(self) -> list[dict]:
        c = self.config
        groups = []
        for name, module in self.base.trained.items():
            params = [p for p in module.parameters() if p.requires_grad]
            if params:
                groups.append({"params": params, "lr": c.unet_lr if name == "unet" else c.text_encoder_lr})
        if not groups:
            raise ImageTrainingError("no trainable LoRA layers were made; check the base model")
        return groups

    def _optimizer(self):
        c = self.config
        groups = self._param_groups()
        kwargs = {"betas": tuple(c.betas), "weight_decay": c.weight_decay}
        if c.optimizer == "adamw8bit":
            import bitsandbytes as bnb
            return bnb.optim.AdamW8bit(groups, **kwargs)
        if c.optimizer == "prodigy":
            from prodigyopt import Prodigy
            return Prodigy(groups, **kwargs)
        return torch.optim.AdamW(groups, **kwargs)

    def _lr_scheduler(self):
        from diffusers.optimization import get_scheduler
        c = self.config
        extra = {"num_cycles": c.lr_cycles} if c.lr_scheduler == "cosine_with_restarts" else {}
        return get_scheduler(c.lr_scheduler, self.optimizer, num_warmup_steps=c.warmup_steps,
                             num_training_steps=self.total_steps, **extra)

    def encode(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels in [-1, 1] -> scaled latents. The distribution's mean, not a sample: so cached and uncached
        runs, and every epoch, train on the same latents (kohya caches one draw; the difference is tiny)."""
        vae = self.base.pipe.vae
        with torch.no_grad():
            latents = vae.encode(pixels.to(self.device, torch.float32)).latent_dist.mean
        shift = getattr(vae.config, "shift_factor", None) or 0.0
        return (latents - shift) * vae.config.scaling_factor

    def _latent_cache(self, dataset):
        """*dataset*'s latents, encoded now (None with cache_latents=none); on disk in the dataset's folder."""
        from modules.training.images.latent_cache import LatentCache, dataset_cache_dir, vae_fingerprint
        mode = self.config.cache_latents
        if mode == "none":
            return None
        fingerprint = vae_fingerprint(self.base.pipe.vae, extra="mean*scaling_factor")
        directory = dataset_cache_dir(dataset.root) if mode == "disk" else None
        # encoded one training batch at a time (as diffusers' scripts encode; kohya's vae_batch_size is 1): a
        # bigger chunk only raises the run's peak memory (the VAE's full-resolution activations) for no speed
        cache = LatentCache(lambda x: self.encode(x).cpu(), fingerprint, directory=directory,
                            encode_batch=self.config.batch_size)
        if directory is not None:            # each process encodes its share, then every one reads them all
            cache.prepare(dataset, rank=self.acc.process_index, world_size=self.world)
            self.acc.wait_for_everyone()
        cache.prepare(dataset)
        return cache

    # ------------------------------------------------------------------------------------ resume
    def _resume(self) -> None:
        checkpoint = latest_checkpoint(self.run.checkpoints)
        if checkpoint is None:                       # stopped before its first checkpoint: start again
            if self.acc.is_main_process:
                truncate_after(self.run.metrics_file, 0)
            return
        from safetensors.torch import load_file
        load_trainable_state(self.base, load_file(checkpoint / "trainable.safetensors"), str(checkpoint))
        self.optimizer.load_state_dict(_load_state(checkpoint / "optimizer.pt"))
        self.lr_scheduler.load_state_dict(_load_state(checkpoint / "scheduler.pt"))
        self.sampler.load_state_dict(json.loads((checkpoint / "sampler.json").read_text(encoding="utf-8")))
        rng_file = checkpoint / rank_rng_file(self.acc.process_index)
        if not rng_file.is_file():
            raise ImageTrainingError(f"{checkpoint} was saved by fewer processes (no {rng_file.name}); resume "
                                     "with the number of processes the run started with")
        set_rng_state(_load_state(rng_file))
        self.step = read_marker(checkpoint)["step"]
        if self.acc.is_main_process:
            truncate_after(self.run.metrics_file, self.step)

    # ------------------------------------------------------------------------------------ one step
    def _conditioning(self, captions: list[str], bucket: tuple[int, int]) -> tuple[torch.Tensor, dict]:
        """Text embeddings (and SDXL's pooled embeds + size ids) of *captions*."""
        base, out = self.base, []
        pooled = None
        for name, encoder in base.text_encoders:
            tokenizer = getattr(base.pipe, name.replace("text_encoder", "tokenizer"))
            ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length,
                            truncation=True, return_tensors="pt").input_ids.to(self.device)
            model = self.models.get(name, encoder)
            with torch.set_grad_enabled(name in self.models), self.acc.autocast():
                result = model(ids, output_hidden_states=base.sdxl)
            if base.sdxl:
                out.append(result.hidden_states[-2])    # SDXL conditions on the penultimate layer
                pooled = result[0]                      # text_encoder_2's projected pooled output
            else:
                out.append(result[0])
        added = {}
        if base.sdxl:
            width, height = bucket      # original = target = the bucket (images are fitted to it), no crop
            time_ids = torch.tensor([[height, width, 0, 0, height, width]], dtype=torch.float32)
            added = {"added_cond_kwargs": {"text_embeds": pooled,
                                           "time_ids": time_ids.repeat(len(captions), 1).to(self.device)}}
        return torch.cat(out, dim=-1), added

    def _inputs(self, *groups) -> "UNetInputs":
        """The UNet's inputs and targets for one bucket's samples, given as ``(dataset, samples, cache)``
        groups (DreamBooth's instance and class samples), in that order, with one text-encoder call."""
        latents, captions, samples, bucket = [], [], [], None
        for dataset, part, cache in groups:
            batch = dataset.batch(part, cache=cache)
            latents.append(batch.latents if batch.latents is not None else self.encode(batch.pixels))
            captions += batch.captions
            samples += part
            bucket = batch.bucket
        latents = torch.cat(latents).to(self.device, torch.float32)
        generators = [L.sample_generator(s.seed, s.epoch, s.slot) for s in samples]
        noise, timesteps = L.draw_noise(tuple(latents.shape[1:]), generators,
                                        self.noise_scheduler.config.num_train_timesteps,
                                        noise_offset=self.config.noise_offset,
                                        min_timestep=self.config.min_timestep,
                                        max_timestep=self.config.max_timestep)
        noise, timesteps = noise.to(self.device), timesteps.to(self.device)
        noisy = self.noise_scheduler.add_noise(latents, noise, timesteps)
        target = L.target_for(self.noise_scheduler, latents, noise, timesteps, self.prediction_type)
        embeddings, added = self._conditioning(captions, bucket)
        weights = L.snr_weights(self.noise_scheduler, timesteps, self.config.min_snr_gamma, self.prediction_type,
                                self.config.loss_weighting)
        return UNetInputs(noisy, timesteps, embeddings, added.get("added_cond_kwargs"), target, weights)

    def _sample_losses(self, inputs: "UNetInputs") -> torch.Tensor:
        """One UNet call on *inputs*: the (weighted) loss of each sample."""
        added = {"added_cond_kwargs": inputs.added} if inputs.added is not None else {}
        with self.acc.autocast():
            prediction = self.models["unet"](inputs.noisy, inputs.timesteps, inputs.embeddings, **added).sample
        return L.per_sample_mse(prediction, inputs.target, inputs.weights)

    def _micro_loss(self, samples) -> torch.Tensor:
        """The mean loss of one micro-batch of the dataset."""
        return self._sample_losses(self._inputs((self.dataset, samples, self.cache))).mean()

    def _micro_step(self, batch) -> dict[str, torch.Tensor]:
        """Forward and backward of one micro-batch; returns the losses to log ("loss" first)."""
        loss = self._micro_loss(batch)
        self.acc.backward(loss)
        return {"loss": loss.detach()}

    def _train_step(self) -> dict[str, float]:
        """One optimizer step; the mean over micro-steps and processes of each logged loss."""
        losses = []
        models = list(self.models.values())
        for _ in range(self.config.gradient_accumulation):
            with self.acc.accumulate(*models):
                parts = self._micro_step(self.sampler.next_batch())
                if self.acc.sync_gradients:
                    self.acc.clip_grad_norm_([p for g in self.optimizer.param_groups for p in g["params"]],
                                             self.config.max_grad_norm)
                self.optimizer.step()
                self.optimizer.zero_grad(set_to_none=True)
            losses.append(torch.stack(list(parts.values())))
        self.lr_scheduler.step()
        mean = torch.stack(losses).mean(dim=0).reshape(1, -1)
        gathered = self.acc.gather(mean).mean(dim=0)
        return {name: float(value) for name, value in zip(parts, gathered)}

    # ------------------------------------------------------------------------------------ the loop
    def train(self) -> TrainResult:
        metrics = MetricsLog(self.run.metrics_file) if self.is_main else None
        writer = CheckpointWriter(self.run.checkpoints, keep_last=self.config.keep_last) if self.is_main else None
        c = self.config
        try:
            for model in self.models.values():
                model.train()
            while self.step < self.total_steps:
                started = time.perf_counter()
                losses = self._train_step()
                loss = losses["loss"]
                self.step += 1
                if not math.isfinite(loss):
                    raise ImageTrainingError(
                        f"The loss became {loss} at step {self.step}; nothing after the last checkpoint was "
                        "saved. Try fp32 VAE (it is fp32 here) and mixed_precision=no, or a lower learning rate "
                        f"(unet_lr={c.unet_lr:g} now), then resume or start again.")
                elapsed = time.perf_counter() - started
                record = {"kind": "train", "step": self.step, "total_steps": self.total_steps, "loss": loss,
                          "lr": self.lr_scheduler.get_last_lr()[0], "it_s": 1 / elapsed, "s_per_step": elapsed,
                          "samples_per_s": c.batch_size * self.world * c.gradient_accumulation / elapsed,
                          "epoch": self.sampler.epoch, "peak_memory_mb": peak_memory_mb(self.device),
                          "time": time.time(),      # wall clock: the Train tab's ETA counts samples and saves too
                          **{k: v for k, v in losses.items() if k != "loss"}}
                if metrics is not None and (self.step % c.log_every == 0 or self.step == self.total_steps):
                    metrics.log(record)
                    if self.on_log:
                        self.on_log(record)
                if c.sample_every and (self.step % c.sample_every == 0 or self.step == self.total_steps):
                    self._samples()
                stop = self._agree(self.should_stop())
                due = c.save_every_steps and self.step % c.save_every_steps == 0
                if stop or due or self.step == self.total_steps:
                    self._save(writer)
                if stop and self.step < self.total_steps:
                    return TrainResult(self.step, False, self.run.root)
            outputs = []
            if self.is_main and self.finish is not None:
                outputs = self.finish(self)
            self.acc.wait_for_everyone()
            return TrainResult(self.step, True, self.run.root, outputs)
        finally:
            if metrics is not None:
                metrics.close()

    def _samples(self) -> None:
        """Sample images on the main process while the others wait (their models are not used meanwhile)."""
        if self.is_main:
            from modules.training.images.samples import sample_images
            sample_images(self)
        self.acc.wait_for_everyone()

    def _agree(self, flag: bool) -> bool:
        """True on every process when any one was asked to stop."""
        if self.world == 1:
            return bool(flag)
        value = torch.tensor([1.0 if flag else 0.0], device=self.device)
        return bool(self.acc.reduce(value, reduction="sum").item() > 0)

    def _save(self, writer: CheckpointWriter | None) -> None:
        from accelerate.utils import broadcast_object_list, gather_object
        from safetensors.torch import save_file
        states = gather_object([rng_state()]) if self.world > 1 else [rng_state()]
        error = [None]
        if writer is not None:
            def write(folder: Path) -> None:
                save_file(trainable_state(self.base), str(folder / "trainable.safetensors"))
                torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
                torch.save(self.lr_scheduler.state_dict(), folder / "scheduler.pt")
                for rank, state in enumerate(states):
                    torch.save(state, folder / rank_rng_file(rank))
                (folder / "sampler.json").write_text(json.dumps(self.sampler.state_dict()), encoding="utf-8")
            try:
                writer.save(self.step, write, extra={"samples": self.step * self.config.batch_size * self.world
                                                     * self.config.gradient_accumulation})
            except CheckpointWriteError as exc:
                error = [str(exc)]
        if self.world > 1:
            broadcast_object_list(error)
        if error[0]:
            raise ImageTrainingError(error[0])

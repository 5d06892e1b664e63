"""Chat fine-tuning (SFT) of an existing HF Llama folder: every weight, or LoRA adapters through peft.

The loop shares the Pretrainer's recipe pieces (``build_optimizer``: AdamW fused or foreach, no decay on
norms; ``lr_at``: linear warmup then cosine; device and bf16-autocast choice; RNG state capture) and the
run folder, atomic checkpoints and metrics log of ``modules.training``. What differs is the data: padded
conversations whose loss is the mean over the assistant tokens of the whole optimizer step (summed per
micro-batch, divided by the step's assistant-token count, so accumulation gives the same gradient as one
big batch), see sft_data.py.

Outputs in the run folder:

* ``final/``: an HF folder (config, safetensors, tokenizer files and the chat template the run used) that
  ``modules.llm.loader`` and the Chat tab load and transformers' ``LlamaForCausalLM`` reads: the tuned
  model (full), or the base with the adapter merged in (LoRA with ``merge: true``);
* ``adapter/`` (LoRA only): ``adapter_config.json`` + ``adapter_model.safetensors`` for peft's
  ``PeftModel.from_pretrained`` on the base model.

A checkpoint holds only the trainable tensors (all weights, or the adapters), the optimizer state, RNG
states and the data position; resuming rebuilds the base from ``base_model`` and reloads them, so a
stopped run resumed ends where an uninterrupted one does.
"""
from __future__ import annotations

import json
import logging
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from modules.llm.chat_template import ChatTemplate, load_chat_template
from modules.training.checkpoints import CheckpointWriter, latest_checkpoint, read_marker
from modules.training.llm.pretrain import (TrainingError, architecture, build_optimizer, compatibility_problems,
                                           lr_at, resolve_device, resolve_precision, tokenizer_fingerprint)
from modules.training.llm.sft_config import SFTConfig
from modules.training.llm.sft_data import IGNORE, SFTData, collate
from modules.training.rng_state import rng_state, set_rng_state
from modules.training.metrics import MetricsLog, truncate_after
from modules.training.run_dir import RunDir

log = logging.getLogger(__name__)

TRAINABLE = "trainable.safetensors"


@dataclass
class SFTResult:
    run_dir: Path
    step: int
    finished: bool
    final_dir: Path | None
    adapter_dir: Path | None
    last_checkpoint: Path | None


def chat_template_for(config: SFTConfig, base_dir: Path) -> ChatTemplate:
    """The template the run renders with: the model's own, or the builtin the config names."""
    own = load_chat_template(base_dir)
    if not config.chat_template:
        return own
    try:
        return ChatTemplate.builtin(config.chat_template, bos_token=own.bos_token, eos_token=own.eos_token,
                                    unk_token=own.unk_token, pad_token=own.pad_token)
    except ValueError as exc:
        raise TrainingError(f"chat_template: {exc}") from None


class SFTTrainer:
    """One fine-tuning run of ``base_dir`` in ``run`` (new, or resumed from its latest checkpoint)."""

    def __init__(self, config: SFTConfig, base_dir: str | Path, data: SFTData, run: RunDir, *,
                 template: ChatTemplate, resume: bool = False, on_log: Callable[[dict], None] | None = None,
                 should_stop: Callable[[], bool] | None = None):
        from modules.llm.checkpoint import load_model
        self.config, self.data, self.run, self.template = config, data, run, template
        self.base_dir = Path(base_dir)
        self.on_log, self.should_stop = on_log, should_stop
        self.device = resolve_device(config.device)
        self.autocast_dtype = resolve_precision(config.precision, self.device)
        torch.manual_seed(config.seed)
        random.seed(config.seed)
        np.random.seed(config.seed % 2 ** 32)
        self.model = load_model(self.base_dir, dtype=torch.float32).to(self.device)
        self.model_config = self.model.config
        self.tokenizer_hash = tokenizer_fingerprint(self.base_dir)
        self.lora = None
        if config.method == "lora":
            from modules.training.llm.sft_lora import attach_lora
            self.model.requires_grad_(False)
            self.lora = attach_lora(self.model, config, self.base_dir)
        else:
            self.model.requires_grad_(True)
        self.model.train()
        self.accum = config.grad_accum_steps()
        steps_per_epoch = math.ceil(len(data.examples) / config.batch_size)
        self.total_steps = config.max_steps or max(1, math.ceil(config.epochs * steps_per_epoch))
        self.optimizer, self.optimizer_kind = build_optimizer(self.model, config, self.device)
        self.step = 0
        self.writer = CheckpointWriter(run.checkpoints, keep_last=config.keep_last)
        self.resumed_from: Path | None = None
        if resume:
            self._resume()

    # ------------------------------------------------------------------------------------ state
    def trainable_state(self) -> dict[str, torch.Tensor]:
        return {name: p.detach().contiguous().cpu() for name, p in self.model.named_parameters()
                if p.requires_grad}

    def _identity(self) -> dict:
        lora = None
        if self.lora is not None:
            c = self.config
            lora = {"rank": c.lora_rank, "alpha": c.lora_alpha, "targets": sorted(c.lora_target_modules)}
        return {"architecture": architecture(self.model_config), "tokenizer": self.tokenizer_hash,
                "method": self.config.method, "lora": lora}

    def _resume(self) -> None:
        checkpoint = latest_checkpoint(self.run.checkpoints)
        if checkpoint is None:
            raise TrainingError(f"{self.run.root} has no complete checkpoint to resume from; start it again "
                                "without --resume (under another run_name to keep this folder)")
        state = json.loads((checkpoint / "trainer_state.json").read_text(encoding="utf-8"))
        identity = self._identity()
        problems = compatibility_problems(state, identity["architecture"], identity["tokenizer"])
        for key in ("method", "lora"):
            if state.get(key) != identity[key]:
                problems.append(f"{key} differs (checkpoint {state.get(key)!r}, config {identity[key]!r})")
        if problems:
            raise TrainingError(f"Cannot resume from {checkpoint}: " + "; and ".join(problems) +
                                ". Resume with the run's own config.yaml and base_model, or start a new run.")
        from safetensors.torch import load_file
        saved = load_file(str(checkpoint / TRAINABLE), device=str(self.device))
        params = dict(self.model.named_parameters())
        with torch.no_grad():
            for name, tensor in saved.items():
                params[name].copy_(tensor)
        self.optimizer.load_state_dict(torch.load(checkpoint / "optimizer.pt", map_location=self.device,
                                                  weights_only=True))
        set_rng_state(torch.load(checkpoint / "rng.pt", weights_only=True))
        self.data.load_state_dict(state["data"])
        self.step = state["step"]
        self.resumed_from = checkpoint
        truncate_after(self.run.metrics_file, self.step)
        log.info("resumed %s at step %d", checkpoint, self.step)

    def save_checkpoint(self) -> Path:
        from safetensors.torch import save_file
        state = {"step": self.step, "total_steps": self.total_steps, "data": self.data.state_dict(),
                 **self._identity(), "config": self.config.to_dict()}

        def write(folder: Path) -> None:
            save_file(self.trainable_state(), str(folder / TRAINABLE), metadata={"format": "pt"})
            torch.save(self.optimizer.state_dict(), folder / "optimizer.pt")
            torch.save(rng_state(), folder / "rng.pt")
            (folder / "trainer_state.json").write_text(json.dumps(state, indent=2) + "\n", encoding="utf-8")

        return self.writer.save(self.step, write)

    # ------------------------------------------------------------------------------------- loop
    def train(self) -> SFTResult:
        config = self.config
        metrics = MetricsLog(self.run.metrics_file, tensorboard_dir=self.run.root / "tensorboard")
        last_checkpoint = self.resumed_from
        trainable = sum(p.numel() for p in self.model.parameters() if p.requires_grad)
        try:
            if self.step < self.total_steps:
                metrics.log({"kind": "start", "step": self.step, "method": config.method,
                             "parameters": self.model.num_parameters(), "trainable_parameters": trainable,
                             "examples": len(self.data.examples), "grad_accum": self.accum,
                             "total_steps": self.total_steps, "optimizer": self.optimizer_kind,
                             "device": str(self.device),
                             "resumed_from": str(self.resumed_from) if self.resumed_from else None})
            while self.step < self.total_steps:
                started = time.perf_counter()
                loss, tokens, grad_norm, lr = self._optimizer_step()
                seconds = time.perf_counter() - started
                if self.step % config.log_every == 0 or self.step == self.total_steps:
                    record = {"kind": "train", "step": self.step, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                              "assistant_tokens": tokens, "epoch": self.data.epoch,
                              "tokens_per_s": tokens / seconds if seconds > 0 else 0.0, "time": time.time()}
                    metrics.log(record)
                    self._notify(record)
                if config.eval_every and self.data.val_examples and self.step % config.eval_every == 0:
                    record = {"kind": "val", "step": self.step, "val_loss": self.evaluate(), "time": time.time()}
                    metrics.log(record)
                    self._notify(record)
                stop = self.should_stop is not None and self.should_stop()
                due = config.save_every_steps and self.step % config.save_every_steps == 0
                if due or stop:
                    last_checkpoint = self.save_checkpoint()
                if stop:
                    break
            finished = self.step >= self.total_steps
            final = adapter = None
            if finished:
                if last_checkpoint is None or read_marker(last_checkpoint)["step"] != self.step:
                    last_checkpoint = self.save_checkpoint()
                final, adapter = self.write_outputs()
                metrics.log({"kind": "end", "step": self.step, "final": str(final) if final else None,
                             "adapter": str(adapter) if adapter else None})
            return SFTResult(self.run.root, self.step, finished, final, adapter, last_checkpoint)
        finally:
            metrics.close()

    def _optimizer_step(self) -> tuple[float, int, float, float]:
        config = self.config
        lr = lr_at(self.step, config, self.total_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        examples = self.data.next_examples(config.batch_size)
        tokens = sum(e.assistant_tokens for e in examples)
        loss_sum = torch.zeros((), device=self.device)
        for start in range(0, len(examples), config.micro_batch):
            inputs, labels = collate(examples[start:start + config.micro_batch], self.model_config.eos_token_id)
            summed = self._loss_sum(inputs.to(self.device), labels.to(self.device))
            (summed / tokens).backward()
            loss_sum += summed.detach()
        loss = float(loss_sum) / tokens
        params = [p for p in self.model.parameters() if p.requires_grad]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.grad_clip))
        if not (math.isfinite(loss) and math.isfinite(grad_norm)):
            last = latest_checkpoint(self.run.checkpoints)
            raise TrainingError(
                f"The loss became {loss} (gradient norm {grad_norm}) at step {self.step + 1}; the run stopped "
                f"without saving these weights. Try a lower lr (now {config.lr}), precision=fp32, or method=lora. "
                + (f"The last good checkpoint is {last}." if last else "No checkpoint was written yet."))
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        return loss, tokens, grad_norm, lr

    def _loss_sum(self, inputs: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype or torch.float32,
                            enabled=self.autocast_dtype is not None):
            logits = self.model(inputs)
        return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                               ignore_index=IGNORE, reduction="sum")

    @torch.no_grad()
    def evaluate(self) -> float:
        """Mean loss per assistant token over the validation conversations."""
        self.model.eval()
        total, count = 0.0, 0
        try:
            for batch in self.data.val_batches(self.config.micro_batch):
                inputs, labels = collate(batch, self.model_config.eos_token_id)
                total += float(self._loss_sum(inputs.to(self.device), labels.to(self.device)))
                count += sum(e.assistant_tokens for e in batch)
        finally:
            self.model.train()
        return total / count if count else float("nan")

    def _notify(self, record: dict) -> None:
        if self.on_log is not None:
            self.on_log({**record, "total_steps": self.total_steps})

    # ---------------------------------------------------------------------------------- outputs
    def write_outputs(self) -> tuple[Path | None, Path | None]:
        """``adapter/`` (LoRA) and ``final/`` (full, or LoRA merged), each written aside then renamed."""
        adapter = final = None
        if self.lora is not None:
            from modules.training.llm.sft_lora import merge_lora, save_adapter
            adapter = _replace_dir(self.run.root / "adapter", lambda tmp: save_adapter(self.lora, tmp))
            if self.config.merge:
                model = merge_lora(self.lora)
                final = _replace_dir(self.run.final, lambda tmp: self._save_hf(model, tmp))
        else:
            final = _replace_dir(self.run.final, lambda tmp: self._save_hf(self.model, tmp))
        return final, adapter

    def _save_hf(self, model, folder: Path) -> None:
        from modules.llm.checkpoint import save_hf_folder
        save_hf_folder(model, folder, self.base_dir)
        path = folder / "tokenizer_config.json"             # the template trained on goes with the weights
        data = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        data["chat_template"] = self.template.source
        path.write_text(json.dumps(data, indent=2) + "\n", encoding="utf-8")


def _replace_dir(target: Path, write: Callable[[Path], object]) -> Path:
    tmp = target.with_name(target.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    write(tmp)
    if target.exists():
        shutil.rmtree(target)
    tmp.replace(target)
    return target

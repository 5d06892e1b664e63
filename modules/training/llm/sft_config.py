"""The ``sft`` command's config: chat fine-tuning of an existing model, in full or with LoRA.

Validated by the same :func:`modules.training.config.load_config` as pretraining (unknown keys named,
every problem at once). The optimizer and schedule fields have the names and meaning of
:class:`~modules.training.config.PretrainConfig`'s, so the Pretrainer's ``build_optimizer`` and ``lr_at``
serve both. Batches count conversations, not tokens: SFT batches are padded, not packed (see sft_data.py).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

from modules.training.config import optimizer_problems, run_name_problems

#: nn.Linear names inside a Llama block that LoRA may adapt (the same names as transformers' Llama)
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class SFTConfig:
    """Chat fine-tuning hyper-parameters; defaults are common SFT practice for small models."""
    #: the model to fine-tune: a folder name under <data-dir>/models/LLM, or a path to an HF Llama folder
    base_model: str = ""
    #: JSONL conversations ({"messages": [...]} or {"prompt", "response"} per line)
    data: str = ""
    #: optional held-out JSONL of the same form, for a validation loss every eval_every steps
    val_data: str = ""
    #: the model's own template when empty; or a builtin name (tinyllama, chatml, llama2)
    chat_template: str = ""
    #: longest conversation in tokens (longer ones are skipped); 0: the model's context length
    seq_len: int = 0
    #: "full" (every weight) or "lora" (low-rank adapters through peft; the base stays frozen)
    method: str = "full"
    lora_rank: int = 8
    lora_alpha: float = 16.0
    lora_dropout: float = 0.05
    lora_target_modules: list[str] = field(default_factory=lambda: list(LORA_TARGETS))
    #: LoRA: also write final/ as a new HF folder with the adapter merged in (what the Chat tab loads)
    merge: bool = True
    micro_batch: int = 4
    #: conversations per optimizer step; gradient accumulation makes up what micro_batch does not
    batch_size: int = 16
    lr: float = 2e-5
    min_lr: float = 2e-6
    warmup_steps: int = 10
    #: stop after this many optimizer steps, or after this many passes over the data (one is required)
    max_steps: int | None = None
    epochs: float | None = None
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    precision: str = "auto"
    device: str = "auto"
    eval_every: int = 0
    #: a checkpoint every this many optimizer steps (0: only on stop and at the end)
    save_every_steps: int = 0
    keep_last: int = 2
    seed: int = 3407
    run_name: str = ""
    log_every: int = 10

    def grad_accum_steps(self, world_size: int = 1) -> int:
        return self.batch_size // (self.micro_batch * world_size)

    def problems(self, world_size: int = 1) -> list[str]:
        out = []
        for name in ("micro_batch", "batch_size", "keep_last", "log_every"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("seq_len", "warmup_steps", "eval_every", "save_every_steps"):
            if getattr(self, name) < 0:
                out.append(f"{name} must be 0 or more, got {getattr(self, name)}")
        out.extend(optimizer_problems(self, lr_hint="full fine-tuning: about 2e-5; LoRA: about 2e-4"))
        if (self.max_steps is None) == (self.epochs is None):
            out.append("set exactly one of max_steps or epochs: how long the run trains")
        if self.max_steps is not None and self.max_steps < 1:
            out.append(f"max_steps must be at least 1, got {self.max_steps}")
        if self.epochs is not None and not self.epochs > 0:
            out.append(f"epochs must be > 0, got {self.epochs}")
        if self.micro_batch >= 1 and self.batch_size % (self.micro_batch * world_size):
            per = self.micro_batch * world_size
            out.append(f"batch_size ({self.batch_size}) must be a multiple of micro_batch x processes = "
                       f"{self.micro_batch} x {world_size}; try {max(per, self.batch_size // per * per)}")
        if self.method not in ("full", "lora"):
            out.append(f"method must be 'full' or 'lora', got {self.method!r}")
        if self.method == "lora":
            if self.lora_rank < 1:
                out.append(f"lora_rank must be at least 1, got {self.lora_rank} (8 or 16 are common)")
            if not self.lora_alpha > 0:
                out.append(f"lora_alpha must be > 0, got {self.lora_alpha} (often 2 x lora_rank)")
            if not 0 <= self.lora_dropout < 1:
                out.append(f"lora_dropout must be in [0, 1), got {self.lora_dropout}")
            unknown = [t for t in self.lora_target_modules if t not in LORA_TARGETS]
            if unknown or not self.lora_target_modules:
                out.append(f"lora_target_modules must be a non-empty list of {', '.join(LORA_TARGETS)}; "
                           f"got {self.lora_target_modules}")
        if not self.base_model:
            out.append("base_model is required: a folder of models/LLM (or a path to an HF Llama folder)")
        if not self.data:
            out.append("data is required: a JSONL file of conversations")
        out.extend(run_name_problems(self.run_name))
        return out

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

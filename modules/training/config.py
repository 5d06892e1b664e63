"""Training configs: dataclasses read from YAML plus ``key=value`` overrides, validated all at once.

Why one validator for every field: a training run that dies after an hour on a typo is the worst kind of
error, so :func:`load_config` checks every key before anything starts (unknown keys named with the closest
known one, wrong types, impossible values, a global batch that does not split into micro-batches) and raises
one :class:`ConfigError` listing every problem. The image trainer reuses :func:`config_from_dict`.

PyYAML reads ``4e-4`` (no dot) as a string, so numeric strings are accepted for number fields.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any


class ConfigError(ValueError):
    """Every problem of one config, one per line; ``problems`` keeps them as a list."""

    def __init__(self, problems: list[str], source: str = ""):
        self.problems = list(problems)
        where = f" {source}" if source else ""
        super().__init__(f"Invalid training config{where}:\n  - " + "\n  - ".join(self.problems))


@dataclass
class PretrainConfig:
    """Pretraining hyper-parameters; defaults follow TinyLlama's recipe (llm.md §1) where it has one."""
    #: a preset of :data:`modules.llm.config.PRESETS` ...
    model_preset: str = "tiny-gqa"
    #: ... with any LlamaConfig field overridden (``model.hidden_size=128``)
    model: dict = field(default_factory=dict)
    #: continue from an existing HF model folder instead of random weights (its shape wins over the preset)
    init_from: str = ""
    #: the packed dataset folder (``build_dataset``'s out_dir)
    data: str = ""
    #: tokenizer folder copied into ``final/``; empty: ``<data>/tokenizer`` or ``init_from``
    tokenizer: str = ""
    seq_len: int = 256
    micro_batch: int = 8
    #: tokens per optimizer step over all processes; gradient accumulation makes up the rest
    global_batch_tokens: int = 16384
    lr: float = 4e-4
    min_lr: float = 4e-5
    warmup_steps: int = 2000
    #: stop after this many optimizer steps, or after max_tokens (one of them is required)
    max_steps: int | None = None
    max_tokens: int | None = None
    weight_decay: float = 0.1
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    grad_clip: float = 1.0
    #: auto: bf16 autocast on CUDA and on CPUs with AVX-512 BF16 / AMX, else fp32
    precision: str = "auto"
    activation_checkpointing: bool = False
    #: torch.compile each decoder block and the loss (inductor: fused RMSNorm/RoPE/SwiGLU/casts); the first step
    #: pays ~1 min of compilation, later steps run faster (benchmarks/train_llm.py measures how much)
    compile: bool = False
    device: str = "auto"
    #: under torchrun: ddp (a whole model per process) or fsdp (FSDP2, parameters, gradients and optimizer state
    #: sharded over the processes); both on CPU/gloo and CUDA/nccl.
    #: A single process (no torchrun) trains the one model either way.
    parallel: str = "ddp"
    eval_every: int = 100
    eval_batches: int = 10
    #: a checkpoint every this many tokens (0: only at milestones, on stop and at the end)
    save_every_tokens: int = 0
    #: token counts at which a checkpoint is kept for good (never pruned)
    milestones: list[int] = field(default_factory=list)
    keep_last: int = 3
    seed: int = 3407
    run_name: str = ""
    log_every: int = 10

    # ------------------------------------------------------------------------------- derived values
    def tokens_per_micro_batch(self, world_size: int = 1) -> int:
        return self.micro_batch * self.seq_len * world_size

    def grad_accum_steps(self, world_size: int = 1) -> int:
        return self.global_batch_tokens // self.tokens_per_micro_batch(world_size)

    def total_steps(self) -> int:
        """Optimizer steps of the whole run (max_steps, or max_tokens rounded up to whole steps)."""
        if self.max_steps is not None:
            return self.max_steps
        return -(-int(self.max_tokens) // self.global_batch_tokens)

    def problems(self, world_size: int = 1) -> list[str]:
        """Value checks beyond types (types are checked by :func:`config_from_dict`)."""
        out = []
        for name in ("seq_len", "micro_batch", "global_batch_tokens", "keep_last", "log_every", "eval_batches"):
            if getattr(self, name) < 1:
                out.append(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("warmup_steps", "eval_every", "save_every_tokens"):
            if getattr(self, name) < 0:
                out.append(f"{name} must be 0 or more, got {getattr(self, name)}")
        out.extend(optimizer_problems(self, lr_hint="TinyLlama uses 4e-4"))
        out.extend(self._parallel_problems(world_size))
        if self.max_steps is None and self.max_tokens is None:
            out.append("set max_steps or max_tokens: how long the run trains")
        if self.max_steps is not None and self.max_tokens is not None:
            out.append("set max_steps or max_tokens, not both")
        for name in ("max_steps", "max_tokens"):
            value = getattr(self, name)
            if value is not None and value < 1:
                out.append(f"{name} must be at least 1, got {value}")
        if any(m < 1 for m in self.milestones):
            out.append(f"milestones are token counts >= 1, got {self.milestones}")
        per_micro = self.tokens_per_micro_batch(world_size)
        if per_micro > 0 and self.global_batch_tokens % per_micro:
            out.append(f"global_batch_tokens ({self.global_batch_tokens}) must be a multiple of micro_batch x "
                       f"processes x seq_len = {self.micro_batch} x {world_size} x {self.seq_len} = {per_micro}; "
                       f"try {max(per_micro, self.global_batch_tokens // per_micro * per_micro)}"
                       + (" (or another --nproc-per-node)" if world_size > 1 else ""))
        if not self.data:
            out.append("data is required: the packed dataset folder made by the dataset builder")
        out.extend(run_name_problems(self.run_name))
        out.extend(self._model_problems())
        return out

    def _parallel_problems(self, world_size: int = 1) -> list[str]:
        if self.parallel not in ("ddp", "fsdp"):
            return [f"parallel must be ddp or fsdp, got {self.parallel!r}"]
        if self.compile and self.parallel == "fsdp" and world_size > 1:
            return ["compile=true does not combine with parallel=fsdp (FSDP's per-block hooks sit inside the "
                    "compiled regions); use parallel=ddp, or compile=false"]
        return []

    def _model_problems(self) -> list[str]:
        from modules.llm.config import PRESETS, LlamaConfig
        if self.init_from:
            return []
        if self.model_preset not in PRESETS:
            return [f"model_preset {self.model_preset!r} is unknown{_suggest(self.model_preset, PRESETS)}; "
                    f"known: {', '.join(sorted(PRESETS))}"]
        known = {f.name for f in fields(LlamaConfig)} - {"source"}
        unknown = [k for k in self.model if k not in known]
        if unknown:
            return [f"model.{k} is not a Llama config field{_suggest(k, known)}" for k in unknown]
        try:
            self.model_config()
        except (ValueError, TypeError) as exc:
            return [f"model: {exc}"]
        return []

    def model_config(self):
        """The :class:`~modules.llm.config.LlamaConfig` to build (preset + ``model`` overrides)."""
        from modules.llm.config import LlamaConfig
        if self.init_from:
            return LlamaConfig.from_json_file(Path(self.init_from) / "config.json")
        config = LlamaConfig.from_name(self.model_preset, **self.model)
        if config.max_position_embeddings < self.seq_len:
            config.max_position_embeddings = self.seq_len
        return config

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


# ------------------------------------------------------------------------------------------ loading

def optimizer_problems(config: Any, *, lr_hint: str) -> list[str]:
    """The checks every trainer's optimizer and precision fields share (``lr``, ``min_lr``, ``weight_decay``,
    ``betas``, ``grad_clip``, ``precision``); *lr_hint* says what a usual learning rate is for that trainer."""
    out = []
    if not config.lr > 0:
        out.append(f"lr must be > 0, got {config.lr} ({lr_hint})")
    if not 0 <= config.min_lr <= config.lr:
        out.append(f"min_lr must be between 0 and lr ({config.lr}), got {config.min_lr}")
    if config.weight_decay < 0:
        out.append(f"weight_decay must be >= 0, got {config.weight_decay}")
    if len(config.betas) != 2 or not all(0 <= b < 1 for b in config.betas):
        out.append(f"betas must be two numbers in [0, 1), got {config.betas}")
    if not config.grad_clip > 0:
        out.append(f"grad_clip must be > 0, got {config.grad_clip}")
    if config.precision not in ("auto", "fp32", "bf16"):
        out.append(f"precision must be auto, fp32 or bf16, got {config.precision!r}")
    return out


def run_name_problems(run_name: str) -> list[str]:
    """A run name is one plain folder name under ``<data-dir>/training/``."""
    if run_name and (os.sep in run_name or run_name.startswith(".")):
        return [f"run_name {run_name!r} must be a plain folder name (no '/' and no leading '.')"]
    return []

def load_config(path: str | Path | None, overrides: list[str] | tuple[str, ...] = (), *,
                cls: type = PretrainConfig, world_size: int = 1, base: dict | None = None):
    """Read ``path`` (YAML; None: start from ``base`` or the defaults), apply ``key=value`` overrides
    (dotted keys reach into dict fields: ``model.hidden_size=64``), validate, return a ``cls``."""
    import yaml

    data: dict[str, Any] = dict(base or {})
    source = ""
    if path is not None:
        source = str(path)
        p = Path(path)
        if not p.is_file():
            raise ConfigError([f"config file {p} does not exist; see configs/training/ for examples"])
        try:
            loaded = yaml.safe_load(p.read_text(encoding="utf-8"))
        except yaml.YAMLError as exc:
            raise ConfigError([f"not valid YAML: {exc}"], source) from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError([f"the top level must be a mapping of key: value, got {type(loaded).__name__}"],
                              source)
        data.update(loaded)
    problems = []
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            problems.append(f"override {item!r} must look like key=value (for example lr=3e-4)")
            continue
        try:
            value = yaml.safe_load(raw) if raw.strip() else ""
        except yaml.YAMLError:
            value = raw
        head, _, rest = key.strip().partition(".")
        if rest:
            nested = data.get(head)
            data[head] = {**(nested if isinstance(nested, dict) else {}), rest: value}
        else:
            data[head] = value
    return config_from_dict(cls, data, source=source, world_size=world_size, problems=problems)


def config_from_dict(cls: type, data: dict[str, Any], *, source: str = "", world_size: int = 1,
                     problems: list[str] | None = None):
    """Build ``cls`` from ``data``: unknown keys and wrong types are collected, then ``cls.problems()``."""
    problems = list(problems or [])
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    kwargs = {}
    for key, value in data.items():
        if key not in known:
            problems.append(f"unknown key {key!r}{_suggest(key, known)}")
            continue
        ok, converted = _convert(value, hints[key])
        if ok:
            kwargs[key] = converted
        else:
            problems.append(f"{key} must be {_type_name(hints[key])}, got {value!r} ({type(value).__name__})")
    config = cls(**kwargs)                     # the well-typed keys, so their values are checked too
    problems += config.problems(world_size=world_size)
    if problems:
        raise ConfigError(problems, source)
    return config


def _convert(value: Any, hint: Any) -> tuple[bool, Any]:
    """(True, value converted to ``hint``) or (False, None)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for option in typing.get_args(hint):
            ok, converted = _convert(value, option)
            if ok:
                return True, converted
        return False, None
    if hint is type(None):
        return value is None, None
    if origin is list:
        if isinstance(value, tuple):
            value = list(value)
        if not isinstance(value, list):
            return False, None
        (item_hint,) = typing.get_args(hint) or (Any,)
        out = []
        for item in value:
            ok, converted = _convert(item, item_hint)
            if not ok:
                return False, None
            out.append(converted)
        return True, out
    if hint is dict or origin is dict:
        return (True, dict(value)) if isinstance(value, dict) else (False, None)
    if hint is Any:
        return True, value
    if hint is bool:
        return (True, value) if isinstance(value, bool) else (False, None)
    if hint is int:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, int):
            return True, value
        if isinstance(value, float) and value.is_integer():
            return True, int(value)          # 1e6 in YAML is a float
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                return False, None
            return (True, int(number)) if number.is_integer() else (False, None)
        return False, None
    if hint is float:
        if isinstance(value, bool):
            return False, None
        if isinstance(value, (int, float)):
            return True, float(value)
        if isinstance(value, str):
            try:
                return True, float(value)
            except ValueError:
                return False, None
        return False, None
    if hint is str:
        return (True, value) if isinstance(value, str) else (False, None)
    return (True, value) if isinstance(value, hint) else (False, None)


def _type_name(hint: Any) -> str:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(h) for h in typing.get_args(hint))
    if hint is type(None):
        return "null"
    if origin is list:
        return f"a list of {_type_name(typing.get_args(hint)[0])}"
    names = {int: "an integer", float: "a number", str: "a string", bool: "true or false", dict: "a mapping"}
    return names.get(hint, getattr(hint, "__name__", str(hint)))


def _suggest(word: str, candidates) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def world_size_from_env() -> int:
    """The process count torchrun announces (1 when run directly)."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1

"""kohya's ``ss_*`` training record and the SAI ``modelspec.*`` keys, for a LoRA file's header.

Why: LoRA users judge a file by this header. A1111 takes the alias from ``ss_output_name`` and the
model type from ``ss_base_model_version``/``ss_v2``; the additional-networks extension, civitai and
metadata viewers show the rank, alpha, learning rates, steps, resolution, seed and the caption tag
counts (``ss_tag_frequency``). The keys, and their spelling as ``str()`` of Python values ("True",
"None", "(512, 512)", JSON for the nested ones), follow sd-scripts' ``train_network.py``, so readers
written for kohya files read ours; ``ss_network_module`` says ``networks.lora`` because the layers,
names and scale are exactly that module's.
"""
from __future__ import annotations

import datetime
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Iterable, Mapping

BASE_MODEL_VERSIONS = {("sd1", False): "sd_v1", ("sd1", True): "sd_v1_v", ("sd2", False): "sd_v2",
                       ("sd2", True): "sd_v2_v", ("sdxl", False): "sdxl_base_v1-0"}
_ARCHITECTURES = {"sd_v1": "stable-diffusion-v1", "sd_v1_v": "stable-diffusion-v1", "sd_v2": "stable-diffusion-v2-512",
                  "sd_v2_v": "stable-diffusion-v2-768-v", "sdxl_base_v1-0": "stable-diffusion-xl-v1-base"}


class KohyaMetadataError(ValueError):
    """The training record cannot describe a valid kohya LoRA; the message lists every problem."""


def tag_frequency(captions_by_folder: Mapping[str, Iterable[str]]) -> dict[str, dict[str, int]]:
    """``ss_tag_frequency``: per dataset folder, how many captions hold each comma-separated tag
    (stripped, lower-cased, as sd-scripts counts them)."""
    out: dict[str, dict[str, int]] = {}
    for folder, captions in captions_by_folder.items():
        counts = out.setdefault(folder, {})
        for caption in captions:
            for tag in caption.split(","):
                tag = tag.strip().lower()
                if tag:
                    counts[tag] = counts.get(tag, 0) + 1
    return out


@dataclass
class TrainingRecord:
    """What a LoRA training run was; each field becomes the ``ss_`` key of the same name (see the
    table in :func:`kohya_metadata`). ``None`` is written as "None", as sd-scripts does for unset options."""
    output_name: str
    kind: str  # "sd1", "sd2" or "sdxl" (Atelier's model kinds)
    network_dim: int
    network_alpha: float
    resolution: tuple[int, int]
    learning_rate: float
    v_prediction: bool = False
    unet_lr: float | None = None
    text_encoder_lr: float | None = None  # None: the text encoder was not trained
    network_dropout: float | None = None
    conv_dim: int | None = None
    conv_alpha: float | None = None
    network_args: dict[str, str] = field(default_factory=dict)  # further kohya network_args
    optimizer: str = "torch.optim.AdamW"
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    max_train_steps: int | None = None
    num_epochs: int | None = None
    num_batches_per_epoch: int | None = None
    batch_size: int = 1
    total_batch_size: int | None = None  # batch × processes × accumulation; computed when None
    num_processes: int = 1
    gradient_accumulation_steps: int = 1
    gradient_checkpointing: bool = False
    mixed_precision: str = "no"
    seed: int | None = None
    noise_offset: float | None = None
    min_snr_gamma: float | None = None
    clip_skip: int | None = None
    max_token_length: int | None = None
    max_grad_norm: float = 1.0
    num_train_images: int = 0  # images × repeats
    num_reg_images: int = 0
    caption_dropout_rate: float = 0.0
    shuffle_caption: bool = False
    keep_tokens: int = 0
    flip_aug: bool = False
    enable_bucket: bool = False
    min_bucket_reso: int | None = None
    max_bucket_reso: int | None = None
    bucket_info: dict | None = None
    cache_latents: bool = False
    prior_loss_weight: float = 1.0
    dataset_dirs: dict[str, dict] = field(default_factory=dict)  # {"10_cat": {"n_repeats": 10, "img_count": 12}}
    reg_dataset_dirs: dict[str, dict] = field(default_factory=dict)
    tag_frequency: dict[str, dict[str, int]] = field(default_factory=dict)
    sd_model_name: str | None = None
    sd_model_hash: str | None = None  # A1111's old 8-hex hash of the base checkpoint
    new_sd_model_hash: str | None = None  # sha256 of the base checkpoint file
    vae_name: str | None = None
    training_comment: str | None = None
    session_id: int = field(default_factory=lambda: secrets.randbelow(2 ** 31))
    training_started_at: float = field(default_factory=time.time)
    extra: dict[str, str] = field(default_factory=dict)  # further ss_* keys, written as given

    def problems(self) -> list[str]:
        found = []
        if not self.output_name or not isinstance(self.output_name, str):
            found.append(f"output_name must be a non-empty string, got {self.output_name!r}")
        if (self.kind, bool(self.v_prediction)) not in BASE_MODEL_VERSIONS:
            found.append(f"kind must be sd1, sd2 or sdxl (SDXL without v-prediction), got {self.kind!r}"
                         f"{' with v-prediction' if self.v_prediction else ''}")
        if not isinstance(self.network_dim, int) or self.network_dim <= 0:
            found.append(f"network_dim must be a positive integer, got {self.network_dim!r}")
        if self.conv_dim is not None and (not isinstance(self.conv_dim, int) or self.conv_dim <= 0):
            found.append(f"conv_dim must be a positive integer or None, got {self.conv_dim!r}")
        if len(tuple(self.resolution)) != 2 or any(not isinstance(v, int) or v <= 0 for v in self.resolution):
            found.append(f"resolution must be (width, height) in pixels, got {self.resolution!r}")
        found += [f"extra key {k!r} must start with ss_ and have a string value" for k, v in self.extra.items()
                  if not k.startswith("ss_") or not isinstance(v, str)]
        return found

    @property
    def base_model_version(self) -> str:
        return BASE_MODEL_VERSIONS[self.kind, bool(self.v_prediction)]


def kohya_metadata(record: TrainingRecord, *, steps: int, epoch: int,
                   finished_at: float | None = None) -> dict[str, str]:
    """The header metadata for a LoRA saved after *steps* optimizer steps in *epoch* (1-based, as kohya)."""
    problems = record.problems()
    if problems:
        raise KohyaMetadataError("Cannot write the LoRA's training metadata: " + "; ".join(problems))
    r = record
    finished_at = time.time() if finished_at is None else finished_at
    network_args = dict(r.network_args)
    if r.conv_dim is not None:
        network_args.update(conv_dim=r.conv_dim, conv_alpha=1.0 if r.conv_alpha is None else r.conv_alpha)
    total = r.total_batch_size or r.batch_size * r.num_processes * r.gradient_accumulation_steps
    values = {
        "ss_session_id": r.session_id, "ss_training_started_at": r.training_started_at,
        "ss_output_name": r.output_name, "ss_learning_rate": r.learning_rate,
        "ss_text_encoder_lr": r.text_encoder_lr, "ss_unet_lr": r.unet_lr,
        "ss_num_train_images": r.num_train_images, "ss_num_reg_images": r.num_reg_images,
        "ss_num_batches_per_epoch": r.num_batches_per_epoch, "ss_num_epochs": r.num_epochs,
        "ss_gradient_checkpointing": bool(r.gradient_checkpointing),
        "ss_gradient_accumulation_steps": r.gradient_accumulation_steps, "ss_max_train_steps": r.max_train_steps,
        "ss_lr_warmup_steps": r.lr_warmup_steps, "ss_lr_scheduler": r.lr_scheduler,
        "ss_network_module": "networks.lora", "ss_network_dim": r.network_dim, "ss_network_alpha": r.network_alpha,
        "ss_network_dropout": r.network_dropout, "ss_mixed_precision": r.mixed_precision, "ss_full_fp16": False,
        "ss_v2": r.kind == "sd2", "ss_base_model_version": r.base_model_version, "ss_clip_skip": r.clip_skip,
        "ss_max_token_length": r.max_token_length, "ss_cache_latents": bool(r.cache_latents), "ss_seed": r.seed,
        "ss_noise_offset": r.noise_offset, "ss_min_snr_gamma": r.min_snr_gamma,
        "ss_zero_terminal_snr": False, "ss_training_comment": r.training_comment, "ss_optimizer": r.optimizer,
        "ss_max_grad_norm": r.max_grad_norm, "ss_caption_dropout_rate": r.caption_dropout_rate,
        "ss_prior_loss_weight": r.prior_loss_weight,
        "ss_batch_size_per_device": r.batch_size, "ss_total_batch_size": total,
        "ss_resolution": tuple(r.resolution), "ss_flip_aug": bool(r.flip_aug), "ss_color_aug": False,
        "ss_random_crop": False, "ss_shuffle_caption": bool(r.shuffle_caption),
        "ss_enable_bucket": bool(r.enable_bucket), "ss_min_bucket_reso": r.min_bucket_reso,
        "ss_max_bucket_reso": r.max_bucket_reso, "ss_keep_tokens": r.keep_tokens,
        "ss_dataset_dirs": json.dumps(r.dataset_dirs), "ss_reg_dataset_dirs": json.dumps(r.reg_dataset_dirs),
        "ss_tag_frequency": json.dumps(r.tag_frequency), "ss_bucket_info": json.dumps(r.bucket_info),
        "ss_steps": steps, "ss_epoch": epoch, "ss_training_finished_at": finished_at,
    }
    if network_args:  # sd-scripts writes its network_args as given on the command line: strings
        values["ss_network_args"] = json.dumps({k: str(v) for k, v in network_args.items()})
    for key, value in (("ss_sd_model_name", r.sd_model_name), ("ss_sd_model_hash", r.sd_model_hash),
                       ("ss_new_sd_model_hash", r.new_sd_model_hash), ("ss_vae_name", r.vae_name)):
        if value is not None:
            values[key] = value
    out = {k: str(v) for k, v in values.items()}
    out.update(r.extra)
    out.update(modelspec(r, saved_at=finished_at))
    return out


def modelspec(record: TrainingRecord, *, saved_at: float) -> dict[str, str]:
    """SAI Model Spec keys as sd-scripts writes them for a LoRA (architecture ``…/lora``, dated at the save)."""
    sdxl = record.kind == "sdxl"
    spec = {
        "modelspec.sai_model_spec": "1.0.1",
        "modelspec.architecture": _ARCHITECTURES[record.base_model_version] + "/lora",
        "modelspec.implementation": "https://github.com/Stability-AI/generative-models" if sdxl else "diffusers",
        "modelspec.title": record.output_name,
        "modelspec.resolution": f"{record.resolution[0]}x{record.resolution[1]}",
        "modelspec.date": datetime.datetime.fromtimestamp(int(saved_at)).isoformat(),
        "modelspec.prediction_type": "v" if record.v_prediction else "epsilon",
    }
    if record.clip_skip is not None:
        spec["modelspec.encoder_layer"] = str(record.clip_skip)
    return spec

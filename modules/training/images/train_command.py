"""Config -> accelerate -> base model -> dataset -> run folder -> :class:`~.trainer.ImageTrainer` -> files.

The body shared by the image-training commands (``lora``, ``finetune``, ``dreambooth``), the tests and, later,
the Train tab. Output files go where Atelier finds them: a LoRA into
``<data-dir>/models/Lora/<output_name>.safetensors`` (kohya format), a fine-tuned model into
``models/Stable-diffusion/<output_name>.safetensors`` (plus a diffusers folder in the run's ``final/``);
never over an existing file (checked before anything trains). DreamBooth first makes its missing class
images (:mod:`.dreambooth`), then trains with :class:`~.dreambooth.DreamBoothTrainer`.
"""
from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Callable

from modules.training.checkpoints import CheckpointWriteError
from modules.training.config import ConfigError, world_size_from_env
from modules.training.run_dir import RunDir, RunDirError, create_run_dir, open_run_dir

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (see configs/training/lora-sd15-tiny.yaml)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its latest checkpoint")
    parser.add_argument("--data-dir", help="Atelier's data dir: base models from <data-dir>/models/Stable-diffusion,"
                                           " runs into <data-dir>/training/ (default: the repository folder)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")


def make_accelerator(config):
    """The run's Accelerator (DDP under ``accelerate launch`` / torchrun; gloo on the CPU)."""
    import torch
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, GradientState
    if config.mixed_precision == "fp16" and not torch.cuda.is_available():
        raise ConfigError(["mixed_precision=fp16 needs a CUDA GPU and this machine has none; use bf16 or no"])
    # accelerate keeps one state per process and refuses a second Accelerator with another precision or
    # accumulation; the Train tab runs one training after another in the same process, so each run starts
    # it afresh (the process group, accelerate's PartialState, is kept)
    AcceleratorState._reset_state()
    GradientState._reset_state()
    return Accelerator(mixed_precision=config.mixed_precision,
                       gradient_accumulation_steps=config.gradient_accumulation,
                       cpu=not torch.cuda.is_available())


def bucket_spec(config):
    from modules.training.images.buckets import BucketSpec
    return BucketSpec(resolution=config.resolution, min_side=config.min_bucket_reso,
                      max_side=config.max_bucket_reso, enabled=config.enable_bucket)


def open_dataset(config, folder: str | Path | None = None, default_caption: str | None = None):
    """The run's images (``dataset``, DreamBooth's ``instance_dir``), or *folder* (its class images)."""
    from modules.training.images.captions import CaptionOptions
    from modules.training.images.dataset import ImageDataset
    captions = CaptionOptions(dropout_rate=config.caption_dropout_rate, shuffle=config.shuffle_caption,
                              keep_tokens=config.keep_tokens)
    if folder is None and config.mode == "dreambooth":
        default_caption = config.instance_prompt.strip()
    return ImageDataset(folder if folder is not None else config.images_folder, buckets=bucket_spec(config),
                        captions=captions, default_caption=default_caption)


def checkpoint_bytes(filename: str | Path) -> int:
    """Bytes on disk of a checkpoint (a file, or a diffusers folder's files): the model manager's estimate."""
    path = Path(filename)
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.is_dir() else 0


def lora_output_path(config, lora_dir: Path) -> Path:
    return Path(lora_dir) / f"{config.output_name or config.run_name}.safetensors"


def run_image_training(config_path: str | None, overrides: list[str], *, data_dir: str | Path, mode: str,
                       resume: str | None = None, should_stop: Callable[[], bool] | None = None,
                       on_log: Callable[[dict], None] | None = None,
                       base_lease: Callable[[Callable[[], object], int], object] | None = None):
    """Train per the config (the ``mode`` the command is for); returns the :class:`~.trainer.TrainResult`.

    *base_lease(load, size_bytes)* (the Train tab's: :func:`modules.training.model_lease.manager_base_lease`)
    loads the base model through the app's model manager; without it the base is loaded directly."""
    from accelerate.utils import broadcast_object_list

    from modules.paths import Paths
    from modules.training.images.base_model import find_base, load_base
    from modules.training.images.config import base_problems, load_image_config, timestep_problems
    from modules.training.images.trainer import ImageTrainer
    world_size = world_size_from_env()
    run = open_run_dir(resume) if resume else None
    config = load_image_config(config_path, overrides, world_size=world_size,
                               base=run.read_config() if run else None)
    if config.mode != mode:
        raise ConfigError([f"this config is for mode={config.mode}; run it with the {config.mode} command "
                           f"(or set mode={mode})"])
    paths = Paths.from_options(data_dir)
    hold = base_lease or (lambda load, size_bytes: load())
    if config.init == "random":
        from modules.training.images.base_model import BaseModel
        from modules.training.images.finetune import build_random_sd15

        def build_random():
            pipe = build_random_sd15(config.architecture, config.seed, vae_path=config.vae or None,
                                     prediction_type="v_prediction" if config.prediction_type == "v_prediction"
                                     else "epsilon")
            for module in (pipe.unet, pipe.vae, pipe.text_encoder):
                module.requires_grad_(False)
            return BaseModel(pipe=pipe, kind="sd1", info=None)
        base = hold(build_random, 0)
    else:
        info = find_base(config.base_model, paths.model_dir("Stable-diffusion"))
        base = hold(lambda: load_base(info), checkpoint_bytes(info.filename))
        problems = base_problems(config, base.kind, info.name)
        if problems:
            raise ConfigError(problems)
    problems = timestep_problems(config, base.pipe.scheduler.config.num_train_timesteps)
    if problems:
        raise ConfigError(problems)
    accelerator = make_accelerator(config)
    if not config.run_name:
        name = [f"{mode}-{time.strftime('%Y%m%d-%H%M%S')}"]
        broadcast_object_list(name)                      # one name for every process
        config.run_name = name[0]
    if config.trains_lora:
        output = lora_output_path(config, paths.model_dir("Lora"))
        taken = [output] if "kohya" in config.output_formats else []
    else:
        output = paths.model_dir("Stable-diffusion") / f"{config.output_name or config.run_name}.safetensors"
        taken = [output, output.with_suffix("")]
    for path in taken:
        if path.exists():
            raise ConfigError([f"{path} exists already and is never overwritten; choose another output_name "
                               "(or move that file away)"])
    dataset = open_dataset(config)
    if run is None:
        root = [None]
        if accelerator.is_main_process:
            root = [str(create_run_dir(data_dir, config.run_name, config.to_dict()).root)]
        broadcast_object_list(root)
        run = RunDir(Path(root[0]))
    elif accelerator.is_main_process:
        run.write_config(config.to_dict())

    def finish(trainer) -> list[Path]:
        if config.trains_lora:
            return write_lora_outputs(trainer, output)
        from modules.training.images.finetune import write_finetune_outputs
        return write_finetune_outputs(trainer, output)

    common = dict(resume=bool(resume), finish=finish, should_stop=should_stop, on_log=on_log)
    if mode != "dreambooth":
        return ImageTrainer(config, base, dataset, run, accelerator, **common).train()
    from modules.training.images.dreambooth import DreamBoothTrainer, class_folder, prepare_class_images
    class_dataset = None
    if config.prior_preservation:
        folder = class_folder(config, run.root)
        prepare_class_images(config, base, folder, accelerator, bucket_spec(config),
                             lora_dir=paths.model_dir("Lora"))
        from modules.training.images.dataset import DatasetError
        try:
            class_dataset = open_dataset(config, folder, default_caption=config.class_prompt.strip())
        except DatasetError as exc:
            raise DatasetError(f"the class images (class_dir {folder}, num_class_images={config.num_class_images}) "
                               f"cannot be read: {exc}") from None
    return DreamBoothTrainer(config, base, dataset, run, accelerator, class_dataset=class_dataset,
                             **common).train()


def write_lora_outputs(trainer, output: Path) -> list[Path]:
    """The kohya file (with kohya's ``ss_*`` record) into models/Lora, and a diffusers-format copy in the
    run's ``final/`` when ``output_formats`` lists it."""
    from modules.training.images.diffusers_lora import save_diffusers_lora
    from modules.training.images.kohya_format import save_peft_as_kohya
    from modules.training.images.kohya_metadata import TrainingRecord, kohya_metadata, tag_frequency
    c, base, dataset = trainer.config, trainer.base, trainer.dataset
    classes = getattr(trainer, "class_dataset", None)          # DreamBooth's, with prior preservation
    written = []
    if "kohya" in c.output_formats:
        captions: dict[str, list[str]] = {}
        for data in (dataset, classes) if classes is not None else (dataset,):
            for record in data.records:
                captions.setdefault(_folder_name(data, record), []).append(", ".join(record.caption_lines))
        dreambooth = {}
        if c.mode == "dreambooth":
            dreambooth = dict(num_reg_images=classes.images_per_epoch if classes is not None else 0,
                              prior_loss_weight=c.prior_loss_weight,
                              reg_dataset_dirs=_dataset_dirs(classes) if classes is not None else {},
                              extra={"ss_datasets": _kohya_datasets(trainer)})
        record = TrainingRecord(
            output_name=output.stem, kind=base.kind, network_dim=c.rank, network_alpha=c.alpha,
            resolution=(c.resolution, c.resolution), learning_rate=c.unet_lr,
            v_prediction=trainer.prediction_type == "v_prediction", unet_lr=c.unet_lr,
            text_encoder_lr=c.text_encoder_lr if c.train_text_encoder else None, network_dropout=c.lora_dropout,
            conv_dim=c.conv_rank or None, conv_alpha=c.conv_alpha if c.conv_rank else None,
            optimizer={"adamw": "torch.optim.AdamW", "adamw8bit": "bitsandbytes.optim.AdamW8bit",
                       "prodigy": "prodigyopt.Prodigy"}[c.optimizer],
            lr_scheduler=c.lr_scheduler, lr_warmup_steps=c.warmup_steps, max_train_steps=trainer.total_steps,
            num_epochs=c.epochs, num_batches_per_epoch=trainer.sampler.batches_per_epoch, batch_size=c.batch_size,
            num_processes=trainer.world, gradient_accumulation_steps=c.gradient_accumulation,
            gradient_checkpointing=c.gradient_checkpointing, mixed_precision=c.mixed_precision, seed=c.seed,
            noise_offset=c.noise_offset or None, min_snr_gamma=c.min_snr_gamma or None,
            max_grad_norm=c.max_grad_norm, num_train_images=dataset.images_per_epoch,
            caption_dropout_rate=c.caption_dropout_rate, shuffle_caption=c.shuffle_caption,
            keep_tokens=c.keep_tokens, enable_bucket=c.enable_bucket, cache_latents=c.cache_latents != "none",
            dataset_dirs=_dataset_dirs(dataset), tag_frequency=tag_frequency(captions),
            sd_model_name=base.info.name, **dreambooth)
        metadata = kohya_metadata(record, steps=trainer.step, epoch=trainer.sampler.epoch + 1)
        written.append(save_peft_as_kohya(output, base.trained, metadata, sdxl=base.sdxl))
    if "diffusers" in c.output_formats:
        written.append(save_diffusers_lora(trainer.run.final, base.trained, sdxl=base.sdxl))
    for path in written:
        log.info("wrote %s", path)
    return written


def _folder_name(dataset, record) -> str:
    """kohya's name of an image's folder: its ``N_concept`` folder, or a plain dataset folder's own name."""
    return dataset.root.name if record.concept.folder == "." else record.concept.folder


def _dataset_dirs(dataset) -> dict[str, dict]:
    """``ss_dataset_dirs`` / ``ss_reg_dataset_dirs``: per folder, its repeats and image count."""
    dirs: dict[str, dict] = {}
    for record in dataset.records:
        entry = dirs.setdefault(_folder_name(dataset, record), {"n_repeats": record.repeats, "img_count": 0})
        entry["img_count"] += 1
    return dirs


def _kohya_datasets(trainer) -> str:
    """sd-scripts' ``ss_datasets`` for a DreamBooth run: one dataset whose subsets are the instance folders
    (``class_tokens`` the instance prompt) and the class folders (``is_reg``, the class prompt)."""
    import json
    c = trainer.config
    classes = getattr(trainer, "class_dataset", None)
    subsets = []
    for data, tokens, is_reg in ((trainer.dataset, c.instance_prompt, False), (classes, c.class_prompt, True)):
        if data is None:
            continue
        for folder, entry in _dataset_dirs(data).items():
            subsets.append({"img_count": entry["img_count"], "num_repeats": entry["n_repeats"], "color_aug": False,
                            "flip_aug": False, "random_crop": False, "shuffle_caption": c.shuffle_caption,
                            "keep_tokens": c.keep_tokens, "image_dir": folder, "class_tokens": tokens.strip(),
                            "is_reg": is_reg})
    return json.dumps([{"is_dreambooth": True, "batch_size_per_device": c.batch_size,
                        "num_train_images": trainer.dataset.images_per_epoch,
                        "num_reg_images": classes.images_per_epoch if classes is not None else 0,
                        "resolution": [c.resolution, c.resolution], "enable_bucket": c.enable_bucket,
                        "min_bucket_reso": c.min_bucket_reso, "max_bucket_reso": c.max_bucket_reso,
                        "subsets": subsets}])


def _end_process_group() -> None:
    """Under torchrun / accelerate launch: every process reaches the end before the gloo/NCCL group goes
    (a rank that exits while another still talks to it can die with SIGABRT)."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def run_command(args: argparse.Namespace, mode: str) -> int:
    """The CLI body of an image-training command (SIGINT/SIGTERM stop with a checkpoint)."""
    from modules.paths import Paths
    from modules.training.images.class_images import ClassImagesError
    from modules.training.images.dataset import DatasetError
    from modules.training.images.kohya_format import KohyaFormatError, LoraExistsError, LoraWriteError
    from modules.training.images.trainer import ImageTrainingError
    from modules.training.llm.pretrain_command import StopOnSignal
    if not args.config and not args.resume:
        log.error("give --config FILE.yaml for a new run, or --resume RUN_DIR to continue one")
        return 2
    data_dir = Paths.from_options(args.data_dir).data_dir

    def show(record: dict) -> None:
        log.info("step %d/%d  loss %.4f  lr %.2e  %.2f it/s", record["step"], record["total_steps"],
                 record["loss"], record["lr"], record["it_s"])

    try:
        with StopOnSignal() as stop:
            result = run_image_training(args.config, args.overrides, data_dir=data_dir, mode=mode,
                                        resume=args.resume, should_stop=stop, on_log=show)
    except (ConfigError, RunDirError, ImageTrainingError, CheckpointWriteError, DatasetError, KohyaFormatError,
            LoraExistsError, LoraWriteError, ClassImagesError) as exc:
        log.error("%s", exc)
        return 2
    _end_process_group()
    if result.finished:
        log.info("finished at step %d; wrote %s", result.step, ", ".join(map(str, result.outputs)) or "nothing")
    else:
        log.info("stopped at step %d; resume with --resume %s", result.step, result.run_dir)
    return 0

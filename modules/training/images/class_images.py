"""DreamBooth's class images: made by the base model itself, before training, through Atelier's txt2img engine.

Why the engine (:func:`modules.diffusion.generation.process_images`) and not a bare diffusers pipeline call:
the class images are then exactly what txt2img draws for the class prompt with those settings (A1111
samplers and seeds, ``<lora:…>`` tags, the same infotext), so a user can reproduce any one of them there.

The folder is the user's: images already in it count (real photos of the class work as well), only the
missing ones are made, and no file is ever replaced. Image number *i* is ``class-<i:05d>.png`` with the
seed ``class_seed + i`` (so each image can be made again on its own, and the set does not depend on
batching or on the number of processes), its caption ``class-<i:05d>.txt`` (the class prompt), and A1111's
infotext in the PNG's ``parameters`` chunk. A number whose name is taken by any file is skipped.
"""
from __future__ import annotations

import io
import logging
import os
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger(__name__)

STEM = "class-{:05d}"


class ClassImagesError(ValueError):
    """The class folder cannot take generated class images; the message names it and says what to do."""


@dataclass(frozen=True)
class ClassImageSettings:
    """How the class images are drawn (txt2img settings)."""
    prompt: str
    negative_prompt: str = ""
    sampler: str = "Euler a"
    steps: int = 20
    cfg: float = 7.0
    seed: int = 0
    width: int = 512
    height: int = 512
    batch_size: int = 4

    @classmethod
    def from_config(cls, config) -> "ClassImageSettings":
        return cls(prompt=config.class_prompt.strip(), negative_prompt=config.class_negative_prompt,
                   sampler=config.class_sampler, steps=config.class_steps, cfg=config.class_cfg,
                   seed=config.class_seed, width=config.resolution, height=config.resolution,
                   batch_size=config.class_batch_size)


def count_class_images(folder: Path, buckets) -> int:
    """Usable images in *folder* (as the dataset scan reads them; broken files do not count)."""
    from modules.training.images.dataset import scan_dataset
    folder = Path(folder)
    if not folder.is_dir():
        return 0
    scan = scan_dataset(folder, buckets)
    return len(scan.records)


def missing_class_images(folder: Path, wanted: int, buckets) -> list[int]:
    """The numbers of the class images to make so that *folder* holds *wanted* usable images (the lowest
    numbers whose name no file has); empty when it holds enough."""
    from modules.training.images.dataset import CONCEPT_FOLDER
    folder = Path(folder)
    have = count_class_images(folder, buckets)
    need = max(0, wanted - have)
    if not need:
        return []
    if folder.is_dir() and any(p.is_dir() and CONCEPT_FOLDER.match(p.name) for p in folder.iterdir()):
        raise ClassImagesError(
            f"class_dir {folder} has N_concept folders with {have} images, fewer than num_class_images={wanted}; "
            "generated class images go straight into class_dir, where such a folder leaves them out. Give a "
            f"plain folder as class_dir, put more images in its concept folders, or set num_class_images={have}")
    taken = {p.stem for p in folder.iterdir()} if folder.is_dir() else set()
    numbers, number = [], 0
    while len(numbers) < need:
        if STEM.format(number) not in taken:
            numbers.append(number)
        number += 1
    return numbers


def _runs(numbers: list[int], size: int) -> list[list[int]]:
    """*numbers* cut into batches of consecutive numbers (one txt2img batch uses seeds seed, seed+1, …)."""
    out: list[list[int]] = []
    for n in numbers:
        if out and n == out[-1][-1] + 1 and len(out[-1]) < size:
            out[-1].append(n)
        else:
            out.append([n])
    return out


def generate_class_images(sd, folder: Path, numbers: list[int], settings: ClassImageSettings, *,
                          device=None, lora_dir=None, model_name: str = "") -> list[Path]:
    """Draw class images *numbers* with *sd* (a loaded :class:`~modules.diffusion.loading.SDModel`) into
    *folder*; returns the image paths written. Never replaces a file (see the module docstring)."""
    import torch
    from PIL.PngImagePlugin import PngInfo

    from modules.diffusion.generation import Run, Tools, process_images
    from modules.diffusion.processing import GenerationParams
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    run = Run(sd=sd, tools=Tools.default(), lora_dir=lora_dir, model_name=model_name,
              device=torch.device(device) if device is not None else torch.device("cpu"))
    written = []
    for batch in _runs(numbers, settings.batch_size):
        p = GenerationParams(prompt=settings.prompt, negative_prompt=settings.negative_prompt,
                             steps=settings.steps, sampler_name=settings.sampler, cfg_scale=settings.cfg,
                             width=settings.width, height=settings.height, seed=settings.seed + batch[0],
                             batch_size=len(batch), n_iter=1, save_images=False, do_not_save_grid=True)
        result = process_images(run, p)
        if result.interrupted or len(result.images) != len(batch):
            raise ClassImagesError(f"generating class images {batch} stopped after {len(result.images)} of "
                                   f"{len(batch)}; the ones written are kept, start again to make the rest")
        for number, image, infotext in zip(batch, result.images, result.infotexts):
            stem = folder / STEM.format(number)
            _write_new(stem.with_suffix(".txt"), settings.prompt.encode("utf-8"))
            info = PngInfo()
            info.add_text("parameters", infotext)
            data = io.BytesIO()
            image.save(data, format="PNG", pnginfo=info)
            written.append(_write_new(stem.with_suffix(".png"), data.getvalue()))
        log.info("class images: %d of %d made in %s", len(written), len(numbers), folder)
    return written


def _write_new(path: Path, data: bytes) -> Path:
    """Write *path* whole or not at all, and only when no file of that name exists (a hard link of a
    finished temporary file cannot replace one; where links are not supported, exclusive creation)."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_bytes(data)
    try:
        try:
            os.link(tmp, path)
        except FileExistsError:
            raise ClassImagesError(f"{path} appeared while the class images were made; it was left as it is "
                                   "(is another training writing to this class_dir?)") from None
        except OSError:                       # no hard links on this file system
            with open(path, "xb") as handle:
                handle.write(data)
    finally:
        tmp.unlink(missing_ok=True)
    return path

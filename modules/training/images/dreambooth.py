"""DreamBooth with prior preservation (Ruiz et al. 2022, arXiv 2208.12242): a subject from a few images.

The instance images (captioned with the instance prompt, "sks dog") teach the subject; the class images
("dog", drawn by the base model itself first, :mod:`.class_images`) keep the model's idea of the class,
against language drift and loss of variety. As in diffusers' ``train_dreambooth.py``, every micro-batch
pairs ``batch_size`` instance samples with ``batch_size`` class samples and::

    loss = MSE(instance) + prior_loss_weight * MSE(class)

When both halves share a bucket they go through the UNet as one batch (instance first, then class,
split after the prediction, as diffusers does); when they do not (bucketed, non-square instance photos),
each half has its own forward and backward pass, which gives the same gradient.

Resume and several processes: the class stream is a second :class:`~.sampler.BucketBatchSampler` with a
seed of its own (so its noise and captions are not the instance stream's), and
:class:`PriorBatchSampler` saves the position of both; each process takes its slice of both global
batches. Epochs count the instance images (x repeats), as kohya counts them; the class images cycle on.
``prior_loss_weight=0`` trains on the instance images alone (no class images are made).
"""
from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import torch

from modules.training.images.dataset import DatasetError
from modules.training.images.sampler import BucketBatchSampler
from modules.training.images.trainer import ImageTrainer

log = logging.getLogger(__name__)

FORMAT = "atelier-prior-sampler-v1"
_CLASS_STREAM = 0xC1A55


def class_stream_seed(seed: int) -> int:
    """The class stream's seed, derived from the run's (never equal to it in practice)."""
    return int(np.random.SeedSequence([seed, _CLASS_STREAM]).generate_state(1)[0])


class PriorBatchSampler:
    """Pairs of (instance samples, class samples), one pair of global batches per :meth:`next_batch`;
    the sampler interface the trainer uses (``batches_per_epoch``, ``epoch``, ``state_dict``…)."""

    def __init__(self, instances: BucketBatchSampler, classes: BucketBatchSampler):
        self.instances, self.classes = instances, classes

    @property
    def batches_per_epoch(self) -> int:
        return self.instances.batches_per_epoch

    @property
    def epoch(self) -> int:
        return self.instances.epoch

    @property
    def steps_done(self) -> int:
        return self.instances.steps_done

    def next_batch(self) -> tuple[list, list]:
        return self.instances.next_batch(), self.classes.next_batch()

    def state_dict(self) -> dict:
        return {"format": FORMAT, "instance": self.instances.state_dict(), "class": self.classes.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if state.get("format") != FORMAT:
            raise DatasetError(f"cannot resume the DreamBooth batches: the checkpoint's sampler is "
                               f"{state.get('format')!r}, not {FORMAT!r} (was prior_loss_weight changed between 0 "
                               "and more?). Resume with the settings the run started with.")
        self.instances.load_state_dict(state["instance"])
        self.classes.load_state_dict(state["class"])


class DreamBoothTrainer(ImageTrainer):
    """:class:`~.trainer.ImageTrainer` on instance images plus, with prior preservation, *class_dataset*.

    Logs ``instance_loss`` (and ``prior_loss``) beside ``loss`` = instance + prior_loss_weight x prior.
    """

    def __init__(self, config, base, dataset, run, accelerator, *, class_dataset=None, **kwargs):
        self.class_dataset = class_dataset if config.prior_preservation else None
        super().__init__(config, base, dataset, run, accelerator, **kwargs)
        self.class_cache = self._latent_cache(self.class_dataset) if self.class_dataset is not None else None

    def _make_sampler(self):
        instances = super()._make_sampler()
        if self.class_dataset is None:
            return instances
        classes = BucketBatchSampler(self.class_dataset, batch_size=self.config.batch_size * self.world,
                                     seed=class_stream_seed(self.config.seed), rank=self.acc.process_index,
                                     world_size=self.world)
        return PriorBatchSampler(instances, classes)

    def _micro_step(self, batch) -> dict[str, torch.Tensor]:
        if self.class_dataset is None:
            loss = self._micro_loss(batch)
            self.acc.backward(loss)
            return {"loss": loss.detach(), "instance_loss": loss.detach()}
        weight = self.config.prior_loss_weight
        instances, classes = batch
        same_bucket = (self.dataset.records[instances[0].index].bucket
                       == self.class_dataset.records[classes[0].index].bucket)    # a batch is one bucket
        if same_bucket:      # one text-encoder and one UNet call on [instance; class], as diffusers does
            losses = self._sample_losses(self._inputs((self.dataset, instances, self.cache),
                                                      (self.class_dataset, classes, self.class_cache)))
            instance_loss, prior_loss = losses[:len(instances)].mean(), losses[len(instances):].mean()
            loss = instance_loss + weight * prior_loss
            self.acc.backward(loss)
        else:                # other buckets: a forward and backward pass each (DDP allows no two forwards)
            instance_loss = self._sample_losses(self._inputs((self.dataset, instances, self.cache))).mean()
            self.acc.backward(instance_loss)
            prior_loss = self._sample_losses(self._inputs((self.class_dataset, classes, self.class_cache))).mean()
            self.acc.backward(weight * prior_loss)
            loss = instance_loss.detach() + weight * prior_loss.detach()
        return {"loss": loss.detach(), "instance_loss": instance_loss.detach(), "prior_loss": prior_loss.detach()}


def class_folder(config, run_root: Path) -> Path:
    """Where the class images are: ``class_dir``, or ``<run>/class_images``."""
    return Path(config.class_dir).expanduser() if config.class_dir else Path(run_root) / "class_images"


def prepare_class_images(config, base, folder: Path, accelerator, buckets, *, lora_dir=None) -> list[Path]:
    """Make the missing class images in *folder* before training (every process draws its share of them,
    the main one decides which are missing); returns what this process wrote."""
    from accelerate.utils import broadcast_object_list

    from modules.training.images.class_images import (ClassImageSettings, generate_class_images,
                                                      missing_class_images)
    plan = [None]
    if accelerator.is_main_process:
        try:
            plan = [missing_class_images(folder, config.num_class_images, buckets)]
        except ValueError as exc:                 # every process raises it, none waits forever
            plan = [str(exc)]
    if accelerator.num_processes > 1:
        broadcast_object_list(plan)
    if isinstance(plan[0], str):
        from modules.training.images.class_images import ClassImagesError
        raise ClassImagesError(plan[0])
    numbers = plan[0][accelerator.process_index::accelerator.num_processes]
    written = []
    if plan[0] and accelerator.is_main_process:
        log.info("class images: %d wanted in %s, making %d with %r", config.num_class_images, folder,
                 len(plan[0]), config.class_prompt)
    if numbers:
        base.pipe.to(accelerator.device)
        name = base.info.model_name if base.info is not None else ""
        written = generate_class_images(base.sd, folder, numbers, ClassImageSettings.from_config(config),
                                        device=accelerator.device, lora_dir=lora_dir, model_name=name)
    accelerator.wait_for_everyone()
    return written

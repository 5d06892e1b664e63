"""Batches for image training: each from one bucket, shuffled per seed and epoch, resumable to the sample.

An epoch is kohya's: every image ``repeats`` times. Its plan, a pure function of (dataset, seed, epoch,
global batch):

1. per bucket, the bucket's samples (each image once per repeat) in a seeded random order, cut into global
   batches of ``batch_size``; a bucket's last, short batch is filled up by wrapping around to the start of
   that bucket's order (so an image can appear twice in it, and a bucket smaller than the batch repeats
   images: the preview warns about it, sd-scripts #731);
2. all batches of all buckets in a seeded random order (sd-scripts shuffles its bucket batches the same way).

Why full batches always: with ``world_size`` processes each rank takes its ``batch_size / world_size``
slice of the same global batch, so ranks see disjoint parts of it, together exactly what one process sees
with the same global batch, and every rank runs the same number of steps; a short last batch could not be
split evenly. The read position is two numbers (epoch, batch within it) that :meth:`state_dict` saves; as
in :class:`modules.training.llm.data.Mixture`, they are independent of the number of processes.
"""
from __future__ import annotations

import numpy as np

from modules.training.images.dataset import DatasetError, ImageDataset, Sample

FORMAT = "atelier-bucket-sampler-v1"
_ORDER = 0xB0C   # seed-stream tag of the batch order (bucket streams are tagged by the bucket's size)


class BucketBatchSampler:
    """This rank's batches of :class:`Sample` from ``dataset``, one global batch per :meth:`next_batch`.

    Args:
        dataset: the :class:`ImageDataset`.
        batch_size: samples per optimizer step over all processes (the global batch).
        seed: decides every order (and, through each sample, its caption augmentation).
        rank, world_size: this process and how many train together; ``batch_size`` must divide by it.
    """

    def __init__(self, dataset: ImageDataset, *, batch_size: int, seed: int, rank: int = 0, world_size: int = 1):
        problems = []
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            problems.append(f"batch_size={batch_size!r} must be a positive whole number")
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            problems.append(f"world_size={world_size!r} must be a positive whole number")
        elif isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            problems.append(f"rank={rank!r} must be in 0..{world_size - 1}")
        elif not problems and batch_size % world_size:
            problems.append(f"the global batch_size {batch_size} must split evenly over {world_size} processes; "
                            f"use a multiple of {world_size}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            problems.append(f"seed={seed!r} must be a whole number >= 0")
        if problems:
            raise DatasetError("; ".join(problems))
        self.dataset, self.batch_size, self.seed = dataset, batch_size, seed
        self.rank, self.world_size = rank, world_size
        self.per_rank = batch_size // world_size
        self.epoch = 0
        self.step_in_epoch = 0
        self._plan: tuple[int, list[list[Sample]]] | None = None

    # --------------------------------------------------------------------------------- the plan
    @property
    def batches_per_epoch(self) -> int:
        """Optimizer steps per epoch: per bucket, its samples (images x repeats) over the batch, rounded up."""
        return sum(-(-self._bucket_samples(indices) // self.batch_size) for indices in self.dataset.buckets.values())

    def _bucket_samples(self, indices: list[int]) -> int:
        return sum(self.dataset.records[i].repeats for i in indices)

    def epoch_plan(self, epoch: int) -> list[list[Sample]]:
        """Every global batch of ``epoch``, in training order (see the module docstring)."""
        if self._plan is not None and self._plan[0] == epoch:
            return self._plan[1]
        groups = []
        for (width, height), indices in self.dataset.buckets.items():
            entries = np.repeat(np.array(indices, dtype=np.int64),
                                [self.dataset.records[i].repeats for i in indices])
            order = entries[np.random.default_rng([self.seed, epoch, width, height]).permutation(len(entries))]
            count = -(-len(order) // self.batch_size)
            padded = order[np.arange(count * self.batch_size) % len(order)]
            groups.extend(padded.reshape(count, self.batch_size))
        permutation = np.random.default_rng([self.seed, epoch, _ORDER]).permutation(len(groups))
        plan = []
        for number, group in enumerate(permutation):
            start = number * self.batch_size
            plan.append([Sample(index=int(i), epoch=epoch, slot=start + j, seed=self.seed)
                         for j, i in enumerate(groups[group])])
        self._plan = (epoch, plan)
        return plan

    # --------------------------------------------------------------------------------- the stream
    def next_batch(self) -> list[Sample]:
        """This rank's slice of the next global batch; moves to the next epoch after the last one."""
        plan = self.epoch_plan(self.epoch)
        batch = plan[self.step_in_epoch]
        self.step_in_epoch += 1
        if self.step_in_epoch == len(plan):
            self.epoch, self.step_in_epoch = self.epoch + 1, 0
        return batch[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]

    @property
    def steps_done(self) -> int:
        """Global batches drawn so far (over all epochs)."""
        return self.epoch * self.batches_per_epoch + self.step_in_epoch

    # ---------------------------------------------------------------------------------- resume
    def state_dict(self) -> dict:
        """The read position, with what it is valid for (the same on every rank)."""
        return {"format": FORMAT, "seed": self.seed, "batch_size": self.batch_size, "epoch": self.epoch,
                "step_in_epoch": self.step_in_epoch, "dataset": self.dataset.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; an error naming what differs when it belongs to other data or settings."""
        problems = []
        for key, mine in (("format", FORMAT), ("seed", self.seed), ("batch_size", self.batch_size),
                          ("dataset", self.dataset.fingerprint)):
            if state.get(key) != mine:
                problems.append(f"{key} is {state.get(key)!r} in the saved state but {mine!r} now"
                                + (" (images were added, removed or renamed, or repeats or buckets changed)"
                                   if key == "dataset" else ""))
        epoch, step = state.get("epoch"), state.get("step_in_epoch")
        if not problems and not (isinstance(epoch, int) and epoch >= 0 and isinstance(step, int)
                                 and 0 <= step < self.batches_per_epoch):
            problems.append(f"the saved position (epoch {epoch!r}, batch {step!r}) is not valid for "
                            f"{self.batches_per_epoch} batches per epoch")
        if problems:
            raise DatasetError("cannot resume the image batches: " + "; ".join(problems)
                               + ". Resume with the dataset folder and data settings the run started with.")
        self.epoch, self.step_in_epoch = epoch, step

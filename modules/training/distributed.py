"""The process group of a ``torchrun`` launch, and the few collective steps a trainer needs.

Why one small object instead of scattered ``torch.distributed`` calls: every rank must make the same
collective calls in the same order, or the run hangs. So the trainer asks this object, which is a no-op
single-process stand-in when the program was not started by torchrun (``world_size == 1``, no group),
and the same code path runs under ``python -m modules.training`` and ``torchrun --nproc-per-node N``.

:meth:`Distributed.on_main` is the rule for side effects: only rank 0 writes files (run folder,
checkpoints, metrics, ``final/``); the outcome, or rank 0's error message, is shared so that the other ranks
stop with the same error rather than waiting forever in the next collective. Shared with the image trainer.
"""
from __future__ import annotations

import logging
import os
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Callable, Iterator

import torch

log = logging.getLogger(__name__)

#: environment variables torchrun sets for every worker
TORCHRUN_ENV = ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")


class PeerFailed(RuntimeError):
    """Rank 0 failed a step every rank depends on; rank 0 reports the error itself (this rank stays quiet)."""


@dataclass(frozen=True)
class Distributed:
    """Rank, world size and backend of this process; ``backend`` None: a single process, no group."""
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        """A process group exists (torchrun), even with one process."""
        return self.backend is not None

    def device(self, device_type: str) -> torch.device:
        """This rank's device: ``cuda:<local_rank>`` on GPUs (one per process), else the CPU."""
        if device_type == "cuda":
            return torch.device("cuda", self.local_rank if self.active else torch.cuda.current_device())
        return torch.device(device_type)

    # ----------------------------------------------------------------------------- collectives
    def barrier(self) -> None:
        if self.active:
            torch.distributed.barrier()

    def all_reduce(self, tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
        """In place over every rank (``sum`` or ``max``); returns ``tensor``."""
        if self.active:
            reduce_op = {"sum": torch.distributed.ReduceOp.SUM, "max": torch.distributed.ReduceOp.MAX}[op]
            torch.distributed.all_reduce(tensor, op=reduce_op)
        return tensor

    def any(self, flag: bool) -> bool:
        """True on every rank when it is True on any (a stop request seen by one rank stops all)."""
        if not self.active:
            return bool(flag)
        return bool(self.all_reduce(torch.tensor([int(bool(flag))], device=self._collective_device()), "max"))

    def broadcast_object(self, value: Any) -> Any:
        """Rank 0's ``value`` on every rank (a picklable object)."""
        if not self.active:
            return value
        box = [value if self.is_main else None]
        torch.distributed.broadcast_object_list(box, src=0, device=self._collective_device())
        return box[0]

    def gather_objects(self, value: Any) -> list[Any] | None:
        """Every rank's ``value``, in rank order, on rank 0 (None on the others)."""
        if not self.active:
            return [value]
        out = [None] * self.world_size if self.is_main else None
        torch.distributed.gather_object(value, out, dst=0)
        return out

    def on_main(self, fn: Callable[[], Any], *, share_result: bool = False) -> Any:
        """Run ``fn`` on rank 0 only; every rank then learns whether it worked. Rank 0 re-raises its own
        exception; the others raise :class:`PeerFailed`. With ``share_result`` the result is broadcast."""
        result, error, outcome = None, None, None
        if self.is_main:
            try:
                result = fn()
                outcome = ("ok", result if share_result else None)
            except BaseException as exc:            # shared first, so that no rank waits forever
                error = exc
                outcome = ("error", f"{type(exc).__name__}: {exc}")
        outcome = self.broadcast_object(outcome)
        if error is not None:
            raise error
        if outcome[0] == "error":
            raise PeerFailed(f"rank 0 failed: {outcome[1]}")
        return result if self.is_main else outcome[1]

    def _collective_device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" else torch.device("cpu")


def launched_by_torchrun(environ=os.environ) -> bool:
    return all(name in environ for name in TORCHRUN_ENV)


def env_rank(environ=os.environ) -> int:
    """This process's rank as torchrun announces it (0 when run directly)."""
    try:
        return int(environ.get("RANK", "0"))
    except ValueError:
        return 0


@contextmanager
def process_group(device_type: str, *, timeout_s: float = 600.0) -> Iterator[Distributed]:
    """The :class:`Distributed` of this launch: under torchrun a process group (``nccl`` for CUDA,
    ``gloo`` for the CPU) made from its environment and destroyed on exit; otherwise a single process.
    A group that the caller already made is used and left alone."""
    dist = torch.distributed
    if not launched_by_torchrun() or not dist.is_available():
        yield Distributed()
        return
    local_rank = int(os.environ["LOCAL_RANK"])
    backend = "nccl" if device_type == "cuda" else "gloo"
    owned = not dist.is_initialized()
    if owned:
        if device_type == "cuda":
            torch.cuda.set_device(local_rank)
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    else:
        backend = dist.get_backend()
    failed = False
    try:
        yield Distributed(rank=dist.get_rank(), local_rank=local_rank, world_size=dist.get_world_size(),
                          backend=backend)
    except BaseException:
        failed = True
        raise
    finally:
        if owned and dist.is_initialized():
            if not failed:
                # Every rank reaches teardown before any destroys its group: a gloo rank that tore down while
                # its peer was still finishing (rank 0 writing final/) died at exit with SIGABRT ("terminate
                # called without an active exception") about one run in five. After a failure the peer may be
                # gone, so there is no barrier then.
                dist.barrier()
            dist.destroy_process_group()


def quiet_other_ranks(environ=os.environ) -> None:
    """Only rank 0 logs progress: the other ranks' root logger shows warnings and errors only."""
    if env_rank(environ) != 0:
        logging.getLogger().setLevel(logging.WARNING)

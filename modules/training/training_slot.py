"""One training at a time: the slot the Train tab's LLM and image sections share.

Why one: a training run takes the whole device (and on a CPU every core) for minutes to hours, holds its
model in the model manager, and each section shows one live run. Two runs queued one behind the other
would also look like a hang to the user. So the second Start is refused at once with the name of the run
that holds the slot, and what to do. The slot lives on the app context (made by
:mod:`modules.training.capability`), never at module level.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Callable


class TrainingBusy(ValueError):
    """A training is running already; the message names it and says what to do."""


@dataclass
class _Holder:
    label: str
    job: Any


class TrainingSlot:
    """Held by the job of the training this app runs (or has queued) until that job is done."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._holder: _Holder | None = None

    def running(self) -> str | None:
        """The label of the training holding the slot ("LLM run 'r1'"), or None when it is free."""
        with self._lock:
            holder = self._holder
            return holder.label if holder is not None and not holder.job.done else None

    def submit(self, label: str, submit: Callable[[], Any]) -> Any:
        """Take the slot for the job ``submit()`` queues and return that job; raises :class:`TrainingBusy`
        (and queues nothing) while another training holds it."""
        with self._lock:
            holder = self._holder
            if holder is not None and not holder.job.done:
                raise TrainingBusy(f"A training is running: {holder.label}. Stop it (or wait for it to finish) "
                                   "before starting another; one training runs at a time.")
            job = submit()
            self._holder = _Holder(label, job)
            return job

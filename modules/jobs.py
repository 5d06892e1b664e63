"""One job queue per device, shared by the UI and the API.

Work is submitted as a function of a :class:`Job`. One worker thread runs jobs
in arrival order; the job reports progress (fraction, step, ETA, preview), can
stream items to its caller, and checks ``job.check_interrupted()`` at safe
points. An exception inside a job is stored on it and re-raised to whoever
waits for the result, so the worker (and the app) keeps running.

Jobs submitted with the same ``batch_key`` that wait next to each other at the
head of the queue are handed to one ``run_batch`` call, so that e.g. several
chat requests that arrive together are generated as one batch.

Every job carries a *kind* (the capability that made it: ``"diffusion"``, ``"llm"``...) and an *owner*
(who submitted it: ``"session:<hash>"`` or ``"user:<name>"`` for the web UI, ``"api"`` or
``"api:<name>"`` for API clients; see :mod:`modules.job_owner`). Interrupt and Skip never act on "every
job": callers pick their targets with :meth:`JobQueue.find` (an image Interrupt finds the caller's
running image job, a chat's Stop holds its own job), so one user's Interrupt cannot cut another
user's chat or picture.
"""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any, AsyncIterator, Callable, Iterator

log = logging.getLogger(__name__)


class JobInterrupted(Exception):
    """Raised inside a job by ``check_interrupted()`` after Interrupt was pressed."""


@dataclass
class Progress:
    step: int = 0
    total: int = 0
    text: str = ""
    preview: Any = None  # a PIL image, when the job has one
    started: float | None = None

    @property
    def fraction(self) -> float:
        return min(1.0, self.step / self.total) if self.total else 0.0

    @property
    def eta(self) -> float | None:
        """Seconds left, extrapolated from the time per step so far."""
        if not self.started or not self.step or not self.total:
            return None
        elapsed = time.monotonic() - self.started
        return max(0.0, elapsed / self.step * (self.total - self.step))

    @property
    def rate(self) -> float | None:
        if not self.started or not self.step:
            return None
        elapsed = time.monotonic() - self.started
        return self.step / elapsed if elapsed > 0 else None


_DONE = object()

#: ``find(owner=ANY_OWNER)`` matches every owner (``owner=None`` matches only jobs submitted without one)
ANY_OWNER = object()


class Job:
    _ids = itertools.count(1)

    def __init__(self, fn: Callable[["Job"], Any] | None, name: str, batch_key: str | None = None,
                 payload: Any = None, run_batch: Callable[[list["Job"]], list[Any]] | None = None, *,
                 kind: str = "job", owner: str | None = None):
        self.id = f"job-{next(self._ids)}"
        self.name = name
        self.kind = kind
        self.owner = owner
        self.fn = fn
        self.batch_key = batch_key
        self.payload = payload
        self.run_batch = run_batch
        self.state = "queued"  # queued, running, done, failed, interrupted
        self.progress = Progress()
        self.error: BaseException | None = None
        self.created = time.time()
        self.started: float | None = None
        self.finished: float | None = None
        self._result: Any = None
        self._done = threading.Event()
        self._interrupt = threading.Event()
        self._skip = threading.Event()
        self._skipped_at: int | None = None  # the step at which the job honoured a Skip (see ``skipped``)
        self._stream: queue.Queue = queue.Queue()
        #: wakes an asyncio consumer (:meth:`stream_batches_async`) after an item is put; None when none waits
        self._waker: Callable[[], None] | None = None

    # -- inside the job -----------------------------------------------------------
    def report(self, step: int, total: int, *, text: str = "", preview: Any = None) -> None:
        """Record progress: *step* of *total* done. Also checks for interrupts."""
        p = self.progress
        if p.started is None or step < p.step:
            p.started = time.monotonic()
        if self._skipped_at is not None and step > self._skipped_at:
            self._skipped_at = None  # progress on the next item: the skip is over
        p.step, p.total = step, total
        if text:
            p.text = text
        if preview is not None:
            p.preview = preview
        self.check_interrupted()

    def check_interrupted(self) -> None:
        if self._interrupt.is_set():
            raise JobInterrupted(f"{self.name} was interrupted")

    @property
    def interrupted(self) -> bool:
        return self._interrupt.is_set()

    def take_skip(self) -> bool:
        """True once after Skip was pressed: stop the current item (image) and go on with the next."""
        if self._skip.is_set():
            self._skip.clear()
            self._skipped_at = self.progress.step
            return True
        return False

    @property
    def skipped(self) -> bool:
        """A1111's ``state.skipped``: True from the Skip press until the job reports progress on its next
        item (or ends)."""
        return not self.done and (self._skip.is_set() or self._skipped_at is not None)

    def emit(self, item: Any) -> None:
        """Send one streamed item (a token, a preview) to whoever iterates ``stream()``."""
        self._stream.put(item)
        self._wake()

    def _wake(self) -> None:
        waker = self._waker
        if waker is not None:
            waker()

    # -- outside the job ------------------------------------------------------------
    def interrupt(self) -> None:
        self._interrupt.set()

    def skip(self) -> None:
        self._skip.set()

    def stream(self, timeout: float | None = None) -> Iterator[Any]:
        """Yield emitted items until the job ends; then raise its error, if any."""
        while True:
            item = self._stream.get(timeout=timeout)
            if item is _DONE:
                break
            yield item
        if self.error is not None:
            raise self.error

    def stream_batches(self, timeout: float | None = None) -> Iterator[list[Any]]:
        """Like :meth:`stream`, but each step yields every item already waiting (at least one): a consumer
        that hops threads per step (an async server streaming a reply) pays one hop for all of them when it
        falls behind the producer, instead of one per token."""
        while True:
            items, done = self._drain([self._stream.get(timeout=timeout)])
            if items:
                yield items
            if done:
                break
        if self.error is not None:
            raise self.error

    def _drain(self, items: list[Any]) -> tuple[list[Any], bool]:
        """*items* and every item already waiting, without the end marker; and whether the end was among them."""
        while True:
            try:
                items.append(self._stream.get_nowait())
            except queue.Empty:
                break
        return [item for item in items if item is not _DONE], any(item is _DONE for item in items)

    async def stream_batches_async(self) -> AsyncIterator[list[Any]]:
        """:meth:`stream_batches` for a consumer on an asyncio event loop, with no thread hop.

        Why: an async server that iterates the blocking stream pays a worker-thread round trip per batch (anyio's
        ``run_sync_in_worker_thread``, condition variables, cancel scopes): profiled under 32 streamed replies,
        that was as much CPU as the event loop itself, on the two cores the decode thread needs. Here the
        producer wakes the loop with ``call_soon_threadsafe`` (at most one pending wake-up at a time) and the
        consumer drains whatever is there. A consumer that is cancelled (its client left) simply stops.
        """
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        pending = threading.Lock()                          # held while a wake-up is scheduled and not yet run

        def on_loop() -> None:
            pending.release()
            ready.set()

        def waker() -> None:                                # producer thread
            if pending.acquire(blocking=False):
                try:
                    loop.call_soon_threadsafe(on_loop)
                except RuntimeError:                        # the loop is closed: nobody is listening any more
                    pending.release()

        self._waker = waker
        try:
            while True:
                ready.clear()
                items, done = self._drain([])
                if items:
                    yield items
                if done:
                    break
                if not items:
                    await ready.wait()
        finally:
            self._waker = None
        if self.error is not None:
            raise self.error

    def result(self, timeout: float | None = None) -> Any:
        if not self._done.wait(timeout):
            raise TimeoutError(f"{self.name} did not finish within {timeout}s")
        if self.error is not None:
            raise self.error
        return self._result

    @property
    def done(self) -> bool:
        return self._done.is_set()

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        """End the job with *result* or *error*. The queue calls this for the jobs it runs; an engine that
        claimed jobs with ``JobQueue.take_waiting`` (or finishes batch members early) calls it itself."""
        if not self._done.is_set():
            self._finish(result, error)

    def _finish(self, result: Any = None, error: BaseException | None = None) -> None:
        self._result, self.error = result, error
        self.state = ("interrupted" if isinstance(error, JobInterrupted) else "failed") if error else "done"
        self.finished = time.time()
        self._stream.put(_DONE)
        self._done.set()
        self._wake()


class JobQueue:
    """FIFO of jobs for one device, run by one worker thread."""

    def __init__(self, name: str = "cpu", *, max_batch: int = 8,
                 on_worker_start: Callable[[], None] | None = None):
        """*on_worker_start* runs once in the worker thread before its first job (the device's thread setup:
        :meth:`modules.devices.Devices.setup_worker_thread`)."""
        self.name = name
        self.max_batch = max_batch
        self._on_worker_start = on_worker_start
        self._waiting: deque[Job] = deque()
        self._cv = threading.Condition()
        self._running: list[Job] = []
        self._closed = False
        self.completed = 0
        self._worker = threading.Thread(target=self._loop, name=f"jobs-{name}", daemon=True)
        self._worker.start()

    # -- submitting -----------------------------------------------------------------
    def submit(self, fn: Callable[[Job], Any], *, name: str = "job", kind: str = "job",
               owner: str | None = None) -> Job:
        """Queue ``fn(job)``. *kind* names the capability, *owner* who asked (both select Interrupt targets)."""
        return self._put(Job(fn, name, kind=kind, owner=owner))

    def submit_batchable(self, batch_key: str, payload: Any, run_batch: Callable[[list[Job]], list[Any]],
                         *, name: str = "job", kind: str = "job", owner: str | None = None) -> Job:
        """Queue *payload*; jobs with the same *batch_key* waiting together run in one ``run_batch`` call,
        which returns one result per job (or raises, failing them all)."""
        return self._put(Job(None, name, batch_key=batch_key, payload=payload, run_batch=run_batch, kind=kind,
                             owner=owner))

    def call(self, fn: Callable[[Job], Any], *, name: str = "job", timeout: float | None = None) -> Any:
        """Run *fn* on the worker and return its result (device work, e.g. loading a model, belongs there).

        Called from inside a job (the worker thread itself) it runs at once: queueing it would wait for the
        job that is waiting for it.
        """
        if self.in_worker:
            job = Job(fn, name)
            return fn(job)
        return self.submit(fn, name=name).result(timeout)

    @property
    def in_worker(self) -> bool:
        """True in this queue's worker thread."""
        return threading.current_thread() is self._worker

    def take_waiting(self, batch_key: str, limit: int) -> list[Job]:
        """Claim up to *limit* jobs with *batch_key* that are waiting at the head of the queue (for
        engines that add arrivals to a batch already running). The caller must finish them."""
        taken: list[Job] = []
        with self._cv:
            while self._waiting and len(taken) < limit and self._waiting[0].batch_key == batch_key:
                job = self._waiting.popleft()
                self._start(job)
                taken.append(job)
        return taken

    def _put(self, job: Job) -> Job:
        with self._cv:
            if self._closed:
                raise RuntimeError("the job queue is shut down")
            self._waiting.append(job)
            self._cv.notify()
        return job

    # -- control ----------------------------------------------------------------------
    def waiting_jobs(self) -> list[Job]:
        with self._cv:
            return list(self._waiting)

    def find(self, *, kind: str | None = None, owner: Any = ANY_OWNER, running_only: bool = False) -> list[Job]:
        """Unfinished jobs, running ones first (oldest first), then waiting ones in queue order.

        *kind*: only jobs of that kind (None: any). *owner*: only jobs of that owner (``ANY_OWNER``: any).
        *running_only*: leave out jobs still waiting.
        """
        with self._cv:
            jobs = list(self._running) + ([] if running_only else list(self._waiting))
        return [j for j in jobs if not j.done and (kind is None or j.kind == kind)
                and (owner is ANY_OWNER or j.owner == owner)]

    def interrupt(self, job_id: str) -> bool:
        """Interrupt the job *job_id* (queued: it never runs; running: it stops at its next check)."""
        targets = [j for j in self.find() if j.id == job_id]
        for job in targets:
            job.interrupt()
        return bool(targets)

    def shutdown(self, timeout: float = 5.0) -> None:
        with self._cv:
            self._closed = True
            self._cv.notify_all()
        for job in self.find():  # the app is closing: nothing more will be read
            job.interrupt()
        self._worker.join(timeout)

    # -- worker -----------------------------------------------------------------------
    def _start(self, job: Job) -> None:
        job.state, job.started = "running", time.time()
        self._running.append(job)

    def _loop(self) -> None:
        if self._on_worker_start is not None:
            try:
                self._on_worker_start()
            except Exception:  # noqa: BLE001 - a failed thread setup must not leave the queue without a worker
                log.exception("job queue %s: worker setup failed; running with torch's defaults", self.name)
        while True:
            with self._cv:
                while not self._waiting and not self._closed:
                    self._cv.wait()
                if self._closed and not self._waiting:
                    return
                first = self._waiting.popleft()
                batch = [first]
                if first.batch_key is not None:
                    while (self._waiting and len(batch) < self.max_batch
                           and self._waiting[0].batch_key == first.batch_key):
                        batch.append(self._waiting.popleft())
                for job in batch:
                    self._start(job)
            self._run(batch)

    def _run(self, batch: list[Job]) -> None:
        first = batch[0]
        try:
            if first.interrupted and len(batch) == 1:
                raise JobInterrupted(f"{first.name} was interrupted before it started")
            if first.batch_key is None:
                first._finish(result=first.fn(first))
            else:
                results = first.run_batch(batch)
                for job, result in zip(batch, results):
                    if not job.done:
                        job._finish(result=result)
        except BaseException as exc:  # noqa: BLE001 - the job's error goes to its caller, the worker lives on
            if not isinstance(exc, JobInterrupted):
                log.exception("job %s failed", first.name)
            for job in batch:
                if not job.done:
                    job._finish(error=exc)
        finally:
            with self._cv:
                for job in self._running[:]:
                    if job.done:
                        self._running.remove(job)
                        self.completed += 1

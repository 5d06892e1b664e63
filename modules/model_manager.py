"""The one object that owns every model in memory.

In the spirit of ComfyUI's ``model_management`` but as a single instance passed
in the app context, never a module global. Every LLM, diffusion pipeline, LoRA
adapter or model under training is held here under a string key:

* ``acquire(key, load)`` loads on demand and returns a :class:`Lease`; a leased
  model is never evicted, so a running job cannot lose its model.
  ``acquire_all([...])`` leases every model one job needs at once.
* Admission comes before any load, as ComfyUI's ``load_models_gpu`` does: the
  bytes a job needs are totalled (estimates from the safetensors headers, see
  :mod:`modules.weight_bytes`; the measured size of a model parked on CPU),
  compared with *measured* free memory (:func:`modules.devices.free_memory`)
  minus a named reserve and minus what loads in flight have reserved, and
  least-recently-used unleased models are evicted until all of it fits. Only
  then is anything loaded. So two loads can never overshoot together: the
  second waits for the first's reservation (or for another thread's lease to be
  released) instead of measuring memory the first has not allocated yet.
* With ``offload`` ("medvram"/"lowvram") on an accelerator, idle models move to
  CPU RAM instead of being dropped, and come back on the next lease, through the
  same admission (a parked model's re-lease is budget-checked like a load).
* Slow work (loading, moving between devices, garbage collection, emptying the
  CUDA cache, ``malloc_trim``) runs outside the manager's lock. A key being
  loaded or moved is marked busy; other acquirers of that key wait on a
  condition and then find it loaded.
* Unloading drops every reference the manager holds, runs the garbage
  collector, empties the CUDA cache and returns freed heap pages to the OS
  (``malloc_trim``), so switching models back and forth does not grow the
  process. A model still alive after unload is logged as a suspected leak.
"""
from __future__ import annotations

import ctypes
import gc
import logging
import threading
import time
import weakref
from dataclasses import dataclass, field
from typing import Any, Callable, Generic, TypeVar

import torch

from modules.devices import free_memory as measured_free_memory
from modules.weight_bytes import weight_bytes

log = logging.getLogger(__name__)
T = TypeVar("T")
MB = 1024 * 1024


class ModelInUse(RuntimeError):
    """Raised when unloading a model that a running job holds a lease on."""


class OutOfMemoryBudget(RuntimeError):
    """Raised when a model cannot fit even after evicting every idle model."""


def release_memory(device: torch.device | None = None) -> None:
    """Give freed memory back: Python GC, the CUDA caching allocator, and glibc's heap."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass  # not glibc (macOS, Windows, musl): nothing to trim


@dataclass
class ModelRequest:
    """One model a job needs: its key, how to load it, and the bytes loading it is expected to take."""
    key: str
    load: Callable[[], Any] | None = None
    kind: str = "model"
    #: expected bytes on the device (e.g. :func:`modules.weight_bytes.estimate_load_bytes`); None: unknown
    size_bytes: int | None = None
    meta: dict | None = None


@dataclass
class ModelEntry:
    key: str
    kind: str
    obj: Any
    size: int
    loaded_at: float
    last_used: float
    leases: int = 0
    on_device: bool = True
    meta: dict = field(default_factory=dict)
    #: lease count per holding thread (a thread waiting for room never waits for its own leases)
    holders: dict[int, int] = field(default_factory=dict)
    #: buffers that belong to the model but are not its weights (an LLM's KV pool), by name; see attach()
    attached: dict[str, Any] = field(default_factory=dict)
    attached_bytes: int = 0

    @property
    def total_size(self) -> int:
        """Weights plus attached buffers: what evicting or moving this entry frees or costs."""
        return self.size + self.attached_bytes

    def info(self) -> dict:
        return {"key": self.key, "kind": self.kind, "size_mb": round(self.size / MB, 1),
                "attached_mb": round(self.attached_bytes / MB, 1),
                "attached": {name: obj.stats() for name, obj in self.attached.items() if callable(getattr(obj, "stats", None))},
                "leases": self.leases, "on_device": self.on_device,
                "last_used": self.last_used, **self.meta}


class Lease(Generic[T]):
    """A claim on a loaded model. Use as a context manager, or call ``release()`` once."""

    def __init__(self, manager: "ModelManager", entry: ModelEntry, holder: int):
        self._manager = manager
        self._entry = entry
        self._holder = holder
        self._released = False

    @property
    def model(self) -> T:
        if self._released:
            raise RuntimeError(f"lease on {self._entry.key!r} was already released; acquire it again")
        return self._entry.obj

    @property
    def key(self) -> str:
        return self._entry.key

    def release(self) -> None:
        if not self._released:
            self._released = True
            self._manager._release(self._entry, self._holder)

    def __enter__(self) -> T:
        return self.model

    def __exit__(self, *exc) -> None:
        self.release()

    def __del__(self):  # a forgotten lease must not pin a model forever
        if not getattr(self, "_released", True):
            self.release()


class ModelManager:
    def __init__(self, device: torch.device | str = "cpu", *, reserve_bytes: int = 1024 * MB,
                 max_loaded: int = 4, offload: str = "none",
                 free_memory: Callable[[], int] | None = None,
                 on_loaded: Callable[[str, Any], None] | None = None,
                 lease_wait_s: float = 600.0):
        """
        Args:
            device: where models live while used.
            reserve_bytes: memory always left free for activations and the rest of the system.
            max_loaded: most models resident at once, whatever the memory says.
            offload: "none", "medvram" or "lowvram"; anything but "none" parks idle models on CPU.
            free_memory: returns measured free bytes on *device*; injectable so tests can fake a device
                (default: :func:`modules.devices.free_memory`).
            on_loaded: called with (key, model) after each load (the ``on_model_loaded`` callback).
            lease_wait_s: how long an acquire that only lacks room held by *another thread's* leases waits
                for them to be released before it raises OutOfMemoryBudget.
        """
        self.device = torch.device(device)
        self.reserve_bytes = reserve_bytes
        self.max_loaded = max_loaded
        self.offload = offload
        self.lease_wait_s = lease_wait_s
        self._free_memory = free_memory or (lambda: measured_free_memory(self.device))
        self._on_loaded = on_loaded
        self._lock = threading.RLock()
        self._cv = threading.Condition(self._lock)
        self._entries: dict[str, ModelEntry] = {}
        #: keys being loaded, moved or parked right now, and what is happening to them
        self._busy: dict[str, str] = {}
        #: bytes admitted for loads and moves in flight (not yet visible in the measured free memory)
        self._reserved = 0
        #: slots admitted for loads in flight (counted against max_loaded)
        self._reserved_slots = 0
        #: admissions in flight per thread (a loader that acquires another model never waits for itself)
        self._in_flight: dict[int, int] = {}
        #: evictions whose memory is being given back (gc, empty_cache) right now
        self._releasing = 0
        self._leak_watch: list[tuple[str, weakref.ref]] = []
        self.events: list[str] = []  # human-readable history for diagnostics, newest last

    # -- measuring ------------------------------------------------------------------
    def budget_free(self) -> int:
        """Bytes a new model may use now: measured free memory minus the reserve and the bytes that loads in
        flight have been promised."""
        with self._lock:
            return self._free_memory() - self.reserve_bytes - self._reserved

    # -- public API -------------------------------------------------------------------
    def acquire(self, key: str, load: Callable[[], T] | None = None, *, kind: str = "model",
                size_bytes: int | None = None, meta: dict | None = None) -> Lease[T]:
        """Return a lease on model *key*, loading it with *load()* if it is not in memory.

        *size_bytes* is the expected size (e.g. from the safetensors headers); room for it is made before
        loading. The real size is measured after loading.
        """
        return self.acquire_all([ModelRequest(key, load, kind, size_bytes, meta)])[0]

    def acquire_all(self, requests: list[ModelRequest]) -> list[Lease]:
        """Leases on every model in *requests* (one job's models), in order.

        Admission first: what the models not on the device need is totalled and room is made for all of
        them (evicting least-recently-used idle models) before any is loaded or moved back; then the loads
        and moves run outside the lock. Raises KeyError for a model that is absent and has no loader, and
        OutOfMemoryBudget when they cannot fit even after evicting every idle model.
        """
        keys = [r.key for r in requests]
        if len(set(keys)) != len(keys):
            raise ValueError(f"acquire_all: each model may be requested once, got {keys}")
        holder = threading.get_ident()
        with self._cv:
            self._wait_until_idle(keys)
            to_load = [r for r in requests if r.key not in self._entries]
            for r in to_load:
                if r.load is None:
                    raise KeyError(f"model {r.key!r} is not loaded and no loader was given")
            pinned = {r.key: self._pin(self._entries[r.key], holder) for r in requests if r.key in self._entries}
            to_move = [self._entries[k] for k in pinned if not self._entries[k].on_device]
            needed = sum(max(0, r.size_bytes or 0) for r in to_load) + sum(e.size for e in to_move)
            busy = [r.key for r in to_load] + [e.key for e in to_move]
            for key in busy:  # from now on other acquirers of these keys wait for this one
                self._busy[key] = "loading" if key not in pinned else "moving to the device"
            try:
                self._admit(needed, slots=len(to_load), keep=set(keys), holder=holder)
            except BaseException:
                for key in busy:
                    self._busy.pop(key, None)
                self._cv.notify_all()
                for lease in pinned.values():
                    lease.release()
                raise
            self._reserved += needed
            self._reserved_slots += len(to_load)
            self._in_flight[holder] = self._in_flight.get(holder, 0) + 1
        loaded: dict[str, Lease] = {}
        try:
            return self._load_and_move(requests, to_load, to_move, pinned, loaded, needed, holder)
        finally:
            with self._cv:
                left = self._in_flight.pop(holder, 1) - 1
                if left:
                    self._in_flight[holder] = left
                self._cv.notify_all()

    def _load_and_move(self, requests: list[ModelRequest], to_load: list[ModelRequest], to_move: list[ModelEntry],
                       pinned: dict[str, Lease], loaded: dict[str, Lease], needed: int, holder: int) -> list[Lease]:
        """Outside the lock: move parked models back and run the loaders admitted by :meth:`acquire_all`."""
        try:
            for entry in to_move:
                started = time.perf_counter()
                self._move(entry, self.device)
                with self._cv:
                    entry.on_device = True
                    self._busy.pop(entry.key, None)
                    self._reserved -= entry.size
                    needed -= entry.size
                    self._log(f"moved {entry.kind} {entry.key} back to {self.device} "
                              f"in {time.perf_counter() - started:.2f}s")
                    self._cv.notify_all()
            for r in to_load:
                loaded[r.key] = self._load(r, holder)
                with self._cv:
                    self._reserved -= max(0, r.size_bytes or 0)
                    self._reserved_slots -= 1
                    needed -= max(0, r.size_bytes or 0)
        except BaseException:
            with self._cv:
                self._reserved -= needed
                self._reserved_slots -= len([r for r in to_load if r.key not in loaded])
                for key in [r.key for r in to_load] + [e.key for e in to_move]:
                    self._busy.pop(key, None)
                self._cv.notify_all()
            for lease in list(pinned.values()) + list(loaded.values()):
                lease.release()
            raise
        return [pinned.get(r.key) or loaded[r.key] for r in requests]

    def attach(self, key: str, name: str, size_bytes: int, make: Callable[[], T]) -> T:
        """A buffer named *name* that belongs to loaded model *key* (an LLM's KV pool), made once.

        Admitted like a load: room for *size_bytes* is made first (idle models evicted LRU-first, else
        OutOfMemoryBudget), then *make()* runs outside the lock. The buffer lives and dies with the model (an
        unload or eviction frees it) and is reported apart from the weights (``attached_mb``), so a model's
        ``size_mb`` stays what its weights take. The caller must hold a lease on *key*."""
        holder = threading.get_ident()
        with self._cv:
            entry = self._entries.get(key)
            if entry is None:
                raise KeyError(f"model {key!r} is not loaded; acquire it before attaching {name!r}")
            if name in entry.attached:
                return entry.attached[name]
            self._admit(size_bytes, slots=0, keep={key}, holder=holder)
            self._reserved += size_bytes
        try:
            obj = make()
        finally:
            with self._cv:
                self._reserved -= size_bytes
        with self._cv:
            if name in entry.attached:   # another thread attached it meanwhile: keep the first
                return entry.attached[name]
            entry.attached[name] = obj
            entry.attached_bytes += size_bytes
            self._log(f"attached {name} to {entry.kind} {key} ({size_bytes / MB:.1f} MB)")
            return obj

    def is_loaded(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def loaded(self, kind: str | None = None) -> list[dict]:
        with self._lock:
            return [e.info() for e in self._entries.values() if kind is None or e.kind == kind]

    def unload(self, key: str, *, force: bool = False) -> bool:
        """Drop model *key*. Refuses (ModelInUse) while leased unless *force*. Returns False if absent."""
        with self._cv:
            self._wait_until_idle([key])
            entry = self._entries.get(key)
            if entry is None:
                return False
            if entry.leases and not force:
                raise ModelInUse(f"model {key!r} is in use by a running job; interrupt it first")
            self._drop(entry, reason="unloaded")
        self._give_back_memory()
        return True

    def unload_all(self, kind: str | None = None) -> None:
        with self._lock:
            for entry in list(self._entries.values()):
                if entry.leases == 0 and entry.key not in self._busy and (kind is None or entry.kind == kind):
                    self._drop(entry, reason="unloaded")
        self._give_back_memory()

    def memory_report(self) -> dict:
        with self._lock:
            held = sum(e.total_size for e in self._entries.values() if e.on_device)
            return {"device": str(self.device), "free_bytes": self._free_memory(),
                    "reserve_bytes": self.reserve_bytes, "reserved_for_loads_bytes": self._reserved,
                    "models_bytes": held, "models": [e.info() for e in self._entries.values()]}

    # -- internals (every ``_``-method below that says "under the lock" expects it held) --------------------
    def _wait_until_idle(self, keys: list[str]) -> None:
        """Under the lock: wait while another thread loads, moves or parks one of *keys*."""
        while any(k in self._busy for k in keys):
            self._cv.wait()

    def _pin(self, entry: ModelEntry, holder: int) -> Lease:
        """Under the lock: lease *entry* as it is (a parked one is moved back by the caller)."""
        entry.leases += 1
        entry.holders[holder] = entry.holders.get(holder, 0) + 1
        entry.last_used = time.monotonic()
        return Lease(self, entry, holder)

    def _over(self, needed: int, slots: int) -> tuple[bool, bool]:
        """Under the lock: (short of memory, short of slots) for *needed* more bytes and *slots* more models."""
        short_memory = needed > 0 and self.budget_free() < needed
        short_slots = slots > 0 and len(self._entries) + self._reserved_slots + slots > self.max_loaded
        return short_memory, short_slots

    def _admit(self, needed: int, *, slots: int, keep: set[str], holder: int) -> None:
        """Under the lock: make room for *needed* bytes and *slots* models, or raise OutOfMemoryBudget.

        In order of preference: wait for loads in flight and for memory being given back (their bytes are
        counted twice until they finish), evict idle models LRU-first, wait for other threads' leases.
        """
        deadline = time.monotonic() + self.lease_wait_s
        while True:
            short_memory, short_slots = self._over(needed, slots)
            if not (short_memory or short_slots):
                return
            if self._releasing or any(n for h, n in self._in_flight.items() if h != holder):
                self._cv.wait()  # loads in flight elsewhere: their bytes are counted twice until they finish
                continue
            victims = sorted((e for e in self._entries.values()
                              if e.leases == 0 and e.key not in keep and e.key not in self._busy
                              and (short_slots or e.on_device)), key=lambda e: e.last_used)
            if victims:
                self._drop(victims[0], reason="evicted (LRU)")
                self._releasing += 1
                self._lock.release()  # gc and empty_cache are slow: never under the lock
                try:
                    self._give_back_memory()
                finally:
                    self._lock.acquire()
                    self._releasing -= 1
                    self._cv.notify_all()
                continue
            # models other threads hold: worth waiting for only if their release would make it fit
            others = [e for e in self._entries.values()
                      if e.key not in keep and e.leases and holder not in e.holders]
            would_fit = (not short_memory or self.budget_free() + sum(e.total_size for e in others if e.on_device) >= needed) \
                and (not short_slots or len(self._entries) + slots - len(others) <= self.max_loaded)
            remaining = deadline - time.monotonic()
            if others and would_fit and remaining > 0:
                self._cv.wait(remaining)  # a job in another thread will release its model
                continue
            free = max(0, self.budget_free())
            raise OutOfMemoryBudget(
                f"not enough memory: {needed / MB:.0f} MB needed, {free / MB:.0f} MB free after keeping "
                f"{self.reserve_bytes / MB:.0f} MB in reserve, and every other model is in use "
                f"({len(self._entries)} loaded, at most {self.max_loaded}). "
                "Unload a model, lower the reserve in Settings, or use --medvram/--lowvram.")

    def _load(self, request: ModelRequest, holder: int) -> Lease:
        """Outside the lock: run the loader, then enter the model (its key is marked busy meanwhile)."""
        started = time.perf_counter()
        obj = request.load()
        size = weight_bytes(obj)
        now = time.monotonic()
        with self._cv:
            entry = ModelEntry(request.key, request.kind, obj, size, now, now, meta=dict(request.meta or {}))
            self._entries[request.key] = entry
            self._busy.pop(request.key, None)
            lease = self._pin(entry, holder)
            self._log(f"loaded {request.kind} {request.key} ({size / MB:.1f} MB, estimated "
                      f"{(request.size_bytes or 0) / MB:.1f} MB) in {time.perf_counter() - started:.2f}s")
            self._cv.notify_all()
        if self._on_loaded is not None:
            self._on_loaded(request.key, obj)
        return lease

    def _release(self, entry: ModelEntry, holder: int) -> None:
        with self._cv:
            entry.leases = max(0, entry.leases - 1)
            count = entry.holders.get(holder, 0) - 1
            if count > 0:
                entry.holders[holder] = count
            else:
                entry.holders.pop(holder, None)
            entry.last_used = time.monotonic()
            park = (entry.leases == 0 and self.offload != "none" and self.device.type != "cpu"
                    and self._entries.get(entry.key) is entry and entry.on_device and entry.key not in self._busy)
            if park:
                self._busy[entry.key] = "parking on cpu"
            self._cv.notify_all()
        if not park:
            return
        try:
            self._move(entry, torch.device("cpu"))  # slow: outside the lock
        finally:
            with self._cv:
                entry.on_device = False
                self._busy.pop(entry.key, None)
                self._cv.notify_all()

    def _drop(self, entry: ModelEntry, *, reason: str) -> None:
        """Under the lock: forget *entry* (fast); the caller gives the memory back outside the lock."""
        self._entries.pop(entry.key, None)
        try:
            self._leak_watch.append((entry.key, weakref.ref(entry.obj)))
        except TypeError:
            pass  # not weak-referenceable; nothing to watch
        entry.obj = None
        entry.attached.clear()
        self._log(f"{reason} {entry.kind} {entry.key} ({entry.total_size / MB:.1f} MB)")

    def _give_back_memory(self) -> None:
        """Outside the lock: gc, empty_cache, malloc_trim, then report models that are still alive."""
        release_memory(self.device)
        with self._lock:
            watch, self._leak_watch = self._leak_watch, []
        for key, ref in watch:
            obj = ref()
            if obj is not None and not self.is_loaded(key):
                log.warning("model %s (%s) is still referenced after unload: suspected leak (each is reported once)",
                            key, type(obj).__name__)

    @staticmethod
    def _move(entry: ModelEntry, device: torch.device) -> None:
        to = getattr(entry.obj, "to", None)
        if callable(to):
            to(device)

    def _log(self, message: str) -> None:
        log.info("model manager: %s", message)
        self.events.append(message)
        del self.events[:-200]

"""The one object that owns every model in memory.

In the spirit of ComfyUI's ``model_management`` but as a single instance passed
in the app context, never a module global. Every LLM, diffusion pipeline, LoRA
adapter or model under training is held here under a string key:

* ``acquire(key, load)`` loads on demand and returns a :class:`Lease`; a leased
  model is never evicted, so a running job cannot lose its model.
* Before and after each load the manager compares *measured* free memory (CUDA
  driver memory, or available RAM on CPU) with the model's size plus a named
  reserve, and evicts least-recently-used unleased models until it fits.
* With ``offload`` ("medvram"/"lowvram") on an accelerator, idle models move to
  CPU RAM instead of being dropped, and come back on the next lease.
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

log = logging.getLogger(__name__)
T = TypeVar("T")
MB = 1024 * 1024


class ModelInUse(RuntimeError):
    """Raised when unloading a model that a running job holds a lease on."""


class OutOfMemoryBudget(RuntimeError):
    """Raised when a model cannot fit even after evicting every idle model."""


def module_bytes(obj: Any) -> int:
    """Bytes of parameters and buffers held by *obj*.

    Understands ``torch.nn.Module``, objects with a ``memory_bytes()`` method, diffusers pipelines
    (their ``components`` dict) and plain containers of modules.
    """
    if hasattr(obj, "memory_bytes") and callable(obj.memory_bytes):
        return int(obj.memory_bytes())
    if isinstance(obj, torch.nn.Module):
        seen, total = set(), 0
        for t in list(obj.parameters()) + list(obj.buffers()):
            ptr = t.data_ptr()
            if ptr in seen:
                continue  # tied weights count once
            seen.add(ptr)
            total += t.numel() * t.element_size()
        return total
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    components = getattr(obj, "components", None)
    if isinstance(components, dict):
        return sum(module_bytes(v) for v in components.values() if v is not None)
    if isinstance(obj, dict):
        return sum(module_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(module_bytes(v) for v in obj)
    return 0


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

    def info(self) -> dict:
        return {"key": self.key, "kind": self.kind, "size_mb": round(self.size / MB, 1),
                "leases": self.leases, "on_device": self.on_device,
                "last_used": self.last_used, **self.meta}


class Lease(Generic[T]):
    """A claim on a loaded model. Use as a context manager, or call ``release()`` once."""

    def __init__(self, manager: "ModelManager", entry: ModelEntry):
        self._manager = manager
        self._entry = entry
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
            self._manager._release(self._entry)

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
                 on_loaded: Callable[[str, Any], None] | None = None):
        """
        Args:
            device: where models live while used.
            reserve_bytes: memory always left free for activations and the rest of the system.
            max_loaded: most models resident at once, whatever the memory says.
            offload: "none", "medvram" or "lowvram"; anything but "none" parks idle models on CPU.
            free_memory: returns measured free bytes on *device*; injectable so tests can fake a device.
            on_loaded: called with (key, model) after each load (the ``on_model_loaded`` callback).
        """
        self.device = torch.device(device)
        self.reserve_bytes = reserve_bytes
        self.max_loaded = max_loaded
        self.offload = offload
        self._free_memory = free_memory or self._measured_free
        self._on_loaded = on_loaded
        self._lock = threading.RLock()
        self._entries: dict[str, ModelEntry] = {}
        self._loading: dict[str, threading.Lock] = {}
        self._leak_watch: list[tuple[str, weakref.ref]] = []
        self.events: list[str] = []  # human-readable history for diagnostics, newest last

    # -- measuring ------------------------------------------------------------------
    def _measured_free(self) -> int:
        if self.device.type == "cuda":
            free, _ = torch.cuda.mem_get_info(self.device)
            return free
        import psutil
        return psutil.virtual_memory().available

    def budget_free(self) -> int:
        """Bytes a new model may use now: measured free memory minus the reserve."""
        return self._free_memory() - self.reserve_bytes

    # -- public API -------------------------------------------------------------------
    def acquire(self, key: str, load: Callable[[], T] | None = None, *, kind: str = "model",
                size_bytes: int | None = None, meta: dict | None = None) -> Lease[T]:
        """Return a lease on model *key*, loading it with *load()* if it is not in memory.

        *size_bytes* is the expected size (e.g. the file size); when given, memory is freed before
        loading. The real size is measured after loading.
        """
        with self._lock:
            entry = self._entries.get(key)
            if entry is not None:
                return self._lease(entry)
            if load is None:
                raise KeyError(f"model {key!r} is not loaded and no loader was given")
            key_lock = self._loading.setdefault(key, threading.Lock())
        with key_lock:  # one loader per key; other threads wait here and then find the entry
            with self._lock:
                entry = self._entries.get(key)
                if entry is not None:
                    return self._lease(entry)
                self._make_room(size_bytes or 0, count=1)
            started = time.perf_counter()
            obj = load()
            size = module_bytes(obj)
            now = time.monotonic()
            with self._lock:
                entry = ModelEntry(key, kind, obj, size, now, now, meta=dict(meta or {}))
                self._entries[key] = entry
                lease = self._lease(entry)
                self._make_room(0, count=0, keep=key)
                self._log(f"loaded {kind} {key} ({size / MB:.1f} MB) in {time.perf_counter() - started:.2f}s")
                self._loading.pop(key, None)
        if self._on_loaded is not None:
            self._on_loaded(key, obj)
        return lease

    def register(self, key: str, obj: Any, *, kind: str = "model", meta: dict | None = None) -> Lease:
        """Hand an already-built model (e.g. one being trained) to the manager and lease it."""
        return self.acquire(key, lambda: obj, kind=kind, meta=meta)

    def is_loaded(self, key: str) -> bool:
        with self._lock:
            return key in self._entries

    def loaded(self, kind: str | None = None) -> list[dict]:
        with self._lock:
            return [e.info() for e in self._entries.values() if kind is None or e.kind == kind]

    def unload(self, key: str, *, force: bool = False) -> bool:
        """Drop model *key*. Refuses (ModelInUse) while leased unless *force*. Returns False if absent."""
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return False
            if entry.leases and not force:
                raise ModelInUse(f"model {key!r} is in use by a running job; interrupt it first")
            self._drop(entry, reason="unloaded")
        release_memory(self.device)
        self._report_leaks()
        return True

    def unload_all(self, kind: str | None = None) -> None:
        with self._lock:
            for entry in list(self._entries.values()):
                if entry.leases == 0 and (kind is None or entry.kind == kind):
                    self._drop(entry, reason="unloaded")
        release_memory(self.device)
        self._report_leaks()

    def memory_report(self) -> dict:
        with self._lock:
            held = sum(e.size for e in self._entries.values() if e.on_device)
            return {"device": str(self.device), "free_bytes": self._free_memory(),
                    "reserve_bytes": self.reserve_bytes, "models_bytes": held,
                    "models": [e.info() for e in self._entries.values()]}

    # -- internals ----------------------------------------------------------------------
    def _lease(self, entry: ModelEntry) -> Lease:
        entry.leases += 1
        entry.last_used = time.monotonic()
        if not entry.on_device:
            self._move(entry, self.device)
            entry.on_device = True
        return Lease(self, entry)

    def _release(self, entry: ModelEntry) -> None:
        with self._lock:
            entry.leases = max(0, entry.leases - 1)
            entry.last_used = time.monotonic()
            if entry.leases == 0 and self.offload != "none" and self.device.type != "cpu" \
                    and entry.key in self._entries and entry.on_device:
                self._move(entry, torch.device("cpu"))
                entry.on_device = False

    def _make_room(self, needed: int, *, count: int, keep: str | None = None) -> None:
        """Evict idle models, least recently used first, until *needed* bytes and *count* slots fit."""
        def over() -> bool:
            resident = [e for e in self._entries.values()]
            too_many = len(resident) + count > self.max_loaded
            return too_many or self.budget_free() < needed

        candidates = sorted((e for e in self._entries.values() if e.leases == 0 and e.key != keep),
                            key=lambda e: e.last_used)
        evicted = False
        while over() and candidates:
            self._drop(candidates.pop(0), reason="evicted (LRU)")
            evicted = True
            release_memory(self.device)
        if evicted:
            self._report_leaks()
        if needed and self.budget_free() < needed:
            raise OutOfMemoryBudget(
                f"not enough memory: {needed / MB:.0f} MB needed, {max(0, self.budget_free()) / MB:.0f} MB free "
                f"after keeping {self.reserve_bytes / MB:.0f} MB in reserve, and every other model is in use. "
                "Unload a model, lower the reserve in Settings, or use --medvram/--lowvram.")

    def _drop(self, entry: ModelEntry, *, reason: str) -> None:
        self._entries.pop(entry.key, None)
        try:
            self._leak_watch.append((entry.key, weakref.ref(entry.obj)))
        except TypeError:
            pass  # not weak-referenceable; nothing to watch
        entry.obj = None
        self._log(f"{reason} {entry.kind} {entry.key} ({entry.size / MB:.1f} MB)")

    def _report_leaks(self) -> None:
        """Call right after ``release_memory`` (which has just run the garbage collector)."""
        for key, ref in self._leak_watch:
            obj = ref()
            if obj is not None and key not in self._entries:
                log.warning("model %s (%s) is still referenced after unload: suspected leak (each is reported once)",
                            key, type(obj).__name__)
        self._leak_watch = []

    @staticmethod
    def _move(entry: ModelEntry, device: torch.device) -> None:
        to = getattr(entry.obj, "to", None)
        if callable(to):
            to(device)

    def _log(self, message: str) -> None:
        log.info("model manager: %s", message)
        self.events.append(message)
        del self.events[:-200]

import gc
import threading
import time
import weakref

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from modules.model_manager import MB, ModelInUse, ModelManager, ModelRequest, OutOfMemoryBudget
from modules.weight_bytes import estimate_load_bytes, weight_bytes


class FakeDevice:
    """A device with a fixed capacity: free memory = capacity - what the manager holds."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.manager: ModelManager | None = None

    def free(self) -> int:
        held = sum(m["size_mb"] for m in self.manager.loaded() if m["on_device"]) * MB if self.manager else 0
        return int(self.capacity - held)


def linear(mb: int) -> torch.nn.Module:
    n = int(mb * MB / 4 / 256)
    return torch.nn.Linear(256, n, bias=False)


def make_manager(capacity_mb: int, reserve_mb: int = 0, max_loaded: int = 10) -> ModelManager:
    dev = FakeDevice(capacity_mb * MB)
    mm = ModelManager("cpu", reserve_bytes=reserve_mb * MB, max_loaded=max_loaded, free_memory=dev.free)
    dev.manager = mm
    return mm


def test_weight_bytes_counts_tied_weights_once():
    m = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    m[1].weight = m[0].weight
    assert weight_bytes(m) == 10 * 4 * 4
    assert weight_bytes({"a": m, "b": [m[0].weight]}) == 10 * 4 * 4, "shared across containers: once"


def test_estimate_load_bytes_reads_safetensors_headers(tmp_path):
    """The estimate comes from the header (dtype and shape), at the dtype the model will be loaded in."""
    save_file({"w": torch.zeros(64, 32, dtype=torch.float16), "ids": torch.zeros(10, dtype=torch.int64)},
              tmp_path / "m.safetensors")
    assert estimate_load_bytes(tmp_path / "m.safetensors") == 64 * 32 * 2 + 80
    assert estimate_load_bytes(tmp_path / "m.safetensors", torch.float32) == 64 * 32 * 4 + 80, \
        "an fp16 file loaded in fp32 takes twice its size; integer tensors keep theirs"
    save_file({"model_ema.w": torch.zeros(64, 32)}, tmp_path / "ema.safetensors")
    assert estimate_load_bytes(tmp_path / "ema.safetensors", ignore_prefixes=("model_ema.",)) == 0
    unet = tmp_path / "pipe" / "unet"
    unet.mkdir(parents=True)
    save_file({"w": torch.zeros(8, 8)}, unet / "diffusion_pytorch_model.safetensors")
    save_file({"w": torch.zeros(8, 8, dtype=torch.float16)}, unet / "diffusion_pytorch_model.fp16.safetensors")
    (unet / "diffusion_pytorch_model.bin").write_bytes(b"x" * 1000)
    assert estimate_load_bytes(tmp_path / "pipe") == 8 * 8 * 4, "only the files a load reads count"
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "broken.safetensors").write_bytes(b"\xff" * 100)
    assert estimate_load_bytes(tmp_path / "sub", torch.float32) == 100, \
        "a broken header counts its file size and never raises"


def test_lease_keeps_model_and_loads_once():
    mm = make_manager(100)
    calls = []
    with mm.acquire("a", lambda: calls.append(1) or linear(1)) as model:
        assert isinstance(model, torch.nn.Linear)
        with pytest.raises(ModelInUse):
            mm.unload("a")
    mm.acquire("a", lambda: calls.append(1) or linear(1)).release()
    assert calls == [1]
    assert mm.unload("a") and not mm.is_loaded("a")


def test_budget_evicts_least_recently_used():
    mm = make_manager(capacity_mb=30, reserve_mb=5)
    mm.acquire("a", lambda: linear(10), size_bytes=10 * MB).release()
    mm.acquire("b", lambda: linear(10), size_bytes=10 * MB).release()
    mm.acquire("a", lambda: linear(10)).release()  # a is now more recently used than b
    mm.acquire("c", lambda: linear(10), size_bytes=10 * MB).release()
    assert mm.is_loaded("a") and mm.is_loaded("c") and not mm.is_loaded("b")


def test_leased_model_is_never_evicted():
    mm = make_manager(capacity_mb=25, reserve_mb=0)
    lease = mm.acquire("a", lambda: linear(10), size_bytes=10 * MB)
    mm.acquire("b", lambda: linear(10), size_bytes=10 * MB).release()
    with pytest.raises(OutOfMemoryBudget, match="in use"):
        mm.acquire("c", lambda: linear(20), size_bytes=20 * MB)
    assert mm.is_loaded("a"), "a is leased"
    lease.release()
    mm.acquire("c", lambda: linear(20), size_bytes=20 * MB).release()
    assert not mm.is_loaded("a") and mm.is_loaded("c")


def test_max_loaded_count():
    mm = make_manager(capacity_mb=1000, max_loaded=2)
    for key in "abc":
        mm.acquire(key, lambda: linear(1)).release()
    assert [m["key"] for m in mm.loaded()] == ["b", "c"]


def test_thread_safe_concurrent_acquire_loads_once():
    mm = make_manager(capacity_mb=1000)
    loads = []

    def loader():
        loads.append(1)
        time.sleep(0.1)
        return linear(1)

    results = []

    def worker():
        with mm.acquire("shared", loader) as m:
            results.append(id(m))

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(loads) == 1 and len(set(results)) == 1
    assert mm.loaded()[0]["leases"] == 0


def test_on_loaded_callback():
    seen = []
    mm = ModelManager("cpu", reserve_bytes=0, free_memory=lambda: 10**12, on_loaded=lambda k, m: seen.append(k))
    mm.acquire("x", lambda: linear(1)).release()
    assert seen == ["x"]


def test_fifty_switches_do_not_grow_memory(tmp_path):
    """Switching between two ~64 MB models 50 times: RSS after 50 switches within 10% of RSS after 2."""
    files = {}
    for name, seed in (("a", 0), ("b", 1)):
        torch.manual_seed(seed)
        files[name] = tmp_path / f"{name}.safetensors"
        save_file({"weight": torch.randn(4096, 4096)}, files[name])  # 64 MB

    def load(name):
        def _load():
            m = torch.nn.utils.skip_init(torch.nn.Linear, 4096, 4096, bias=False)  # no random init: weights come from the file
            m.weight.data = load_file(files[name])["weight"]
            return m
        return _load

    mm = ModelManager("cpu", reserve_bytes=0, max_loaded=1)
    proc = psutil.Process()
    x = torch.randn(1, 4096)

    def switch(i):
        name = "ab"[i % 2]
        with mm.acquire(name, load(name)) as m:
            with torch.no_grad():
                m(x)

    for i in range(2):
        switch(i)
    gc.collect()
    rss_after_2 = proc.memory_info().rss
    for i in range(2, 50):
        switch(i)
    gc.collect()
    rss_after_50 = proc.memory_info().rss
    assert rss_after_50 <= rss_after_2 * 1.10, (rss_after_2 / MB, rss_after_50 / MB)


class Movable:
    """Records where the manager moves it (no real GPU needed)."""

    def __init__(self, size: int = MB):
        self.moves = []
        self.size = size

    def to(self, device):
        self.moves.append(torch.device(device).type)
        return self

    def memory_bytes(self):
        return self.size


def test_medvram_parks_idle_models_on_cpu():
    mm = ModelManager("cuda", reserve_bytes=0, offload="medvram", free_memory=lambda: 10**12)
    lease = mm.acquire("m", Movable)
    model = lease.model
    lease.release()
    assert model.moves == ["cpu"] and not mm.loaded()[0]["on_device"]
    with mm.acquire("m") as again:
        assert again is model and model.moves == ["cpu", "cuda"]
    no_offload = ModelManager("cuda", reserve_bytes=0, offload="none", free_memory=lambda: 10**12)
    with no_offload.acquire("m", Movable) as m2:
        pass
    assert m2.moves == []


class AllocatingDevice:
    """A fake accelerator that counts what models really occupy on it, and the peak.

    Models are :class:`FakeWeights`: they occupy their bytes from the moment a loader makes them until they are
    garbage-collected or moved to CPU, whatever the manager believes, so an overshoot cannot hide."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.used = 0
        self.peak = 0
        self._lock = threading.Lock()

    def add(self, n: int) -> None:
        with self._lock:
            self.used += n
            self.peak = max(self.peak, self.used)

    def free(self) -> int:
        return self.capacity - self.used


class FakeWeights:
    def __init__(self, device: AllocatingDevice, size: int):
        self.device, self.size, self.on_device = device, size, True
        device.add(size)
        self._finalizer = weakref.finalize(self, device.add, -size)

    def to(self, where):
        on_device = torch.device(where).type != "cpu"
        if on_device != self.on_device:
            self.device.add(self.size if on_device else -self.size)
            self._finalizer.detach()
            if on_device:
                self._finalizer = weakref.finalize(self, self.device.add, -self.size)
            self.on_device = on_device
        return self

    def memory_bytes(self):
        return self.size


def test_concurrent_loads_of_different_models_never_overshoot_the_budget():
    """Four threads load four 60 MB models at once on a 100 MB device: admission reserves before loading, so
    they load one after another (each waiting for the previous one's lease), and the device never holds more
    than 100 MB. Before admission counted loads in flight, two loads passed the check together (peak 120 MB)."""
    dev = AllocatingDevice(100 * MB)
    mm = ModelManager("cpu", reserve_bytes=0, max_loaded=10, free_memory=dev.free, lease_wait_s=30)
    start = threading.Barrier(4)
    errors, done = [], []

    def slow_loader():
        time.sleep(0.15)  # reading the file: the memory is taken only when the weights materialize
        return FakeWeights(dev, 60 * MB)

    def worker(key):
        try:
            start.wait()
            lease = mm.acquire(key, slow_loader, size_bytes=60 * MB)
            assert lease.model.size == 60 * MB
            time.sleep(0.02)
            lease.release()
            done.append(key)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(f"{key}: {exc!r}")

    threads = [threading.Thread(target=worker, args=(k,)) for k in "abcd"]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert dev.peak <= dev.capacity, f"peak {dev.peak / MB:.0f} MB on a {dev.capacity / MB:.0f} MB device"
    assert not errors and sorted(done) == list("abcd")
    assert len(mm.loaded()) == 1


def test_acquire_all_reserves_room_for_every_model_before_loading_any():
    """A job that needs two models that cannot both fit fails before loading either of them."""
    dev = AllocatingDevice(100 * MB)
    mm = ModelManager("cpu", reserve_bytes=0, free_memory=dev.free)
    loads = []

    def loader(size):
        return lambda: loads.append(size) or FakeWeights(dev, size)

    with pytest.raises(OutOfMemoryBudget, match="120 MB needed"):
        mm.acquire_all([ModelRequest("a", loader(60 * MB), size_bytes=60 * MB),
                        ModelRequest("b", loader(60 * MB), size_bytes=60 * MB)])
    assert loads == [] and mm.loaded() == [] and dev.used == 0
    a, b = mm.acquire_all([ModelRequest("a", loader(40 * MB), size_bytes=40 * MB),
                           ModelRequest("b", loader(50 * MB), size_bytes=50 * MB)])
    assert (a.model.size, b.model.size) == (40 * MB, 50 * MB) and dev.peak == 90 * MB
    a.release(), b.release()


def test_parked_model_re_lease_respects_the_budget():
    """--medvram parks an idle model on CPU; leasing it again is admitted like a load: while another model
    that is in use fills the device, the re-lease is refused instead of moving it back over the budget."""
    dev = AllocatingDevice(100 * MB)
    mm = ModelManager("cuda", reserve_bytes=0, offload="medvram", free_memory=dev.free)
    mm.acquire("a", lambda: FakeWeights(dev, 60 * MB), size_bytes=60 * MB).release()
    assert dev.used == 0 and not mm.loaded()[0]["on_device"], "parked on CPU when idle"
    b = mm.acquire("b", lambda: FakeWeights(dev, 60 * MB), size_bytes=60 * MB)
    with pytest.raises(OutOfMemoryBudget, match="60 MB needed"):
        mm.acquire("a")
    assert dev.peak <= dev.capacity and dev.used == 60 * MB
    b.release()  # b is parked in turn, which makes room for a
    with mm.acquire("a") as a:
        assert a.on_device and dev.used == 60 * MB
    assert dev.peak <= dev.capacity


def test_slow_work_runs_outside_the_lock():
    """While one model loads (slowly), another thread can lease a model that is already loaded and read the
    manager's state; the loader of the same key runs once and the other acquirer waits for it."""
    mm = make_manager(capacity_mb=1000)
    mm.acquire("ready", lambda: linear(1)).release()
    loading, finish = threading.Event(), threading.Event()
    loads = []

    def slow():
        loads.append(1)
        loading.set()
        assert finish.wait(10)
        return linear(1)

    first = threading.Thread(target=lambda: mm.acquire("slow", slow).release())
    first.start()
    assert loading.wait(10)
    started = time.monotonic()
    with mm.acquire("ready"):
        assert mm.loaded() and time.monotonic() - started < 1.0, "the lock is not held during a load"
    second = threading.Thread(target=lambda: mm.acquire("slow", slow).release())
    second.start()
    time.sleep(0.1)
    finish.set()
    first.join(10), second.join(10)
    assert loads == [1] and mm.is_loaded("slow")


def test_failed_load_releases_its_reservation():
    mm = make_manager(capacity_mb=100)

    def broken():
        raise ValueError("corrupt weights")

    with pytest.raises(ValueError, match="corrupt"):
        mm.acquire("x", broken, size_bytes=80 * MB)
    assert mm.budget_free() == 100 * MB, "nothing stays reserved for a load that failed"
    mm.acquire("y", lambda: linear(1), size_bytes=80 * MB).release()
    assert mm.is_loaded("y") and not mm.is_loaded("x")


def test_a_loader_may_acquire_another_model_without_waiting_for_itself():
    """A bundle whose loader leases a shared part (e.g. a text encoder) must not wait for its own load."""
    mm = make_manager(capacity_mb=1000)
    result = []

    def outer():
        with mm.acquire("inner", lambda: linear(1), size_bytes=MB) as inner:
            return torch.nn.Sequential(inner)

    t = threading.Thread(target=lambda: result.append(mm.acquire("outer", outer, size_bytes=MB)))
    t.start()
    t.join(10)
    assert not t.is_alive() and result and mm.is_loaded("inner")
    result[0].release()

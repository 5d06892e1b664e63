import gc
import threading
import time

import psutil
import pytest
import torch
from safetensors.torch import load_file, save_file

from modules.model_manager import MB, ModelInUse, ModelManager, OutOfMemoryBudget, module_bytes


class FakeDevice:
    """A device with a fixed capacity: free memory = capacity - what the manager holds."""

    def __init__(self, capacity: int):
        self.capacity = capacity
        self.manager: ModelManager | None = None

    def free(self) -> int:
        held = sum(m["size_mb"] for m in self.manager.loaded()) * MB if self.manager else 0
        return int(self.capacity - held)


def linear(mb: int) -> torch.nn.Module:
    n = int(mb * MB / 4 / 256)
    return torch.nn.Linear(256, n, bias=False)


def make_manager(capacity_mb: int, reserve_mb: int = 0, max_loaded: int = 10) -> ModelManager:
    dev = FakeDevice(capacity_mb * MB)
    mm = ModelManager("cpu", reserve_bytes=reserve_mb * MB, max_loaded=max_loaded, free_memory=dev.free)
    dev.manager = mm
    return mm


def test_module_bytes_counts_tied_weights_once():
    m = torch.nn.Sequential(torch.nn.Embedding(10, 4), torch.nn.Linear(4, 10, bias=False))
    m[1].weight = m[0].weight
    assert module_bytes(m) == 10 * 4 * 4


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

    def __init__(self):
        self.moves = []

    def to(self, device):
        self.moves.append(torch.device(device).type)
        return self

    def memory_bytes(self):
        return MB


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

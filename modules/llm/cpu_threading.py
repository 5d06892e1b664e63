"""CPU threading for LLM decode: the row-parallel matrix product, and why it is off by default.

Threads are set up once: the device worker gets the configured torch thread count when it starts
(:meth:`modules.devices.Devices.setup_worker_thread`) and nothing changes it around a forward pass.
(An earlier version set one intra-op thread for the duration of every decode step and restored it after;
``torch.set_num_threads`` also sets the count each *new* thread starts with, so any thread whose first
torch call fell into that window, a web request's or a later worker's, stayed single-threaded for good.)
Without that toggle the row blocks below run with torch's own count; the split products then measured
the same with one or two intra-op threads (2 x 5632 x 2048 fp32 GEMV on the 2-core dev machine: 47 GB/s
either way, against 52 GB/s for one unsplit 2-thread product).

Whether :class:`RowParallel` earns its place is measured with ``benchmarks/llm_decode.py`` (the 1.1B
shape, batch-1 decode, with and without it in the same rounds); ``docs/performance.md`` has the tables
behind the default :data:`ROW_PARALLEL_DEFAULT`. In short, on the 2-core dev machine with nothing else
running (``python benchmarks/llm_decode.py --rounds 3 --skip-hf``, 2026-12-01, read bandwidth 31 GB/s)
torch's own threading decodes at 6.59-6.72 tok/s and the row-parallel product at 5.36-5.59 tok/s, so it is
**off** by default. While other processes compete for the cores the row-parallel product was 2-3x faster
(2.62 vs 1.37, 2.46 vs 0.81 tok/s), because its blocks are claimed dynamically while an OpenMP team
waits at a barrier for its slowest thread; a machine that is always busy may want the setting
``llm.cpu_row_parallel`` on (it applies to models loaded afterwards).
"""
from __future__ import annotations

import itertools
import threading
from concurrent.futures import ThreadPoolExecutor

import torch
import torch.nn.functional as F
from torch import nn

#: off: on the quiet 2-core dev machine torch's threading decodes the 1.1B shape 20% faster (6.69 vs 5.57
#: tok/s, median of 3 interleaved rounds, docs/performance.md); row-parallel only wins when the cores are busy
ROW_PARALLEL_DEFAULT = False


def row_parallel_threads(enabled: bool, cpu_threads: int) -> int:
    """How many threads split decode matmuls for a model loaded now: *cpu_threads* when enabled, else 1 (off)."""
    return max(1, int(cpu_threads)) if enabled else 1


class RowParallel:
    """Small-batch matrix products split by weight rows over CPU threads (decode is bandwidth-bound).

    Decoding streams every weight once per token. MKL's fp32 GEMV does not spread over two cores
    (measured ~17 GB/s with 1 or 2 threads on the 2-core dev machine, where a 2-thread read reaches
    ~31 GB/s), so here the weights are cut into contiguous row blocks (views, no copies) that the
    calling thread and ``threads - 1`` helpers take one at a time, each running a one-thread product
    (~26 GB/s). Blocks are claimed dynamically, so a helper the OS is slow to schedule on a busy
    machine costs nothing: the caller takes the remaining blocks itself. Linears that read the same
    input (q/k/v, gate/up) are cut together, so a layer costs four hand-offs. Larger inputs (prefill)
    use PyTorch's own threading unchanged. torch's thread count is never changed here (see the
    module docstring).
    """

    def __init__(self, threads: int, max_tokens: int = 16, min_rows: int = 1024, blocks_per_thread: int = 2):
        self.threads, self.max_tokens, self.min_rows = threads, max_tokens, min_rows
        self.blocks = threads * blocks_per_thread
        self._pool = ThreadPoolExecutor(threads - 1, thread_name_prefix="llm-gemv")

    def applies(self, x: torch.Tensor) -> bool:
        return x.device.type == "cpu" and x.numel() // x.shape[-1] <= self.max_tokens

    def _cut(self, modules: tuple[nn.Linear, ...], total: int) -> list[tuple[int, torch.Tensor, torch.Tensor | None]]:
        """Row blocks of the modules' stacked weights, about total/blocks rows each: (module, rows, bias)."""
        pieces, offset = [], 0
        for index, module in enumerate(modules):
            n = module.weight.shape[0]
            for b in range(self.blocks):
                lo = max(offset, b * total // self.blocks) - offset
                hi = min(offset + n, (b + 1) * total // self.blocks) - offset
                if hi > lo:
                    bias = module.bias[lo:hi] if module.bias is not None else None
                    pieces.append((index, module.weight[lo:hi], bias))
            offset += n
        return pieces

    def linears(self, x: torch.Tensor, modules: tuple[nn.Linear, ...]) -> list[torch.Tensor]:
        """``[m(x) for m in modules]``, with row blocks computed by whichever thread is free."""
        if not all(isinstance(m, nn.Linear) for m in modules):   # int8/int4 layers (modules.quantize) run whole
            return [m(x) for m in modules]
        total = sum(m.weight.shape[0] for m in modules)
        if total < self.min_rows or not self.applies(x):
            return [m(x) for m in modules]
        work = _Blocks(self._cut(modules, total), x, torch.is_inference_mode_enabled())
        for _ in range(self.threads - 1):
            self._pool.submit(work.run, True)
        mine = work.run(False)
        for _ in range(len(work.pieces) - mine):          # wait only for blocks a helper took
            work.finished.acquire()
        if work.error is not None:
            raise work.error
        outputs: list[list[torch.Tensor]] = [[] for _ in modules]
        for (index, _, _), y in zip(work.pieces, work.results):
            outputs[index].append(y)
        return [o[0] if len(o) == 1 else torch.cat(o, dim=-1) for o in outputs]

    def close(self) -> None:
        self._pool.shutdown(wait=False)


class _Blocks:
    """One call's row blocks, claimed one by one by the caller and the helper threads."""

    def __init__(self, pieces, x: torch.Tensor, inference: bool):
        self.pieces, self.x, self.inference = pieces, x, inference
        self.results: list[torch.Tensor | None] = [None] * len(pieces)
        self._next = itertools.count()                     # next() on a count is atomic under the GIL
        self.finished = threading.Semaphore(0)             # released once per block a helper finishes
        self.error: BaseException | None = None

    def run(self, helper: bool) -> int:
        """Compute blocks until none is left; return how many this thread did."""
        done = 0
        # Grad and inference modes are thread-local: use the caller's.
        with torch.inference_mode() if self.inference else torch.no_grad():
            for i in iter(self._next.__next__, None):
                if i >= len(self.pieces):
                    break
                _, weight, bias = self.pieces[i]
                if not helper:
                    self.results[i] = linear(self.x, weight, bias)
                else:
                    try:
                        self.results[i] = linear(self.x, weight, bias)
                    except BaseException as exc:           # handed to the caller, which re-raises it
                        self.error = exc
                    self.finished.release()
                done += 1
        return done


def project(x: torch.Tensor, modules: tuple[nn.Linear, ...], row_parallel: RowParallel | None) -> list[torch.Tensor]:
    """Apply each linear to ``x``, split over threads when a :class:`RowParallel` is attached."""
    return row_parallel.linears(x, modules) if row_parallel is not None else [m(x) for m in modules]


class Linear(nn.Linear):
    """``nn.Linear`` (same parameters, state-dict keys and hooks) whose forward is :func:`linear`: what the
    Llama model's projections are, so a single bf16 row decodes through ``torch.mv``. A subclass rather than a
    function call in the model, so module hooks (the importance-matrix collector's, an extension's) still
    see every call."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """``F.linear``, except that one bf16 row on a CPU (and no bias) goes through ``torch.mv``.

    Why: batch-1 decode streams every weight once per token, and PyTorch's CPU ``F.linear`` for a single bf16
    row reads weights at about 27-32 GB/s where ``torch.mv`` on the same weights reaches 40-49 GB/s (torch
    2.13, the 2-core dev machine, TinyLlama-1.1B's q/k/v, MLP and output-head shapes, weights out of cache;
    fp32 is the same either way). The results are bitwise equal on those shapes (checked in
    ``tests/llm/test_single_row_linear.py``), so batched and single-row decoding still agree exactly. (A
    bias would be added after rounding instead of inside the product, so biased layers keep ``F.linear``.)
    """
    if bias is None and x.dtype is torch.bfloat16 and weight.dtype is torch.bfloat16 \
            and x.device.type == "cpu" and x.numel() == x.shape[-1] and weight.dim() == 2:
        return torch.mv(weight, x.reshape(-1)).reshape(*x.shape[:-1], weight.shape[0])
    return F.linear(x, weight, bias)

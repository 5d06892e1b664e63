"""Device, dtype, attention-backend and CPU-thread choice, plus the one free-memory reading.

Nothing here touches the GPU at import time: :func:`choose_devices` is called
once from ``main`` and the result travels in the app context. The device worker
calls :meth:`Devices.setup_worker_thread` once when it starts; nothing toggles
torch's thread count afterwards (a thread whose first torch call falls into such
a toggle would keep the toggled count for good).
"""
from __future__ import annotations

import importlib.util
import logging
from dataclasses import dataclass

import psutil
import torch

log = logging.getLogger(__name__)

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}

#: ``--precision auto`` on a CPU with AVX-512 BF16 / AMX loads language models at least this wide (hidden
#: size) in bf16, narrower ones in fp32. Measured (benchmarks/llm_precision.py, docs/speculative.md): at width
#: 288 (atelier-tiny-chat) bf16 decode is about 2x slower than fp32 (the products are too small for
#: oneDNN's bf16 kernels to pay for their conversions); at 576 (SmolLM2-135M's layers) a decode step costs
#: the same and a 9-token verify pass is 1.8x faster; at 2048 (TinyLlama-1.1B's) decode is 1.1x and the
#: verify pass 2.3x faster, as MKL's small-batch fp32 GEMM is poor (../shared/reference/cpu-baselines.md §2).
LLM_BF16_MIN_HIDDEN = 512


def cpu_supports_bf16() -> bool:
    """AVX-512 BF16 or AMX on this CPU (Linux /proc/cpuinfo flags); elsewhere assume not."""
    from pathlib import Path
    try:
        text = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False
    flags = set()
    for line in text.splitlines():
        if line.startswith("flags"):
            flags.update(line.split(":", 1)[1].split())
            break
    return bool(flags & {"avx512_bf16", "amx_bf16"})


@dataclass
class Devices:
    device: torch.device
    dtype: torch.dtype
    #: "sdpa" (PyTorch scaled_dot_product_attention) or "xformers"
    attention: str = "sdpa"
    #: "none", "medvram" (whole models parked in CPU RAM between uses) or "lowvram" (submodules moved to
    #: the device one at a time during each forward pass)
    offload: str = "none"
    notes: tuple[str, ...] = ()
    #: the Stable Diffusion VAE's dtype: fp32 under --no-half-vae when *dtype* is half, else *dtype*
    vae_dtype: torch.dtype | None = None
    #: whether --xformers was given (diagnostics say why it is not in use when *attention* is "sdpa")
    xformers_requested: bool = False

    #: torch intra-op threads for device work on the CPU (decode, prefill, diffusion), set once per worker
    cpu_threads: int = 0
    #: ``--precision auto`` on a CPU with fast bf16: language models wide enough load in bf16 (llm_dtype)
    llm_auto_bf16: bool = False

    def __post_init__(self):
        if self.vae_dtype is None:
            self.vae_dtype = self.dtype

    def llm_dtype(self, config: object) -> torch.dtype:
        """The dtype a language model of *config* loads in: *dtype*, except under ``--precision auto`` on a CPU
        with AVX-512 BF16 / AMX, where models at least LLM_BF16_MIN_HIDDEN wide load in bf16 (measured faster
        there; narrower ones are faster in fp32). A static rule, so a model's dtype never depends on load."""
        if self.llm_auto_bf16 and int(getattr(config, "hidden_size", 0)) >= LLM_BF16_MIN_HIDDEN:
            return torch.bfloat16
        return self.dtype

    def total_memory(self) -> int:
        """Bytes of memory models on this device can use."""
        if self.device.type == "cuda":
            return torch.cuda.get_device_properties(self.device).total_memory
        return psutil.virtual_memory().total

    def free_memory(self) -> int:
        return free_memory(self.device)

    def setup_worker_thread(self) -> None:
        """Give the calling (worker) thread the configured torch thread count; called once per worker.

        ``torch.set_num_threads`` also sets the count that every thread started later begins with, so
        calling it once here, and nowhere around forward passes, gives every thread the same count.
        """
        if self.cpu_threads > 0 and torch.get_num_threads() != self.cpu_threads:
            torch.set_num_threads(self.cpu_threads)

    def describe(self) -> dict:
        return {
            "device": str(self.device), "dtype": str(self.dtype).replace("torch.", ""),
            "vae dtype": str(self.vae_dtype).replace("torch.", ""),
            "llm dtype": (f"bf16 for models at least {LLM_BF16_MIN_HIDDEN} wide, else "
                          f"{str(self.dtype).replace('torch.', '')}" if self.llm_auto_bf16
                          else str(self.dtype).replace("torch.", "")),
            "attention": self.attention_report(), "offload": self.offload, "cpu_threads": self.cpu_threads,
            "total_memory": self.total_memory(), "free_memory": self.free_memory(),
        }

    def attention_report(self) -> str:
        """The attention backend in use, in words: what diagnostics and the Troubleshooting tab show."""
        if self.attention == "xformers":
            return "xformers (memory-efficient attention)"
        if self.xformers_requested:
            why = "not installed" if not xformers_available() else f"unusable on {self.device.type} (it needs CUDA)"
            return f"xformers requested but {why}: using PyTorch SDPA"
        return "PyTorch SDPA"


def free_memory(device: torch.device | str) -> int:
    """Measured free bytes on *device*, the one reading every memory decision uses: the driver's free
    memory plus PyTorch's cached-but-unused blocks on CUDA, available RAM elsewhere (MPS shares it)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        stats = torch.cuda.memory_stats(device)
        reserved_unused = stats.get("reserved_bytes.all.current", 0) - stats.get("active_bytes.all.current", 0)
        return free + max(0, reserved_unused)
    return psutil.virtual_memory().available


def xformers_available() -> bool:
    """xformers can be imported (looked up at call time, so a test can provide a module)."""
    import sys
    if "xformers" in sys.modules:
        return sys.modules["xformers"] is not None
    return importlib.util.find_spec("xformers") is not None


def offload_notes(offload: str, device: torch.device) -> list[str]:
    """What --medvram / --lowvram can and cannot do on *device*, said at start-up so neither flag is
    silently a no-op: on the CPU the weights already live in RAM, so there is nothing to offload to."""
    if offload == "none":
        return []
    if device.type == "cpu":
        if offload == "medvram":
            return ["--medvram has no effect on the CPU: models already live in RAM (it parks idle models "
                    "off an accelerator); leave it out"]
        return ["--lowvram saves no memory on the CPU (the weights already live in RAM) and makes Stable "
                "Diffusion slower: it still moves each layer's weights in for its part of the forward pass; "
                "leave it out"]
    if offload == "lowvram":
        return ["--lowvram: Stable Diffusion moves each layer to the device only for its part of the forward "
                "pass; language models are offloaded whole between uses, as with --medvram"]
    return []


def choose_devices(device: str = "auto", precision: str = "auto", xformers: bool = False,
                   medvram: bool = False, lowvram: bool = False, no_half: bool = False,
                   no_half_vae: bool = False) -> Devices:
    """Pick device and dtype the way users expect.

    auto: CUDA if present (bf16 when the card supports it, else fp16), then MPS (fp16), then CPU (fp32:
    fp16 matmul on CPUs is a scalar fallback, and bf16 loses quality users did not ask to lose; except that
    language models wide enough load in bf16 on CPUs with AVX-512 BF16 / AMX, see Devices.llm_dtype).
    """
    notes = []
    if device == "auto":
        if torch.cuda.is_available():
            device = "cuda"
        elif getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            device = "mps"
        else:
            device = "cpu"
    elif device == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("--device cuda was given but PyTorch sees no CUDA device "
                           f"(torch {torch.__version__}). Use --device cpu, or install a CUDA build of torch.")
    elif device == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise RuntimeError("--device mps was given but MPS is not available on this machine. Use --device cpu.")
    dev = torch.device(device)

    llm_auto_bf16 = False
    if precision == "auto":
        # language models on a CPU with fast bf16: bf16 where measured faster (Devices.llm_dtype)
        llm_auto_bf16 = dev.type == "cpu" and not no_half and cpu_supports_bf16()
        if dev.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        elif dev.type == "mps":
            dtype = torch.float16
        else:
            dtype = torch.float32
    else:
        dtype = _DTYPES[precision]
        if dev.type == "cpu" and dtype is torch.float16:
            notes.append("fp16 on CPU is very slow on most processors; "
                         + ("bf16 or fp32 is recommended" if cpu_supports_bf16() else "fp32 is recommended"))
        elif dev.type == "cpu" and dtype is torch.bfloat16 and not cpu_supports_bf16():
            # measured on an AVX2-only EPYC: a 512x512 bf16 matmul 0.7 GFLOP/s against 30 in fp32
            notes.append("bf16 on this CPU (no AVX-512 BF16 or AMX) has no hardware support and is many times "
                         "slower than fp32; --precision fp32 (or auto) is recommended")

    if no_half and dtype is not torch.float32:
        notes.append(f"--no-half: running in fp32 instead of {str(dtype).replace('torch.', '')}")
        dtype = torch.float32
    vae_dtype = torch.float32 if no_half_vae else dtype

    attention = "sdpa"
    if xformers:
        if xformers_available() and dev.type == "cuda":
            attention = "xformers"
        else:
            why = "not installed" if not xformers_available() else f"unusable on {dev.type} (it needs CUDA)"
            notes.append(f"--xformers: xformers requested but {why}: using PyTorch SDPA attention")
    offload = "lowvram" if lowvram else "medvram" if medvram else "none"
    notes.extend(offload_notes(offload, dev))
    for note in notes:
        log.warning(note)
    # torch's own default: one thread per physical core. Whether LLM decode also splits its matmuls over
    # that many threads is measured in modules/llm/cpu_threading.py (setting llm.cpu_row_parallel).
    return Devices(device=dev, dtype=dtype, attention=attention, offload=offload, notes=tuple(notes),
                   vae_dtype=vae_dtype, xformers_requested=bool(xformers), cpu_threads=torch.get_num_threads(),
                   llm_auto_bf16=llm_auto_bf16)

"""Model FLOPs per token, peak FLOP/s of the device, and model FLOPs utilisation (MFU).

FLOPs per trained token (forward + backward = 3 x forward)::

    6 * N + 12 * L * H * hd * T          (H * hd = d for Llama shapes)

* ``6 * N``: every weight is used in one multiply-add (2 FLOPs) per token forward and two backward.
  The **Atelier/torchtitan/nanochat convention** takes N *without the input embedding* (a lookup, not a
  matmul) but *with* the output head (a real matmul). With tied embeddings the one shared tensor is the
  output head and is counted (torchtitan drops it there, under-counting a real matmul; FlopCounterMode
  sides with us), so both conventions coincide for tied models. **TinyLlama's convention** (lit-gpt ``estimate_flops``) counts every parameter, so
  it is 6 x (vocab x d) higher per token; both are logged so figures compare with its paper.
* ``12 * L * H * hd * T``: attention scores ``q k^T`` and the weighted sum ``p v`` are each 2 * T * hd FLOPs
  per head per token forward (4 * T * H * hd), x3 with backward. The full T x T square is counted - causal
  masking halves the useful work but kernels that skip it are not assumed (PaLM App. B, nanoGPT,
  torchtitan all count it this way) - and activation-checkpoint recomputation is not counted (MFU is about
  *model* FLOPs). RMSNorm, RoPE, SiLU and softmax are ignored (< 1% here).

``FlopCounterMode`` agrees with the first convention to within the norms' share when attention runs on the
math SDPA backend (its fused CPU flash kernel has no FLOP formula); see tests/training/test_mfu.py.

Peak FLOP/s: dense (not sparse) tensor-core figures by device name for bf16; on a CPU a matmul peak
measured once at start-up in the training dtype (there is no trustworthy datasheet figure per core count).
"""
from __future__ import annotations

import time

import torch

from modules.llm.config import LlamaConfig

#: dense bf16 FLOP/s by a lower-case substring of the CUDA device name; checked in order (specific first).
#: Sources: ecosystem.md 4.2 (torchtitan, Lightning, nanochat) and NVIDIA datasheets (dense, fp32 accumulate).
GPU_BF16_PEAKS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 756e12),
    ("h100 nvl", 835e12),
    ("h100", 989e12),          # SXM
    ("h200 nvl", 836e12),
    ("h200", 989e12),
    ("gh200", 989e12),
    ("b200", 2.25e15),
    ("a100", 312e12),
    ("a10", 125e12),           # A10 datasheet dense bf16; AWS's A10G is listed with the same figure (unverified)
    ("l40s", 362e12),
    ("l4", 121e12),
    ("rtx 4090", 165e12),      # fp32 accumulate; 330 with fp16 accumulate
    ("rtx 3090", 71e12),       # fp32 accumulate (GeForce Ampere runs it at half the fp16-accumulate rate)
    ("v100", 125e12),          # fp16 (V100 has no bf16 tensor cores)
    ("t4", 65e12),             # fp16
)

#: dense fp32 (no TF32) FLOP/s for the same devices, for runs with precision fp32
GPU_FP32_PEAKS: tuple[tuple[str, float], ...] = (
    ("h100 pcie", 51e12), ("h100", 67e12), ("h200", 67e12), ("a100", 19.5e12), ("a10g", 31.2e12),
    ("a10", 31.2e12), ("l4", 30.3e12), ("rtx 4090", 82.6e12), ("rtx 3090", 35.6e12),
)


def non_embedding_parameters(config: LlamaConfig) -> int:
    """N for the Atelier/torchtitan convention: all parameters minus the input embedding (a tied embedding
    is the output head too, so it stays)."""
    if config.tie_word_embeddings:
        return config.num_parameters()
    return config.num_parameters() - config.vocab_size * config.hidden_size


def attention_flops_per_token(config: LlamaConfig, seq_len: int) -> int:
    return 12 * config.num_hidden_layers * config.num_attention_heads * config.head_dim * seq_len


def flops_per_token(config: LlamaConfig, seq_len: int, convention: str = "atelier") -> int:
    """Training FLOPs per token; ``convention`` "atelier" (N without the input embedding) or "tinyllama"."""
    if convention == "atelier":
        n = non_embedding_parameters(config)
    elif convention == "tinyllama":
        n = config.num_parameters()
    else:
        raise ValueError(f"unknown FLOPs convention {convention!r}: use 'atelier' or 'tinyllama'")
    return 6 * n + attention_flops_per_token(config, seq_len)


def gpu_peak_flops(device_name: str, dtype: torch.dtype) -> float | None:
    """The dense peak for a CUDA device name, or None when the device is not in the table."""
    name = device_name.lower()
    table = GPU_FP32_PEAKS if dtype == torch.float32 else GPU_BF16_PEAKS
    for key, peak in table:
        if key in name:
            return peak
    return None


def measure_matmul_peak(dtype: torch.dtype, device: str | torch.device = "cpu", size: int = 2048,
                        repeats: int = 5) -> float:
    """Best-of-``repeats`` FLOP/s of a ``size`` x ``size`` matmul in ``dtype`` (the CPU MFU denominator).

    2048: on the 2-core dev CPU (AVX-512 BF16 + AMX) a 1024 matmul reads 1.45 TFLOP/s in bf16 against 2.29 at 2048
    and 2.32 at 3072 (fp32: 379, 385, 372 GFLOP/s), so a smaller size would overstate MFU by about 1.6x; 2048 takes
    0.4 s for both dtypes."""
    device = torch.device(device)
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    a @ b                                                              # warm-up (thread pool, kernel choice)
    best = float("inf")
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        a @ b
        if device.type == "cuda":
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - start)
    return 2 * size ** 3 / best


def peak_flops(device: torch.device, dtype: torch.dtype) -> tuple[float | None, str]:
    """(peak FLOP/s, where it came from) for MFU: the table on CUDA, a measured matmul on CPU."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        peak = gpu_peak_flops(name, dtype)
        return peak, (f"table ({name})" if peak else f"unknown GPU {name!r}: MFU not reported")
    return measure_matmul_peak(dtype, device), f"measured {str(dtype).replace('torch.', '')} matmul"


def mfu(tokens_per_second: float, flops_token: float, peak: float | None, world_size: int = 1) -> float | None:
    """Achieved model FLOP/s over the peak of all processes (None without a peak)."""
    if not peak:
        return None
    return tokens_per_second * flops_token / (peak * world_size)

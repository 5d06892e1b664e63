"""FLOPs per token against torch's FlopCounterMode, and the peak table."""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from modules.llm.config import LlamaConfig
from modules.llm.model import Llama
from modules.training.llm import mfu


@pytest.mark.parametrize("tied", [False, True])
def test_flops_per_token_matches_flop_counter(tied):
    config = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=176, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         tie_word_embeddings=tied)
    torch.manual_seed(0)
    model = Llama(config)
    B, T = 2, 128
    ids = torch.randint(0, 256, (B, T + 1))
    # The math SDPA backend is made of counted matmuls (the fused CPU kernel has no FLOP formula).
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        logits = model(ids[:, :-1])
        F.cross_entropy(logits.reshape(-1, 256), ids[:, 1:].reshape(-1)).backward()
    counted = counter.get_total_flops() / (B * T)
    ours = mfu.flops_per_token(config, T)
    assert abs(ours - counted) / counted < 0.03                   # norms and softmax are the difference
    tinyllama = mfu.flops_per_token(config, T, "tinyllama")
    # TinyLlama's convention adds the input embedding (a lookup, no FLOPs); tied, it is the head: equal
    assert tinyllama - ours == (0 if tied else 6 * config.vocab_size * config.hidden_size)
    assert abs(tinyllama - counted) / counted < (0.03 if tied else 0.25)


def test_tinyllama_figures_and_peaks():
    config = LlamaConfig.from_name("tinyllama-1.1b")
    # 1,100.0M - 65.5M input embedding = 1,034.5M (ecosystem.md 4.1); TinyLlama's own: 7.71 GFLOP at T=2048
    assert mfu.non_embedding_parameters(config) == 1_100_048_384 - 32000 * 2048
    assert mfu.flops_per_token(config, 2048, "tinyllama") == pytest.approx(7.71e9, rel=2e-3)
    assert mfu.gpu_peak_flops("NVIDIA A100-SXM4-40GB", torch.bfloat16) == 312e12
    assert mfu.gpu_peak_flops("NVIDIA H100 PCIe", torch.bfloat16) == 756e12
    assert mfu.gpu_peak_flops("NVIDIA H100 80GB HBM3", torch.bfloat16) == 989e12
    assert mfu.gpu_peak_flops("NVIDIA H200", torch.bfloat16) == 989e12
    assert mfu.gpu_peak_flops("NVIDIA L4", torch.bfloat16) == 121e12
    assert mfu.gpu_peak_flops("Some Future GPU", torch.bfloat16) is None
    assert mfu.mfu(1000.0, 1e9, None) is None
    assert mfu.mfu(24_000, 7.71e9, 312e12) == pytest.approx(0.593, abs=1e-3)   # llm.md 1: 59% by this formula


def test_cpu_peak_is_measured_in_the_training_dtype():
    fp32, where = mfu.peak_flops(torch.device("cpu"), torch.float32)
    assert fp32 > 1e9 and "measured float32" in where
    assert mfu.measure_matmul_peak(torch.bfloat16, size=256, repeats=2) > 1e8

import pytest
import torch

from modules.devices import choose_devices


def test_cpu_defaults_to_fp32_and_sdpa():
    d = choose_devices("auto", "auto")
    if not torch.cuda.is_available():
        assert d.device.type in ("cpu", "mps")
    if d.device.type == "cpu":
        assert d.dtype is torch.float32
    assert d.attention == "sdpa" and d.total_memory() > d.free_memory() > 0


def test_explicit_precision_and_offload():
    d = choose_devices("cpu", "bf16", medvram=True)
    assert d.dtype is torch.bfloat16 and d.offload == "medvram"
    assert choose_devices("cpu", "auto", lowvram=True).offload == "lowvram"
    assert any("fp16 on CPU" in n for n in choose_devices("cpu", "fp16").notes)


def test_xformers_requested_but_unavailable_says_so():
    d = choose_devices("cpu", "auto", xformers=True)
    assert d.attention == "sdpa"
    assert any("--xformers" in n and "SDPA" in n for n in d.notes)


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")
def test_cuda_requested_without_cuda_is_clear_error():
    with pytest.raises(RuntimeError, match="--device cpu"):
        choose_devices("cuda", "auto")


def test_xformers_absent_is_said_at_start_up_and_in_diagnostics(make_ctx, caplog):
    """--xformers without xformers: a start-up warning, and diagnostics name SDPA as the real backend."""
    from modules import diagnostics
    with caplog.at_level("WARNING", logger="modules.devices"):
        ctx = make_ctx("--device", "cpu", "--xformers")
    assert "xformers requested but not installed: using PyTorch SDPA" in caplog.text
    report = diagnostics.collect(ctx)
    assert report["attention backend"] == "xformers requested but not installed: using PyTorch SDPA"
    assert ctx.devices.attention == "sdpa"
    assert diagnostics.collect(make_ctx("--device", "cpu"))["attention backend"] == "PyTorch SDPA"


def test_no_half_and_no_half_vae_set_the_dtypes():
    assert choose_devices("cpu", "bf16").vae_dtype is torch.bfloat16
    d = choose_devices("cpu", "bf16", no_half_vae=True)
    assert (d.dtype, d.vae_dtype) == (torch.bfloat16, torch.float32)
    d = choose_devices("cpu", "fp16", no_half=True)
    assert (d.dtype, d.vae_dtype) == (torch.float32, torch.float32)

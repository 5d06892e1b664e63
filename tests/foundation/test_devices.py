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


def test_bf16_on_a_cpu_without_hardware_bf16_is_said_to_be_slow(monkeypatch):
    import modules.devices as devices
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: False)
    d = choose_devices("cpu", "bf16")
    assert d.dtype is torch.bfloat16                       # what was asked, with a note that says what to use
    assert any("no AVX-512 BF16" in n and "--precision fp32" in n for n in d.notes)
    assert any("fp32 is recommended" in n and "bf16 or" not in n for n in choose_devices("cpu", "fp16").notes)
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: True)
    assert not any("AVX-512" in n for n in choose_devices("cpu", "bf16").notes)
    assert any("bf16 or fp32 is recommended" in n for n in choose_devices("cpu", "fp16").notes)


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


def test_auto_precision_loads_wide_language_models_in_bf16_on_a_bf16_cpu(monkeypatch):
    """The static rule of Devices.llm_dtype (measured in benchmarks/llm_precision.py): on a CPU with AVX-512 BF16,
    --precision auto loads LLMs at least LLM_BF16_MIN_HIDDEN wide in bf16 and narrower ones (the demo models)
    in fp32; an explicit precision, --no-half, or a CPU without bf16 keeps every model in the chosen dtype."""
    from types import SimpleNamespace

    import modules.devices as devices
    wide, narrow = SimpleNamespace(hidden_size=2048), SimpleNamespace(hidden_size=288)
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: True)
    auto = choose_devices("cpu", "auto")
    assert auto.dtype == torch.float32          # Stable Diffusion and the rest stay fp32
    assert auto.llm_dtype(wide) == torch.bfloat16 and auto.llm_dtype(narrow) == torch.float32
    assert "bf16 for models at least 512 wide" in auto.describe()["llm dtype"]
    for explicit in (choose_devices("cpu", "fp32"), choose_devices("cpu", "auto", no_half=True)):
        assert explicit.llm_dtype(wide) == torch.float32
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: False)
    assert choose_devices("cpu", "auto").llm_dtype(wide) == torch.float32


def test_the_llm_service_loads_by_the_auto_rule(monkeypatch, make_ctx, tmp_path):
    """--precision auto on a bf16 CPU: the service loads a 512-wide model in bf16 and a narrow one in fp32."""
    import modules.devices as devices
    from modules.fixtures.llm import FIXTURE_MODELS, write_model
    root = tmp_path / "data" / "models" / "LLM"
    narrow = dict(FIXTURE_MODELS["tiny-llama-gqa"])
    write_model(root / "narrow", narrow)
    write_model(root / "wide", dict(narrow, hidden_size=512, intermediate_size=512, num_hidden_layers=1,
                                    num_attention_heads=8, num_key_value_heads=2))
    monkeypatch.setattr(devices, "cpu_supports_bf16", lambda: True)
    ctx = make_ctx("--device", "cpu", data_dir=tmp_path / "data")
    for name, dtype in (("wide", torch.bfloat16), ("narrow", torch.float32)):
        with ctx.llm.acquire(name) as llm:
            assert {p.dtype for p in llm.model.parameters()} == {dtype}, name

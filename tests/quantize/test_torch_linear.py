"""int8 / int4 weight-only layers: kernel output against the dequantized weight, error bounds, packing, shapes."""
import itertools

import pytest
import torch
from torch import nn

from modules.quantize.torch_linear import (Int4Linear, Int8Linear, cpu_int4_pack, cpu_int4_unpack, dequantize_int4,
                                           dequantize_int8, int8_matmul_generic, pack_nibbles, quantize_int4,
                                           quantize_int8, unpack_nibbles)


def linear(n_out, n_in, seed=0, bias=False):
    torch.manual_seed(seed)
    layer = nn.Linear(n_in, n_out, bias=bias)
    with torch.no_grad():                       # rows of different magnitude: per-channel scales must differ
        layer.weight.mul_(torch.logspace(-1, 1, n_out)[:, None])
    return layer


def test_int8_scales_are_per_channel_and_the_error_is_at_most_half_a_step():
    layer = linear(48, 96)
    q, scales = quantize_int8(layer.weight, torch.bfloat16)
    assert q.dtype == torch.int8 and scales.shape == (48,) and scales.dtype == torch.bfloat16
    w = layer.weight.detach()
    assert torch.all(scales.float() >= w.abs().amax(1) / 127)             # rounded up: nothing clips
    assert torch.all(scales.float() <= w.abs().amax(1) / 127 * (1 + 2 ** -7))
    error = (dequantize_int8(q, scales) - w).abs()
    assert torch.all(error <= scales.float()[:, None] / 2 * (1 + 1e-6))
    assert scales.float().max() / scales.float().min() > 50                 # one scale per row, not per tensor


@pytest.mark.parametrize("group", [32, 64, 128])
def test_int4_scales_are_per_group_and_the_error_is_at_most_half_a_step(group):
    layer = linear(64, 256, seed=group)
    q, scales, zeros = quantize_int4(layer.weight, group, torch.bfloat16)
    assert q.shape == (64, 256) and int(q.max()) <= 15 and q.dtype == torch.uint8
    assert scales.shape == zeros.shape == (64, 256 // group)
    step = scales.float().repeat_interleave(group, dim=1)
    error = (dequantize_int4(q, scales, zeros, group) - layer.weight.detach()).abs()
    assert torch.all(error <= step / 2 * (1 + 1e-5) + 1e-7)
    groups = layer.weight.detach().reshape(64, -1, group)
    span = groups.amax(-1) - groups.amin(-1)
    assert torch.allclose(scales.float(), span / 15, rtol=0.02)            # min/max of each group


def test_constant_and_zero_groups_quantize_exactly():
    w = torch.zeros(16, 64)
    w[1] = 0.25                                                             # a constant, non-zero row
    q, scales, zeros = quantize_int4(w, 32, torch.bfloat16)
    assert torch.equal(dequantize_int4(q, scales, zeros, 32), w)
    q8, s8 = quantize_int8(w)
    assert torch.equal(dequantize_int8(q8, s8)[0], w[0]) and torch.equal(s8[0], torch.tensor(1.0, dtype=s8.dtype))
    assert (dequantize_int8(q8, s8)[1] - 0.25).abs().max() <= s8[1].float() / 2


@pytest.mark.parametrize("kind", ["int8", "int4-g32", "int4-g64", "int4-g128"])
def test_kernel_output_equals_the_dequantized_weight_product(kind):
    """fp32 kernels: exact to fp32 rounding; bf16 kernels: the same product of bf16-rounded activations.
    10 rows take the decode kernels, 40 rows (prefill) int8's converted-weight product."""
    layer = linear(96, 256, bias=True)
    for x, kernel_dtype in itertools.product((torch.randn(2, 5, 256), torch.randn(40, 256)),
                                             (torch.float32, torch.bfloat16)):
        tol = 1e-5 if kernel_dtype == torch.float32 else 1e-2
        if kind == "int8":
            q = Int8Linear.from_float(layer, kernel_dtype)
        else:
            q = Int4Linear.from_float(layer, int(kind.split("g")[1]), kernel_dtype)
        w = q.dequantized_weight()
        assert w.shape == (96, 256)
        ref = x.to(kernel_dtype).float() @ w.T + layer.bias.detach()
        y = q(x)
        assert y.shape == (*x.shape[:-1], 96) and y.dtype == torch.float32
        assert (y - ref).abs().max() <= tol * ref.abs().max()
        yb = q(x.bfloat16())                                                # bf16 inputs work too, stay bf16
        assert yb.dtype == torch.bfloat16 and (yb.float() - ref).abs().max() <= 2e-2 * ref.abs().max()


def test_int4_pads_widths_the_kernel_cannot_take():
    """The demo chat model's width 288 with groups of 128; 40 output rows (the kernel wants multiples of 16)."""
    layer = linear(40, 288)
    q = Int4Linear.from_float(layer, 128, torch.float32)
    assert (q.padded_out, q.padded_in) == (48, 384)
    x = torch.randn(3, 288)
    ref = x @ q.dequantized_weight().T
    assert q(x).shape == (3, 40) and torch.allclose(q(x), ref, atol=1e-5, rtol=1e-5)
    error = (q.dequantized_weight() - layer.weight.detach()).abs()
    _, scales, _ = q.values()
    assert torch.all(error <= scales[:40].float().repeat_interleave(128, 1)[:, :288] / 2 * (1 + 1e-5) + 1e-7)


@pytest.mark.parametrize("rows", [16, 32, 48, 64, 80, 112, 128, 208])
def test_cpu_int4_unpack_inverts_torchs_packing(rows):
    q = torch.randint(0, 16, (rows, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows))
    assert torch.equal(cpu_int4_unpack(cpu_int4_pack(q), rows, 96), q)
    assert torch.equal(unpack_nibbles(pack_nibbles(q)), q)
    assert pack_nibbles(q).shape == (rows, 48)


@pytest.mark.parametrize("rows", [16, 48, 80, 208])
def test_the_probing_inverse_undoes_any_layout_torch_packs_with(rows):
    """The fallback for a layout outside the block family: exact on this torch's own packing, whichever
    instruction set it packs for (AVX-512: 64-row blocks, AVX2: 32-row blocks)."""
    from modules.quantize.torch_linear import _cpu_int4_block, _cpu_int4_unpack_by_probing
    q = torch.randint(0, 16, (rows, 96), dtype=torch.uint8, generator=torch.Generator().manual_seed(rows))
    assert torch.equal(_cpu_int4_unpack_by_probing(cpu_int4_pack(q), rows, 96), q)
    assert _cpu_int4_block() in (64, 32)
    assert _cpu_int4_block(candidates=(16,)) is None           # a block size torch does not pack with is refused


def test_storage_round_trip_is_exact_and_checked():
    layer = linear(64, 128, bias=True)
    for q in (Int8Linear.from_float(layer), Int4Linear.from_float(layer, 64)):
        stored = {k: v.clone() for k, v in q.storage().items()}
        if isinstance(q, Int8Linear):
            back = Int8Linear.from_storage(stored, 128, 64)
        else:
            back = Int4Linear.from_storage(stored, 128, 64, 64)
        x = torch.randn(4, 128)
        assert torch.equal(back(x), q(x))
        state = q.state_dict()
        assert set(state) >= {"weight", "weight_scale", "bias"}
        fresh = type(q).from_float(linear(64, 128, seed=5, bias=True), *([] if isinstance(q, Int8Linear) else [64]))
        fresh.load_state_dict(state)
        assert torch.equal(fresh(x), q(x))
    with pytest.raises(ValueError, match="weight has shape \\[64, 100\\], expected \\[64, 128\\]"):
        Int8Linear.from_storage({"weight": torch.zeros(64, 100, dtype=torch.int8), "weight_scale": torch.ones(64)},
                                128, 64)
    with pytest.raises(ValueError, match="weight_zero is missing"):
        Int4Linear.from_storage({"weight": torch.zeros(64, 64, dtype=torch.uint8),
                                 "weight_scale": torch.ones(64, 2)}, 128, 64, 64)


def test_int8_off_the_cpu_path_matches_the_kernel():
    """Other devices multiply by the int8 weight converted per call, then scale per channel."""
    q = Int8Linear.from_float(linear(64, 128), torch.float32)
    x = torch.randn(3, 128)
    generic = int8_matmul_generic(x, q.qweight, q.scales)
    assert torch.allclose(generic, q(x), atol=1e-5, rtol=1e-5)


def test_int4_refuses_other_devices_and_bad_groups():
    layer = linear(64, 128)
    stored = Int4Linear.from_float(layer, 32).storage()
    with pytest.raises(ValueError, match="int4 weights run on the CPU only, not on cuda"):
        Int4Linear.from_storage(stored, 128, 64, 32, device="cuda")
    with pytest.raises(ValueError, match="even number"):
        quantize_int4(layer.weight, 33)

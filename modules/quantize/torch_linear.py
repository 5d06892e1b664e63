"""Weight-only int8 and int4 linear layers on PyTorch's own kernels: what :mod:`.torch_weights` puts in a Llama.

**Why torch's kernels and not torchao.** Checked on torch 2.13.0+cpu with torchao 0.18.0 (installed with
``--no-deps`` so it could not pull another torch; the newest release, 2026-12-02):

* ``Int8WeightOnlyConfig`` works on the CPU, but its ``Int8Tensor`` weight was *slower* than the aten kernel
  underneath (5632x2048 GEMV: 29.8 ms against 16.2 ms for ``_weight_int8pack_mm`` with fp32 activations,
  in the same process), and safetensors cannot write it ("Attempted to access the data pointer on an
  invalid python storage"): a tensor subclass would need its own file format.
* ``Int4WeightOnlyConfig`` has no CPU path left: ``plain`` needs the ``mslk`` GPU package, ``plain_int32``
  raises "does not support device 'cpu'", ``tile_packed_to_4d`` is the CUDA tinygemm layout (bf16 only);
  the CPU layout of older releases is gone.

So the layers call ``torch.ops.aten._weight_int8pack_mm`` (int8, one scale per output channel) and
``_convert_weight_to_int4pack_for_cpu`` + ``_weight_int4pack_mm_for_cpu`` (int4, a scale and a zero per group
of 32/64/128 input columns; the kernel computes ``w = (q - 8) * scale + zero`` with q in 0..15) directly.

**Why the kernels run in bf16** (``kernel_dtype``). Both kernels take a slow path for fp32 activations.
The 7 linears of one TinyLlama-1.1B layer at batch 1, 2 threads, this CPU (AVX-512 with AMX, 2026-12-02):

    milliseconds per layer        fp32 activations    bf16 activations
    F.linear (fp32 / bf16 weights)      6.4-6.7            4.5-4.7
    int8 _weight_int8pack_mm             17.6               3.1-3.8
    int4 _weight_int4pack_mm, g32        39.5               1.8
    int4 _weight_int4pack_mm, g128       39-82              2.0

The scales (and zeros) must have the activations' dtype, so they are kept in ``kernel_dtype`` and inputs of
another dtype are cast at the layer's boundary (the output is cast back): an fp32 model keeps fp32 norms,
residuals, attention and logits, and only the matrix products see bf16 activations.

**Prefill.** Both kernels are built for decode: their time grows with every input row, so at 512 rows they
are slower than fp32 ``F.linear`` (300 against 157 ms per layer). int8 inputs of 16 rows or more therefore
multiply by the weight converted to bf16 (``F.linear(x, q) * scale``, exact for per-channel scales: 49 ms at
512 rows). int4 has no such path (see the note under :data:`INT8_DEQUANT_ROWS`), so its prefill stays slower
than fp32's: ``benchmarks/quantize_torch.py`` measured 256-token prefills of the 1.1B shape at 128 tok/s
(fp32), 520 (bf16), 205 (int8) and 72-76 (int4).

**Devices.** int8 also runs off the CPU (CUDA, MPS) with that converted-weight product (the weight is
converted per call, so it saves memory, not time). int4 runs on the CPU only: torch's CUDA int4 kernel needs
another packing (``_convert_weight_to_int4pack``, bf16 only), which this module does not implement, as there
was no GPU to test it on.

**Storage** (``state_dict()`` and safetensors files) is device independent: int8 ``weight`` (N, K) int8
with ``weight_scale`` (N,); int4 ``weight`` (N, K/2) uint8 holding two values per byte (column 2i in the
low nibble, 2i+1 in the high one) with ``weight_scale`` and ``weight_zero`` (N, K/G). The CPU kernel's
packing is made at load time and undone when saving (:func:`cpu_int4_unpack`).

**Shapes.** The int4 kernels need the input width to be a multiple of the group size and the output width a
multiple of 16. Other shapes are padded and stored padded: the layer pads its input with zero columns per
call, so the padding weights multiply zeros, and cuts the extra output rows off (the demo chat model's width
288 with groups of 64 or 128).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

#: torch's CPU int4 kernel needs the output width to be a multiple of this
INT4_ROW_MULTIPLE = 16
#: the kernels' activation dtype on the CPU (see the module docstring)
DEFAULT_KERNEL_DTYPE = torch.bfloat16
#: inputs of at least this many rows (prefill) multiply by the weight converted to the kernel dtype instead of
#: calling the int8 kernel, which is built for decode: 7 linears of a TinyLlama layer in bf16, 2 threads,
#: rows 8 / 16 / 64 / 512: kernel 7.3 / 12.8 / 43 / 300 ms, converted weight 11.8 / 12.2 / 16 / 49 ms
INT8_DEQUANT_ROWS = 16
#: int4 has no such path: converting its weight (unpacking the nibbles, a scale and an offset per group) took
#: ~80 ms per 5632x2048 matrix, about as long as the kernel's own product with 512 rows, so nothing is gained


def _round_up_to(values: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``values`` in ``dtype``, never below the fp32 value: a rounded-down scale would clip the largest weights."""
    rounded = values.to(dtype)
    below = rounded.float() < values
    return torch.where(below, torch.nextafter(rounded, torch.full_like(rounded, float("inf"))), rounded)


def _multiple(n: int, m: int) -> int:
    return -(-n // m) * m


# -------------------------------------------------------------------------------------- quantization
def quantize_int8(weight: torch.Tensor, scale_dtype: torch.dtype = DEFAULT_KERNEL_DTYPE
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel int8: (q (N, K) int8 in [-127, 127], scales (N,) in ``scale_dtype``).

    scale = max |w| of the row / 127, rounded up to ``scale_dtype``, so |q * scale - w| <= scale / 2 for every
    weight. A row of zeros gets scale 1.
    """
    w = weight.detach().float()
    amax = w.abs().amax(dim=1)
    scales = _round_up_to(torch.where(amax > 0, amax / 127, torch.ones_like(amax)), scale_dtype)
    q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q, scales


def dequantize_int8(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 weight that an int8 layer multiplies by: q * scale, row by row."""
    return q.float() * scales.float()[:, None]


def int4_padded_shape(out_features: int, in_features: int, group_size: int) -> tuple[int, int]:
    """(rows, columns) of an int4 weight once padded for the CPU kernel."""
    return _multiple(out_features, INT4_ROW_MULTIPLE), _multiple(in_features, group_size)


def quantize_int4(weight: torch.Tensor, group_size: int, scale_dtype: torch.dtype = DEFAULT_KERNEL_DTYPE
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Asymmetric group-wise int4 (min/max per group of ``group_size`` input columns, as gpt-fast and torchao).

    Returns (q (Np, Kp) uint8 in 0..15, scales (Np, Kp/G), zeros (Np, Kp/G)), both in ``scale_dtype``, with
    the weight padded to :func:`int4_padded_shape`; the weight is ``(q - 8) * scale + zero`` (the kernel's
    convention). The zero is rounded to ``scale_dtype`` first and the scale is then chosen to cover the group
    from that rounded zero, so |dequantized - w| <= scale / 2 for every weight. Padding columns repeat the
    row's last real column (they never widen a group's range; the layer multiplies them by zeros), padding
    rows are zeros.
    """
    if group_size < 2 or group_size % 2:
        raise ValueError(f"int4 group size must be an even number >= 2, got {group_size!r}")
    w = weight.detach().float()
    rows, cols = w.shape
    rows_p, cols_p = int4_padded_shape(rows, cols, group_size)
    if cols_p > cols:
        w = torch.cat([w, w[:, -1:].expand(rows, cols_p - cols)], dim=1)
    if rows_p > rows:
        w = torch.cat([w, w.new_zeros(rows_p - rows, cols_p)], dim=0)
    groups = w.reshape(rows_p, cols_p // group_size, group_size)
    lo, hi = groups.amin(dim=-1), groups.amax(dim=-1)
    span = hi - lo
    fallback = torch.where(lo != 0, lo.abs() / 8, torch.ones_like(lo))            # constant groups
    first = torch.where(span > 0, span / 15, fallback)
    zeros = (lo + 8 * first).to(scale_dtype)
    z = zeros.float()
    needed = torch.maximum((hi - z) / 7, (z - lo) / 8)
    needed = torch.where(needed > 0, needed, first)
    scales = _round_up_to(needed, scale_dtype)
    q = torch.round((groups - z[..., None]) / scales.float()[..., None] + 8).clamp_(0, 15).to(torch.uint8)
    return q.reshape(rows_p, cols_p), scales, zeros


def dequantize_int4(q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int) -> torch.Tensor:
    """The fp32 (padded) weight an int4 layer multiplies by: (q - 8) * scale + zero, group by group."""
    rows, cols = q.shape
    groups = q.float().reshape(rows, cols // group_size, group_size)
    return ((groups - 8) * scales.float()[..., None] + zeros.float()[..., None]).reshape(rows, cols)


# ------------------------------------------------------------------------------------------ packing
def pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> (N, K/2) uint8, column 2i in the low nibble: the stored int4 form."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def unpack_nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_nibbles`: (N, K/2) uint8 -> (N, K) uint8 values 0..15."""
    return torch.stack([packed & 0xF, packed >> 4], dim=-1).reshape(packed.shape[0], -1)


def cpu_int4_pack(q: torch.Tensor) -> torch.Tensor:
    """(N, K) values 0..15 -> the layout ``_weight_int4pack_mm_for_cpu`` reads (torch's own packing op)."""
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).contiguous(), 8)


def cpu_int4_unpack(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """Inverse of :func:`cpu_int4_pack`, to save a CPU layer: (N, K/2) packed -> (N, K) uint8 values.

    torch's CPU layout depends on the instruction set its kernels were dispatched to: with AVX-512 it packs
    blocks of 64 rows as [K][32] bytes, byte j holding row j (low nibble) and row j + 32 (high nibble);
    with AVX2 (seen on an AMD EPYC, 2026-12-04) blocks of 32 rows, rows j and j + 16; a last, partial block
    of r rows is [K][r/2] bytes holding adjacent rows. Which block size this process packs with is found by
    packing a small random probe (:func:`_cpu_int4_block`); a layout outside that family is inverted by
    probing the whole matrix (:func:`_cpu_int4_unpack_by_probing`, slower), so saving is right either way.
    """
    block = _cpu_int4_block()
    if block is None:
        return _cpu_int4_unpack_by_probing(packed, rows, cols)
    return _cpu_int4_unpack_blocks(packed, rows, cols, block)


def _cpu_int4_unpack_blocks(packed: torch.Tensor, rows: int, cols: int, block: int) -> torch.Tensor:
    """The inverse for the block layout of :func:`cpu_int4_unpack` with *block* rows per full block."""
    flat = packed.reshape(-1)
    out = torch.empty(rows, cols, dtype=torch.uint8, device=packed.device)
    full = rows // block * block
    if full:
        blocks = flat[: full * cols // 2].view(full // block, cols, block // 2)
        per_row = torch.cat([blocks & 0xF, blocks >> 4], dim=2)                    # (blocks, K, block)
        out[:full] = per_row.permute(0, 2, 1).reshape(full, cols)
    rest = rows - full
    if rest:
        tail = flat[full * cols // 2:].view(cols, rest // 2)
        per_row = torch.stack([tail & 0xF, tail >> 4], dim=2).reshape(cols, rest)   # (K, r)
        out[full:] = per_row.T
    return out


def _cpu_int4_block(candidates: tuple[int, ...] = (64, 32, 16)) -> int | None:
    """The rows per block torch's CPU int4 packing uses in this process (None: not the block layout).

    A 176 x 8 probe (two 64-row blocks and a 48-row tail) of random values is packed and unpacked with
    each candidate; the one that gives the values back is it (a wrong one cannot, but by a 16^-1000 chance).
    """
    probe = torch.randint(0, 16, (176, 8), generator=torch.Generator().manual_seed(0), dtype=torch.int32)
    packed = cpu_int4_pack(probe)
    for block in candidates:
        if torch.equal(_cpu_int4_unpack_blocks(packed, 176, 8, block), probe.to(torch.uint8)):
            return block
    return None


def _cpu_int4_unpack_by_probing(packed: torch.Tensor, rows: int, cols: int) -> torch.Tensor:
    """The inverse of any packing that rearranges the values: the packing op is run on the values' own flat
    positions, four bits at a time, which says for every packed nibble which value it holds."""
    def nibbles_of(data: torch.Tensor) -> torch.Tensor:             # packed bytes -> nibbles, low one first
        flat = data.reshape(-1)
        return torch.stack([flat & 0xF, flat >> 4], dim=-1).reshape(-1)

    values = nibbles_of(packed.cpu())
    if values.numel() != rows * cols or rows * cols >= 2 ** 31:
        raise ValueError(f"an int4 packing of {packed.numel()} bytes cannot hold a {rows}x{cols} weight")
    position = torch.arange(rows * cols, dtype=torch.int32).view(rows, cols)
    source = torch.zeros(rows * cols, dtype=torch.int32)           # packed nibble i holds value source[i]
    shift = 0
    while shift == 0 or (1 << shift) < rows * cols:
        source |= nibbles_of(cpu_int4_pack((position >> shift) & 0xF)).to(torch.int32) << shift
        shift += 4
    index = source.long()
    if not bool(torch.zeros(rows * cols, dtype=torch.bool).index_fill_(0, index, True).all()):
        raise RuntimeError(f"torch {torch.__version__}'s CPU int4 packing is not a rearrangement of the values; "
                           "saving int4 layers needs a torch whose packing is (2.13 is)")
    out = torch.empty(rows * cols, dtype=torch.uint8)
    out[index] = values
    return out.view(rows, cols).to(packed.device)


# -------------------------------------------------------------------------------------------- layers
def int8_matmul_generic(x: torch.Tensor, q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x (M, K) @ (q * scale).T on any device: the per-channel scale is applied after the product."""
    return F.linear(x, q.to(scales.dtype)) * scales


def _check_storage(kind: str, tensors: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]],
                   dtypes: dict[str, torch.dtype]) -> None:
    problems = []
    for name, shape in expected.items():
        tensor = tensors.get(name)
        if tensor is None:
            problems.append(f"{name} is missing")
        elif tuple(tensor.shape) != shape:
            problems.append(f"{name} has shape {list(tensor.shape)}, expected {list(shape)}")
        elif name in dtypes and tensor.dtype != dtypes[name]:
            problems.append(f"{name} is {tensor.dtype}, expected {dtypes[name]}")
    if problems:
        raise ValueError(f"{kind} weights do not fit the layer: " + "; ".join(problems)
                         + " (the file was written for another model or scheme; quantize the model again)")


class Int8Linear(nn.Module):
    """``y = x @ (q * scale).T + bias`` with int8 weights and one scale per output channel.

    Called like the ``nn.Linear`` it replaces, on inputs of any float dtype (cast to the scales' dtype for
    the product and back). Buffers: ``qweight`` (N, K) int8, ``scales`` (N,), ``bias`` (N,) or None.
    """

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, bias: torch.Tensor | None = None):
        super().__init__()
        self.out_features, self.in_features = qweight.shape
        self.register_buffer("qweight", qweight.contiguous(), persistent=False)
        self.register_buffer("scales", scales.contiguous(), persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    @classmethod
    def from_float(cls, linear: nn.Linear, kernel_dtype: torch.dtype = DEFAULT_KERNEL_DTYPE) -> "Int8Linear":
        q, scales = quantize_int8(linear.weight, kernel_dtype)
        device = linear.weight.device
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls(q.to(device), scales.to(device), bias)

    @classmethod
    def from_storage(cls, tensors: dict[str, torch.Tensor], in_features: int, out_features: int,
                     device: torch.device | str = "cpu", bias_dtype: torch.dtype | None = None) -> "Int8Linear":
        """From the stored tensors (``weight``, ``weight_scale``, optional ``bias``) as they are, no requantizing."""
        expected = {"weight": (out_features, in_features), "weight_scale": (out_features,)}
        if "bias" in tensors:
            expected["bias"] = (out_features,)
        _check_storage("int8", tensors, expected, {"weight": torch.int8})
        bias = tensors.get("bias")
        if bias is not None:
            bias = bias.to(device=device, dtype=bias_dtype or bias.dtype)
        return cls(tensors["weight"].to(device), tensors["weight_scale"].to(device), bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.scales.dtype)
        if self.qweight.device.type == "cpu" and x2.shape[0] < INT8_DEQUANT_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x2.contiguous(), self.qweight, self.scales)
        else:
            y = int8_matmul_generic(x2, self.qweight, self.scales)
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def dequantized_weight(self) -> torch.Tensor:
        return dequantize_int8(self.qweight, self.scales)

    def storage(self) -> dict[str, torch.Tensor]:
        out = {"weight": self.qweight, "weight_scale": self.scales}
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # torch.ao's quantized modules do the same: the state dict holds the portable form, not the kernel's
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, tensor in self.storage().items():
            destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        loaded = _take_storage(self, state_dict, prefix, ("weight", "weight_scale", "bias"), ("bias",),
                               missing_keys, unexpected_keys, strict)
        if loaded is None:
            return
        try:
            new = Int8Linear.from_storage(loaded, self.in_features, self.out_features, self.qweight.device)
        except ValueError as exc:
            error_msgs.append(f"{prefix}: {exc}")
            return
        self.qweight, self.scales, self.bias = new.qweight, new.scales, new.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int8 per channel, kernel {str(self.scales.dtype).replace('torch.', '')}")


class Int4Linear(nn.Module):
    """``y = x @ W.T + bias`` with int4 weights, a scale and a zero per group of input columns (CPU only).

    Buffers: ``packed`` (the CPU kernel's layout of the padded (Np, Kp) weight), ``scale_zeros`` (Kp/G, Np, 2)
    in the kernel dtype (what ``_weight_int4pack_mm_for_cpu`` reads), ``bias`` (N,) or None.
    """

    def __init__(self, packed: torch.Tensor, scale_zeros: torch.Tensor, group_size: int, in_features: int,
                 out_features: int, bias: torch.Tensor | None = None):
        super().__init__()
        self.in_features, self.out_features, self.group_size = in_features, out_features, group_size
        self.padded_out, self.padded_in = int4_padded_shape(out_features, in_features, group_size)
        self.register_buffer("packed", packed, persistent=False)
        self.register_buffer("scale_zeros", scale_zeros.contiguous(), persistent=False)
        self.register_buffer("bias", bias, persistent=False)

    @classmethod
    def from_values(cls, q: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor, group_size: int,
                    in_features: int, out_features: int, bias: torch.Tensor | None = None) -> "Int4Linear":
        """From padded values (Np, Kp) 0..15 and their (Np, Kp/G) scales and zeros; packs for the CPU kernel."""
        if q.device.type != "cpu":
            raise ValueError(int4_device_error(q.device))
        scale_zeros = torch.stack([scales, zeros], dim=-1).transpose(0, 1)            # (Kp/G, Np, 2)
        return cls(cpu_int4_pack(q), scale_zeros, group_size, in_features, out_features, bias)

    @classmethod
    def from_float(cls, linear: nn.Linear, group_size: int,
                   kernel_dtype: torch.dtype = DEFAULT_KERNEL_DTYPE) -> "Int4Linear":
        if linear.weight.device.type != "cpu":
            raise ValueError(int4_device_error(linear.weight.device))
        q, scales, zeros = quantize_int4(linear.weight, group_size, kernel_dtype)
        bias = linear.bias.detach().clone() if linear.bias is not None else None
        return cls.from_values(q, scales, zeros, group_size, linear.in_features, linear.out_features, bias)

    @classmethod
    def from_storage(cls, tensors: dict[str, torch.Tensor], in_features: int, out_features: int, group_size: int,
                     device: torch.device | str = "cpu", bias_dtype: torch.dtype | None = None) -> "Int4Linear":
        """From the stored tensors (``weight`` nibbles, ``weight_scale``, ``weight_zero``, optional ``bias``)."""
        if torch.device(device).type != "cpu":
            raise ValueError(int4_device_error(torch.device(device)))
        rows, cols = int4_padded_shape(out_features, in_features, group_size)
        expected = {"weight": (rows, cols // 2), "weight_scale": (rows, cols // group_size),
                    "weight_zero": (rows, cols // group_size)}
        if "bias" in tensors:
            expected["bias"] = (out_features,)
        _check_storage(f"int4 (group {group_size})", tensors, expected, {"weight": torch.uint8})
        if tensors["weight_scale"].dtype != tensors["weight_zero"].dtype:
            raise ValueError("int4 weight_scale and weight_zero must have one dtype, got "
                             f"{tensors['weight_scale'].dtype} and {tensors['weight_zero'].dtype}")
        bias = tensors.get("bias")
        if bias is not None:
            bias = bias.to(dtype=bias_dtype or bias.dtype)
        return cls.from_values(unpack_nibbles(tensors["weight"].cpu()), tensors["weight_scale"].cpu(),
                               tensors["weight_zero"].cpu(), group_size, in_features, out_features, bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type != "cpu":
            raise RuntimeError(int4_device_error(x.device))
        shape = x.shape
        x2 = x.reshape(-1, self.in_features).to(self.scale_zeros.dtype)
        if self.padded_in != self.in_features:
            x2 = F.pad(x2, (0, self.padded_in - self.in_features))
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(x2.contiguous(), self.packed, self.group_size,
                                                       self.scale_zeros)
        if self.padded_out != self.out_features:
            y = y[:, :self.out_features]
        y = y.to(x.dtype)
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*shape[:-1], self.out_features)

    def values(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(q (Np, Kp) uint8, scales, zeros (Np, Kp/G)): the padded weight as :func:`quantize_int4` made it."""
        q = cpu_int4_unpack(self.packed, self.padded_out, self.padded_in)
        scales, zeros = self.scale_zeros.transpose(0, 1).unbind(-1)
        return q, scales.contiguous(), zeros.contiguous()

    def dequantized_weight(self) -> torch.Tensor:
        """The fp32 (N, K) weight the layer multiplies by (padding cut off)."""
        q, scales, zeros = self.values()
        return dequantize_int4(q, scales, zeros, self.group_size)[:self.out_features, :self.in_features]

    def storage(self) -> dict[str, torch.Tensor]:
        q, scales, zeros = self.values()
        out = {"weight": pack_nibbles(q), "weight_scale": scales, "weight_zero": zeros}
        if self.bias is not None:
            out["bias"] = self.bias
        return out

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, tensor in self.storage().items():
            destination[prefix + name] = tensor if keep_vars else tensor.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        loaded = _take_storage(self, state_dict, prefix, ("weight", "weight_scale", "weight_zero", "bias"),
                               ("bias",), missing_keys, unexpected_keys, strict)
        if loaded is None:
            return
        try:
            new = Int4Linear.from_storage(loaded, self.in_features, self.out_features, self.group_size)
        except ValueError as exc:
            error_msgs.append(f"{prefix}: {exc}")
            return
        self.packed, self.scale_zeros, self.bias = new.packed, new.scale_zeros, new.bias

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"int4 group {self.group_size}, kernel {str(self.scale_zeros.dtype).replace('torch.', '')}")


def int4_device_error(device: torch.device) -> str:
    return (f"int4 weights run on the CPU only, not on {device}: torch's CUDA int4 kernel needs another packing, "
            "which Atelier does not implement yet (there was no GPU to test it on). Use int8 (any device) or no "
            "weight quantization there.")


def _take_storage(module: nn.Module, state_dict: dict, prefix: str, names: tuple[str, ...],
                  optional: tuple[str, ...], missing_keys: list, unexpected_keys: list,
                  strict: bool) -> dict[str, torch.Tensor] | None:
    """This layer's stored tensors from a state dict being loaded; missing and unexpected keys are reported."""
    found = {name: state_dict[prefix + name] for name in names if prefix + name in state_dict}
    if strict:
        unexpected_keys.extend(k for k in state_dict if k.startswith(prefix) and "." not in k[len(prefix):]
                               and k[len(prefix):] not in names)
    missing = [prefix + name for name in names if name not in found and name not in optional]
    if module.bias is not None and "bias" not in found:
        missing.append(prefix + "bias")
    if missing:
        missing_keys.extend(missing)
        return None
    return found

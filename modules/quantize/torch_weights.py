"""Torch-native weight-only quantization of Atelier's Llama: int8 per channel, int4 in groups of 32/64/128.

    model = quantize_model(load_model(folder), "int4-g64")      # in place; returns the model
    save_quantized_folder(model, out_dir, "int4-g64", tokenizer_dir=folder)
    model = load_model(out_dir)                                  # modules.llm.checkpoint dispatches here

What changes: every ``nn.Linear`` of the decoder blocks (q/k/v/o, gate/up/down) and, by default, ``lm_head``
becomes an :class:`~modules.quantize.torch_linear.Int8Linear` / ``Int4Linear`` with the same ``m(x)`` call;
embeddings, norms, attention and the KV cache keep the model's dtype. The layers and the kernels' measured
speeds are described in :mod:`modules.quantize.torch_linear`.

Why ``lm_head`` is quantized by default: decode reads every weight once per token, and TinyLlama's
lm_head (32000 x 2048) is 6 % of the fp32 bytes but a third of what is left once the blocks are int4.
With tied embeddings the quantized lm_head is a separate copy (the embedding table stays in the model's
dtype; only one row of it is read per token). ``lm_head=False`` keeps it in the model's dtype. Measured by
``benchmarks/quantize_torch.py`` (2026-12-02, 2 threads): int4-g32 decodes the 1.1B shape at 2.78x fp32 with
lm_head quantized and 2.48x without; on the demo chat model the answer perplexity changes by +0.46 % and
+0.44 %, int8 by -0.03 %.

A quantized folder is an ordinary Hugging Face folder whose ``model.safetensors`` holds the quantized
tensors (``<linear>.weight`` int8 or uint8 nibbles, ``<linear>.weight_scale``, int4 also ``.weight_zero``) and
whose ``config.json`` carries ``"quantization_config": {"quant_method": "atelier", "scheme": ..., "bits": ...,
"group_size": ..., "lm_head": ..., "kernel_dtype": ..., "format_version": 1}``. Loading uses the stored
tensors as they are (no dequantize / requantize), so logits equal the model that was saved.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Literal

import torch
from torch import nn

from modules.llm.config import LlamaConfig
from modules.llm.model import Llama
from modules.quantize.torch_linear import (DEFAULT_KERNEL_DTYPE, Int4Linear, Int8Linear, int4_device_error,
                                           int4_padded_shape)

log = logging.getLogger(__name__)

QuantScheme = Literal["int8", "int4-g32", "int4-g64", "int4-g128"]
#: the schemes, in the order the settings list them
QUANT_SCHEMES: tuple[str, ...] = ("int8", "int4-g32", "int4-g64", "int4-g128")
#: the values of the ``llm.weight_quantization`` setting
WEIGHT_QUANT_CHOICES: tuple[str, ...] = ("none",) + QUANT_SCHEMES
QUANT_METHOD = "atelier"
FORMAT_VERSION = 1
#: the projections of one decoder block, as (attribute of the block, attribute of that)
BLOCK_LINEARS: tuple[tuple[str, str], ...] = (
    ("self_attn", "q_proj"), ("self_attn", "k_proj"), ("self_attn", "v_proj"), ("self_attn", "o_proj"),
    ("mlp", "gate_proj"), ("mlp", "up_proj"), ("mlp", "down_proj"))
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_QUANTIZED = (Int8Linear, Int4Linear)


@dataclass(frozen=True)
class SchemeSpec:
    """A scheme's name, bits per weight and group size (None: one scale per output channel)."""
    name: str
    bits: int
    group_size: int | None


def parse_scheme(scheme: str) -> SchemeSpec:
    """``"int8"`` / ``"int4-g32"`` / ``"int4-g64"`` / ``"int4-g128"`` -> :class:`SchemeSpec`; anything else raises."""
    if scheme == "int8":
        return SchemeSpec("int8", 8, None)
    if isinstance(scheme, str) and scheme in QUANT_SCHEMES:
        return SchemeSpec(scheme, 4, int(scheme.split("-g")[1]))
    raise ValueError(f"unknown weight quantization scheme {scheme!r}: use one of {', '.join(QUANT_SCHEMES)}")


class QuantizedCheckpointError(ValueError):
    """A quantized model folder that cannot be loaded; the message says what to do."""


# ------------------------------------------------------------------------------------- in memory
def _linear_slots(model: Llama, lm_head: bool) -> Iterator[tuple[str, nn.Module, str]]:
    """(state-dict prefix, parent module, attribute) of every linear that quantization replaces."""
    for i, block in enumerate(model.model.layers):
        for part, name in BLOCK_LINEARS:
            yield f"model.layers.{i}.{part}.{name}", getattr(block, part), name
    if lm_head:
        yield "lm_head", model, "lm_head"


def default_kernel_dtype(device: torch.device, model_dtype: torch.dtype) -> torch.dtype:
    """bf16 on the CPU (both kernels are several times slower with fp32 activations), the model's dtype elsewhere."""
    return DEFAULT_KERNEL_DTYPE if device.type == "cpu" else model_dtype


def quantize_model(model: Llama, scheme: QuantScheme | str, *, lm_head: bool = True,
                   kernel_dtype: torch.dtype | None = None) -> Llama:
    """Replace the model's linears by quantized ones, in place, and return the model.

    lm_head: quantize it too (the default; see the module docstring). kernel_dtype: the dtype of the scales
    and of the kernels' activations (default :func:`default_kernel_dtype`; float32 gives products exact to
    fp32 rounding, at a fraction of the speed on the CPU). The fp weights are released as each layer is
    replaced. Row-parallel decode (``Llama.use_row_parallel``) splits ``nn.Linear`` weights only, so it is
    turned off.
    """
    spec = parse_scheme(scheme)
    if model_quantization(model) is not None:
        raise ValueError(f"this model is already quantized ({model_quantization(model)['scheme']}); load the "
                         "unquantized weights to quantize them with another scheme")
    embed = model.model.embed_tokens.weight
    if embed.device.type == "meta":
        raise ValueError("the model has no weights yet (meta device): load them before quantizing")
    if spec.bits == 4 and embed.device.type != "cpu":
        raise ValueError(int4_device_error(embed.device))
    kernel_dtype = kernel_dtype or default_kernel_dtype(embed.device, embed.dtype)
    if kernel_dtype not in _DTYPES.values():
        raise ValueError(f"kernel_dtype must be float32, bfloat16 or float16, got {kernel_dtype}")
    model.use_row_parallel(None)
    with torch.no_grad():
        for prefix, parent, name in _linear_slots(model, lm_head):
            linear = getattr(parent, name)
            if not isinstance(linear, nn.Linear):
                raise ValueError(f"{prefix} is a {type(linear).__name__}, not an nn.Linear: cannot quantize it")
            if spec.bits == 8:
                new: nn.Module = Int8Linear.from_float(linear, kernel_dtype)
            else:
                new = Int4Linear.from_float(linear, spec.group_size, kernel_dtype)
            setattr(parent, name, new)
    return model


def apply_weight_quant(model: Llama, weight_quant: str, name: str = "") -> str | None:
    """What ``load_llm(weight_quant=...)`` does after loading: quantize a plain model with the scheme
    ("none": leave it); a model loaded from a quantized folder keeps its stored scheme. Returns the model's
    scheme, or None when its weights are plain."""
    if weight_quant not in WEIGHT_QUANT_CHOICES:
        raise ValueError(f"unknown weight quantization {weight_quant!r}: use one of {', '.join(WEIGHT_QUANT_CHOICES)}")
    stored = model_quantization(model)
    if stored is not None:
        if weight_quant not in ("none", stored["scheme"]):
            log.info("LLM %s is stored quantized as %s; using that, not %s", name, stored["scheme"], weight_quant)
        return stored["scheme"]
    if weight_quant == "none":
        return None
    quantize_model(model, weight_quant)
    return weight_quant


def model_quantization(model: Llama) -> dict[str, Any] | None:
    """The ``quantization_config`` describing ``model``'s quantized linears, or None for a plain model."""
    slots = list(_linear_slots(model, lm_head=True))
    layers = {prefix: getattr(parent, name) for prefix, parent, name in slots}
    quantized = {p: m for p, m in layers.items() if isinstance(m, _QUANTIZED)}
    if not quantized:
        return None
    kinds = {(type(m).__name__, getattr(m, "group_size", None)) for m in quantized.values()}
    blocks = [p for p in layers if p != "lm_head"]
    plain = [p for p in blocks if p not in quantized]
    if len(kinds) > 1 or plain:
        raise ValueError(f"the model is partly or mixed quantized ({sorted(kinds)}; plain: {plain[:3]}); "
                         "Atelier saves and describes uniformly quantized models only")
    first = next(iter(quantized.values()))
    bits = 8 if isinstance(first, Int8Linear) else 4
    group = None if bits == 8 else first.group_size
    kernel = first.scales.dtype if bits == 8 else first.scale_zeros.dtype
    return {"quant_method": QUANT_METHOD, "scheme": "int8" if bits == 8 else f"int4-g{group}", "bits": bits,
            "group_size": group, "lm_head": "lm_head" in quantized,
            "kernel_dtype": str(kernel).replace("torch.", ""), "format_version": FORMAT_VERSION}


# --------------------------------------------------------------------------------------- storage
def expected_storage_shapes(config: LlamaConfig, quant: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every key, with its shape, that a quantized folder of this config and ``quantization_config`` holds."""
    spec = parse_scheme(quant["scheme"])
    with torch.device("meta"):
        model = Llama(config)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for prefix, parent, name in _linear_slots(model, bool(quant.get("lm_head"))):
        linear = getattr(parent, name)
        for key in [k for k in shapes if k.startswith(prefix + ".")]:
            del shapes[key]
        n, k = linear.out_features, linear.in_features
        if spec.bits == 8:
            shapes.update({f"{prefix}.weight": (n, k), f"{prefix}.weight_scale": (n,)})
        else:
            rows, cols = int4_padded_shape(n, k, spec.group_size)
            groups = cols // spec.group_size
            shapes.update({f"{prefix}.weight": (rows, cols // 2), f"{prefix}.weight_scale": (rows, groups),
                           f"{prefix}.weight_zero": (rows, groups)})
        if linear.bias is not None:
            shapes[f"{prefix}.bias"] = (n,)
    if config.tie_word_embeddings and not quant.get("lm_head"):
        shapes.pop("lm_head.weight", None)           # stored once, as the embedding
    return shapes


def save_quantized_folder(model: Llama, out_dir: str | Path, scheme: QuantScheme | str | None = None,
                          tokenizer_dir: str | Path | None = None, *, generation_config: dict | None = None,
                          overwrite: bool = False) -> Path:
    """Write a quantized model as a folder :func:`modules.llm.checkpoint.load_model` loads back exactly.

    scheme: checked against the model's own (quantize it first with :func:`quantize_model`). tokenizer_dir:
    copy its tokenizer, chat-template and generation files along. An existing ``model.safetensors`` in
    ``out_dir`` is replaced only with ``overwrite=True``. The weights are written to a temporary file that is
    renamed when complete (a full disk leaves no half-written model, and the error says so).
    """
    from safetensors.torch import save_file

    from modules.llm.checkpoint import SAFETENSORS, SIDE_FILES

    quant = model_quantization(model)
    if quant is None:
        raise ValueError("the model is not quantized: call quantize_model(model, scheme) first")
    if scheme is not None and parse_scheme(scheme).name != quant["scheme"]:
        raise ValueError(f"the model is quantized as {quant['scheme']}, not {scheme}")
    out = Path(out_dir)
    if (out / SAFETENSORS).exists() and not overwrite:
        raise FileExistsError(f"{out / SAFETENSORS} exists; choose another folder or pass overwrite=True")
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        for name in SIDE_FILES + ("chat_template.jinja",):
            src = Path(tokenizer_dir) / name
            if src.is_file() and src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings and not quant["lm_head"]:
        state.pop("lm_head.weight", None)
    partial = out / (SAFETENSORS + ".partial")
    try:
        save_file(state, str(partial), metadata={"format": "pt", "atelier_quantization": quant["scheme"]})
        os.replace(partial, out / SAFETENSORS)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise OSError(f"could not write {out / SAFETENSORS} ({exc}); the partial file was removed") from exc
    hf_config = model.config.to_hf_dict()
    hf_config["torch_dtype"] = str(model.model.embed_tokens.weight.dtype).replace("torch.", "")
    hf_config["quantization_config"] = quant
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if generation_config is not None:
        (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n",
                                                    encoding="utf-8")
    return out


def read_quantization_config(folder: str | Path) -> dict[str, Any] | None:
    """``config.json``'s ``quantization_config`` when it is Atelier's (checked), None when there is none.

    A block from another quantizer (GPTQ, AWQ, bitsandbytes ...) raises: its tensors are not Atelier's.
    """
    path = Path(folder) / "config.json"
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None                           # LlamaConfig.from_json_file reports an unreadable config
    quant = data.get("quantization_config") if isinstance(data, dict) else None
    if quant is None:
        return None
    method = quant.get("quant_method") if isinstance(quant, dict) else None
    if method != QUANT_METHOD:
        raise QuantizedCheckpointError(
            f"{path} says the weights were quantized with {method!r}, which Atelier cannot load; use an "
            "unquantized (fp16/bf16/fp32) copy of the model, or its GGUF file")
    problems = []
    try:
        spec = parse_scheme(quant.get("scheme"))
        if quant.get("bits") != spec.bits or quant.get("group_size") != spec.group_size:
            problems.append(f"bits {quant.get('bits')!r} / group_size {quant.get('group_size')!r} do not match "
                            f"scheme {spec.name} ({spec.bits} / {spec.group_size})")
    except ValueError as exc:
        problems.append(str(exc))
    if not isinstance(quant.get("lm_head"), bool):
        problems.append(f"lm_head must be true or false, got {quant.get('lm_head')!r}")
    if quant.get("format_version") != FORMAT_VERSION:
        problems.append(f"format_version {quant.get('format_version')!r} is not {FORMAT_VERSION} (written by "
                        "another Atelier version?)")
    if problems:
        raise QuantizedCheckpointError(f"{path}: invalid quantization_config: " + "; ".join(problems))
    return quant


def load_quantized_model(folder: str | Path, device: str | torch.device = "cpu",
                         dtype: torch.dtype = torch.float32, config: LlamaConfig | None = None,
                         quant: dict[str, Any] | None = None) -> Llama:
    """Build a quantized folder's model from its stored tensors (no requantizing): logits equal the saved model's.

    dtype: of the embeddings, norms, biases and activations; the scales keep their stored dtype (the kernel
    dtype the model was quantized with). Keys and shapes are checked before any tensor is read.
    """
    from safetensors import safe_open

    from modules.llm.checkpoint import CheckpointError, check_keys_and_shapes, weight_files
    from modules.safetensors_header import BrokenModelFile, read_header

    folder = Path(folder)
    device = torch.device(device)
    config = config or LlamaConfig.from_json_file(folder / "config.json")
    quant = quant or read_quantization_config(folder)
    if quant is None:
        raise QuantizedCheckpointError(f"{folder}/config.json has no quantization_config: not a quantized folder")
    spec = parse_scheme(quant["scheme"])
    if spec.bits == 4 and device.type != "cpu":
        raise QuantizedCheckpointError(f"{folder}: {int4_device_error(device)}")
    files = weight_files(folder)
    if any(f.suffix != ".safetensors" for f in files):
        raise QuantizedCheckpointError(f"{folder}: quantized weights are read from safetensors files only")
    found: dict[str, tuple[int, ...]] = {}
    for file in files:
        try:
            found.update(read_header(file).shapes())
        except BrokenModelFile as exc:
            raise CheckpointError(f"{folder}: weight file {exc}") from None
    expected = expected_storage_shapes(config, quant)
    check_keys_and_shapes(expected, found, config, folder)

    with torch.device("meta"):
        model = Llama(config)
    slots = {prefix: (parent, name) for prefix, parent, name in _linear_slots(model, quant["lm_head"])}
    pending: dict[str, dict[str, torch.Tensor]] = {prefix: {} for prefix in slots}
    needed = {prefix: sum(1 for k in expected if k.rsplit(".", 1)[0] == prefix) for prefix in slots}
    plain: dict[str, torch.Tensor] = {}
    for file in files:
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                if key not in expected:
                    continue
                prefix, leaf = key.rsplit(".", 1)
                if prefix not in slots:
                    plain[key] = handle.get_tensor(key).to(device=device, dtype=dtype)
                    continue
                pending[prefix][leaf] = handle.get_tensor(key)
                if len(pending[prefix]) == needed[prefix]:     # complete: build it, free the file tensors
                    parent, name = slots[prefix]
                    setattr(parent, name, _build_layer(spec, pending.pop(prefix), getattr(parent, name),
                                                       device, dtype, f"{folder}: {prefix}"))
    if pending:
        raise QuantizedCheckpointError(f"{folder}: incomplete quantized layers {sorted(pending)[:3]}; the weight "
                                       "files are damaged, quantize and save the model again")
    if config.tie_word_embeddings and not quant["lm_head"]:
        plain["lm_head.weight"] = plain["model.embed_tokens.weight"]
    model.load_state_dict(plain, strict=False, assign=True)
    if config.tie_word_embeddings and not quant["lm_head"]:
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def _build_layer(spec: SchemeSpec, tensors: dict[str, torch.Tensor], shell: nn.Linear, device: torch.device,
                 dtype: torch.dtype, where: str) -> nn.Module:
    try:
        if spec.bits == 8:
            return Int8Linear.from_storage(tensors, shell.in_features, shell.out_features, device, dtype)
        return Int4Linear.from_storage(tensors, shell.in_features, shell.out_features, spec.group_size, device,
                                       dtype)
    except ValueError as exc:
        raise QuantizedCheckpointError(f"{where}: {exc}") from None


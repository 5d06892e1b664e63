"""Which layers a LoRA trains, and the names kohya's files give them.

Why kohya's choice: a LoRA made here is meant to behave like one made with kohya's sd-scripts
(``networks/lora.py``) and to load wherever those load. sd-scripts trains every ``Linear`` and 1×1
``Conv2d`` inside the UNet's ``Transformer2DModel`` blocks (attention q/k/v/out, feed-forward,
proj_in/out) and inside the text encoders' ``CLIPAttention``/``CLIPMLP`` blocks; with its
``conv_dim`` option ("LoCon") it adds everything inside ``ResnetBlock2D``/``Downsample2D``/``Upsample2D``:
the 3×3 convolutions at the conv rank, the time-embedding Linear and 1×1 shortcut at the network rank.
For a real SD 1.5 that is 192 UNet + 72 text-encoder layers; for SDXL 722 + 264.

Why the names are built from the live model: a kohya key is ``<prefix>_<module path with "_">``, and
an underscore-joined name cannot be split back into a path (``to_out_0`` vs ``to.out.0``). Mapping
every layer of the model to its name and inverting the map is exact in both directions.

UNet layouts. sd-scripts trains SD 1.x/2.x on a diffusers-layout UNet, so those names are diffusers
paths (``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``); it trains SDXL on the
original SGM UNet, so SDXL names are SGM paths (``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q``).
The SGM spelling comes from ``modules.diffusion.ldm_keys.unet_to_ldm``, the same renaming that writes
single-file checkpoints. Text encoders keep transformers' paths under ``text_model``
(``lora_te1_text_model_encoder_layers_0_self_attn_q_proj``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Iterator

import torch

UNET_BLOCKS = ("Transformer2DModel",)
UNET_CONV_BLOCKS = ("ResnetBlock2D", "Downsample2D", "Upsample2D")
TEXT_ENCODER_BLOCKS = ("CLIPAttention", "CLIPSdpaAttention", "CLIPFlashAttention2", "CLIPMLP")
#: Submodules peft adds inside a layer it wraps; they are never layers of the model itself.
_PEFT_PARTS = frozenset({"base_layer", "lora_A", "lora_B", "lora_dropout", "lora_embedding_A",
                         "lora_embedding_B", "lora_magnitude_vector"})
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


class LoraTargetError(ValueError):
    """The model or the LoRA settings do not allow the requested LoRA."""


@dataclass(frozen=True)
class Targets:
    """Module paths to train: ``linear`` (Linear and 1×1 conv, at the network rank) and ``conv``
    (larger kernels, at the conv rank)."""
    linear: tuple[str, ...]
    conv: tuple[str, ...] = ()

    @property
    def all(self) -> tuple[str, ...]:
        return self.linear + self.conv


def layers(model: torch.nn.Module) -> Iterator[tuple[str, torch.nn.Module]]:
    """``(path, layer)`` for every Linear/Conv2d of *model*, seen through peft: a wrapped layer is
    reported once, under its own path, as its base layer."""
    from peft.tuners.lora import LoraLayer
    for path, module in model.named_modules():
        if _PEFT_PARTS.intersection(path.split(".")):
            continue
        base = module.get_base_layer() if isinstance(module, LoraLayer) else module
        if isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
            yield path, base


def _is_linear_like(layer: torch.nn.Module) -> bool:
    return isinstance(layer, torch.nn.Linear) or tuple(layer.kernel_size) == (1, 1)


def _inside(model: torch.nn.Module, block_types: tuple[str, ...]) -> Iterator[tuple[str, torch.nn.Module]]:
    seen = set()
    for block_path, block in model.named_modules():
        if type(block).__name__ not in block_types:
            continue
        for sub, layer in layers(block):
            path = f"{block_path}.{sub}" if block_path else sub
            if path not in seen:
                seen.add(path)
                yield path, layer


def unet_targets(unet: torch.nn.Module, *, conv: bool = False) -> Targets:
    """kohya's UNet layers: transformer blocks, plus the resnet/sampler blocks when *conv*."""
    linear = [path for path, _ in _inside(unet, UNET_BLOCKS)]
    convs: list[str] = []
    if conv:
        for path, layer in _inside(unet, UNET_CONV_BLOCKS):
            (linear if _is_linear_like(layer) else convs).append(path)
    return Targets(tuple(linear), tuple(convs))


def text_encoder_targets(text_encoder: torch.nn.Module) -> Targets:
    """kohya's text-encoder layers: the attention and MLP projections of every encoder layer."""
    return Targets(tuple(path for path, _ in _inside(text_encoder, TEXT_ENCODER_BLOCKS)))


def lora_config(targets: Targets, *, rank: int, alpha: float, conv_rank: int | None = None,
                conv_alpha: float | None = None, dropout: float = 0.0):
    """A peft ``LoraConfig`` for exactly *targets*, with kohya's meaning of rank and alpha
    (scale alpha/rank; conv layers at their own rank and alpha, 1.0 when unset as in sd-scripts).

    peft's default init (A kaiming-uniform, B zero) is also kohya's, so a fresh LoRA starts as the
    identity either way.
    """
    from peft import LoraConfig
    problems = []
    if not isinstance(rank, int) or rank <= 0:
        problems.append(f"rank must be a positive integer, got {rank!r}")
    if targets.conv and (not isinstance(conv_rank, int) or conv_rank <= 0):
        problems.append(f"conv layers are targeted, so conv_rank must be a positive integer, got {conv_rank!r}")
    if not 0.0 <= dropout < 1.0:
        problems.append(f"dropout must be in [0, 1), got {dropout!r}")
    if not targets.all:
        problems.append("no layers to train (the target list is empty)")
    if problems:
        raise LoraTargetError("Invalid LoRA settings: " + "; ".join(problems))
    conv_alpha = 1.0 if conv_alpha is None else conv_alpha
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=list(targets.all),
                      rank_pattern={re.escape(p): conv_rank for p in targets.conv},
                      alpha_pattern={re.escape(p): conv_alpha for p in targets.conv})


def is_sdxl_unet(unet: torch.nn.Module) -> bool:
    """SDXL's UNet conditions on pooled text and size ids (``addition_embed_type="text_time"``)."""
    return getattr(unet, "config", {}).get("addition_embed_type") == "text_time"


def prefixes(sdxl: bool) -> dict[str, str]:
    """kohya's key prefix per pipeline component."""
    if sdxl:
        return {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
    return {"unet": "lora_unet", "text_encoder": "lora_te"}


def sgm_paths(unet: torch.nn.Module, paths: list[str]) -> dict[str, str]:
    """{diffusers path: SGM path} for UNet layer *paths* (all of them, so upsampler slots come out right)."""
    from modules.diffusion.ldm_keys import unet_to_ldm
    per_block = unet.config.layers_per_block
    if not isinstance(per_block, int):
        raise LoraTargetError(f"this UNet has per-level layers_per_block {per_block!r}; SGM (SDXL kohya) names "
                              "exist only for one count shared by all levels")
    try:
        renamed = unet_to_ldm({f"{p}.weight": p for p in paths}, per_block)  # values carry the old path
    except (ValueError, IndexError) as exc:
        raise LoraTargetError(f"this UNet has layers with no SGM name ({exc})") from exc
    return {old: new[:-len(".weight")] for new, old in renamed.items()}


def kohya_names(component: str, model: torch.nn.Module, *, sdxl: bool,
                layout: str | None = None) -> dict[str, str]:
    """{module path: kohya name} for every Linear/Conv2d of one pipeline *component*.

    *layout* ("diffusers" or "sgm") applies to the UNet; the default is what sd-scripts writes
    (SGM for SDXL, diffusers otherwise).
    """
    table = prefixes(sdxl)
    if component not in table:
        raise LoraTargetError(f"no kohya prefix for component {component!r} of a "
                              f"{'SDXL' if sdxl else 'SD 1.x/2.x'} model (known: {', '.join(table)})")
    paths = [path for path, _ in layers(model)]
    if component == "unet" and (layout or ("sgm" if sdxl else "diffusers")) == "sgm":
        spelled = sgm_paths(model, paths)
    elif component != "unet" and not hasattr(model, "text_model"):
        # transformers 5's CLIPTextModel is the text transformer itself; kohya's names (from the
        # CLIPTextModel that wrapped it as ``.text_model``) keep that level
        spelled = {p: f"text_model.{p}" for p in paths}
    else:
        spelled = {p: p for p in paths}
    return {p: f"{table[component]}_{spelled[p].replace('.', '_')}" for p in paths}

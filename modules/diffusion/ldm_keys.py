"""Diffusers → original LDM (CompVis/SGM) key names, for writing single-file checkpoints.

Why: A1111 users keep checkpoints as one ``.safetensors`` file with the original
LDM key names, and diffusers can only read that layout (``single_file_utils``
converts LDM → diffusers). The fixtures must write real-format files, so this
module provides the other direction. It is the exact inverse of diffusers'
readers: ``tests/diffusion/test_loading.py`` loads the written file back and
compares every weight with the diffusers folder it came from.

Layout reminders (LDM side):

* UNet ``model.diffusion_model.``: ``input_blocks.0.0`` is ``conv_in``; then per
  resolution level ``layers_per_block`` entries ``input_blocks.N.0`` (resnet) and
  ``input_blocks.N.1`` (transformer, for cross-attention levels), then one
  ``input_blocks.N.0.op`` downsampler (all levels but the last). The mid block is
  ``middle_block.0/1/2`` (resnet, transformer, resnet). The up path has
  ``layers_per_block + 1`` ``output_blocks`` per level, the upsampler sitting in
  the last one as ``.1.conv`` (no transformer) or ``.2.conv``.
* VAE ``first_stage_model.``: ``encoder.down.I.block.J``, ``mid.block_1/2``,
  ``mid.attn_1`` with 1×1-conv q/k/v/proj_out, and the decoder's ``up`` list in
  reverse order.
* CLIP-L ``cond_stage_model.transformer.text_model.`` (SD1) or
  ``conditioner.embedders.0.transformer.text_model.`` (SDXL): diffusers' own names.
* OpenCLIP ``conditioner.embedders.1.model.`` (SDXL) / ``cond_stage_model.model.``
  (SD2): fused ``attn.in_proj_weight``, ``ln_1``/``ln_2``, ``mlp.c_fc``/``c_proj``,
  ``text_projection`` stored transposed.
"""
from __future__ import annotations

import torch

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
SD1_CLIP_PREFIX = "cond_stage_model.transformer.text_model."
SD2_OPENCLIP_PREFIX = "cond_stage_model.model."
SDXL_CLIP_PREFIX = "conditioner.embedders.0.transformer.text_model."
SDXL_OPENCLIP_PREFIX = "conditioner.embedders.1.model."

_RESNET_PARTS = (("norm1", "in_layers.0"), ("conv1", "in_layers.2"), ("norm2", "out_layers.0"),
                 ("conv2", "out_layers.3"), ("time_emb_proj", "emb_layers.1"), ("conv_shortcut", "skip_connection"))
_UNET_TOP = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
             "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
             "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}


def _rename_resnet(rest: str) -> str:
    for new, old in _RESNET_PARTS:
        if rest.startswith(new + "."):
            return old + rest[len(new):]
    raise ValueError(f"unexpected resnet parameter {rest!r}")


def unet_to_ldm(state: dict[str, torch.Tensor], layers_per_block: int) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``UNet2DConditionModel`` state dict to LDM names (without prefix)."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        top = ".".join(parts[:2]) if parts[0] in ("time_embedding", "add_embedding") else parts[0]
        if top in _UNET_TOP:
            out[_UNET_TOP[top] + key[len(top):]] = value
            continue
        if parts[0] == "down_blocks":
            level, kind = int(parts[1]), parts[2]
            first = 1 + level * (layers_per_block + 1)  # index of this level's first input block
            if kind == "downsamplers":  # down_blocks.L.downsamplers.0.conv.X
                out[f"input_blocks.{first + layers_per_block}.0.op." + ".".join(parts[5:])] = value
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                if kind == "resnets":
                    out[f"input_blocks.{first + j}.0.{_rename_resnet(rest)}"] = value
                else:
                    out[f"input_blocks.{first + j}.1.{rest}"] = value
        elif parts[0] == "mid_block":
            j, rest = int(parts[2]), ".".join(parts[3:])
            if parts[1] == "resnets":
                out[f"middle_block.{2 * j}.{_rename_resnet(rest)}"] = value
            else:
                out[f"middle_block.1.{rest}"] = value
        elif parts[0] == "up_blocks":
            level, kind = int(parts[1]), parts[2]
            first = level * (layers_per_block + 1)
            if kind == "upsamplers":
                last = first + layers_per_block
                has_attention = any(k.startswith(f"up_blocks.{level}.attentions.") for k in state)
                slot = 2 if has_attention else 1
                out[f"output_blocks.{last}.{slot}.conv." + ".".join(parts[5:])] = value
            else:
                j, rest = int(parts[3]), ".".join(parts[4:])
                if kind == "resnets":
                    out[f"output_blocks.{first + j}.0.{_rename_resnet(rest)}"] = value
                else:
                    out[f"output_blocks.{first + j}.1.{rest}"] = value
        else:
            raise ValueError(f"unexpected UNet parameter {key!r}")
    return out


_VAE_ATTN = (("group_norm", "norm"), ("to_q", "q"), ("to_k", "k"), ("to_v", "v"), ("to_out.0", "proj_out"))


def vae_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a diffusers ``AutoencoderKL`` state dict to LDM names (without prefix)."""
    up_levels = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("decoder.up_blocks."))
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] in ("quant_conv", "post_quant_conv"):
            out[key] = value
            continue
        coder, rest = parts[0], parts[1:]
        if rest[0] in ("conv_in", "conv_out"):
            new = ".".join(rest)
        elif rest[0] == "conv_norm_out":
            new = "norm_out." + ".".join(rest[1:])
        elif rest[0] in ("down_blocks", "up_blocks"):
            level = int(rest[1])
            name = "down" if rest[0] == "down_blocks" else "up"
            if name == "up":
                level = up_levels - 1 - level
            tail = ".".join(rest[5:])
            if rest[2] == "resnets":
                new = f"{name}.{level}.block.{rest[3]}." + ".".join(rest[4:]).replace("conv_shortcut", "nin_shortcut")
            else:  # downsamplers.0.conv / upsamplers.0.conv
                new = f"{name}.{level}.{'downsample' if name == 'down' else 'upsample'}.conv.{tail}"
        elif rest[0] == "mid_block" and rest[1] == "resnets":
            new = f"mid.block_{int(rest[2]) + 1}." + ".".join(rest[3:]).replace("conv_shortcut", "nin_shortcut")
        elif rest[0] == "mid_block" and rest[1] == "attentions":
            inner = ".".join(rest[3:])
            for diffusers_name, ldm_name in _VAE_ATTN:
                if inner.startswith(diffusers_name + "."):
                    inner = ldm_name + inner[len(diffusers_name):]
                    break
            new = "mid.attn_1." + inner
            if value.ndim == 2:  # LDM stores the attention projections as 1×1 convolutions
                value = value[:, :, None, None]
        else:
            raise ValueError(f"unexpected VAE parameter {key!r}")
        out[f"{coder}.{new}"] = value
    return out


def clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers ``CLIPTextModel`` state dict under LDM names, relative to ``...text_model.``."""
    return {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}


_OPENCLIP_LAYER = (("layer_norm1", "ln_1"), ("layer_norm2", "ln_2"), ("mlp.fc1", "mlp.c_fc"),
                   ("mlp.fc2", "mlp.c_proj"), ("self_attn.out_proj", "attn.out_proj"))


def open_clip_to_ldm(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A diffusers CLIP text model state dict under OpenCLIP names (no prefix).

    For SD2's ``CLIPTextModel`` (no projection layer) an identity ``text_projection`` is written, as
    the OpenCLIP checkpoint has one; diffusers' reader ignores it for SD2.
    """
    flat = {k.removeprefix("text_model."): v for k, v in state.items() if not k.endswith("position_ids")}
    width = flat["final_layer_norm.weight"].shape[0]
    projection = flat.pop("text_projection.weight", None)
    out: dict[str, torch.Tensor] = {
        "positional_embedding": flat.pop("embeddings.position_embedding.weight"),
        "token_embedding.weight": flat.pop("embeddings.token_embedding.weight"),
        "ln_final.weight": flat.pop("final_layer_norm.weight"),
        "ln_final.bias": flat.pop("final_layer_norm.bias"),
        "text_projection": (projection.T.contiguous() if projection is not None else torch.eye(width)),
    }
    layers = sorted({int(k.split(".")[2]) for k in flat if k.startswith("encoder.layers.")})
    for i in layers:
        src, dst = f"encoder.layers.{i}.", f"transformer.resblocks.{i}."
        for kind in ("weight", "bias"):
            out[dst + f"attn.in_proj_{kind}"] = torch.cat(
                [flat.pop(src + f"self_attn.{p}_proj.{kind}") for p in ("q", "k", "v")], dim=0)
        for name in [k for k in flat if k.startswith(src)]:
            rest = name[len(src):]
            for diffusers_name, ldm_name in _OPENCLIP_LAYER:
                if rest.startswith(diffusers_name + "."):
                    rest = ldm_name + rest[len(diffusers_name):]
                    break
            else:
                raise ValueError(f"unexpected OpenCLIP parameter {name!r}")
            out[dst + rest] = flat.pop(name)
    if flat:
        raise ValueError(f"unconverted text encoder parameters: {sorted(flat)[:5]}")
    return out


def pipeline_to_ldm(pipe, kind: str | None = None) -> dict[str, torch.Tensor]:
    """The whole checkpoint of an SD1/SD2/SDXL pipeline as one LDM-named state dict (contiguous tensors).

    *kind* "sd2" writes the text encoder in OpenCLIP layout; otherwise SDXL is recognised by its second
    text encoder and everything else is written as SD1.
    """
    unet = pipe.unet
    out = {UNET_PREFIX + k: v for k, v in unet_to_ldm(unet.state_dict(), unet.config.layers_per_block).items()}
    out.update({VAE_PREFIX + k: v for k, v in vae_to_ldm(pipe.vae.state_dict()).items()})
    te2 = getattr(pipe, "text_encoder_2", None)
    if te2 is not None:
        out.update({SDXL_CLIP_PREFIX + k: v for k, v in clip_to_ldm(pipe.text_encoder.state_dict()).items()})
        out.update({SDXL_OPENCLIP_PREFIX + k: v for k, v in open_clip_to_ldm(te2.state_dict()).items()})
    elif kind == "sd2":
        out.update({SD2_OPENCLIP_PREFIX + k: v for k, v in open_clip_to_ldm(pipe.text_encoder.state_dict()).items()})
    else:
        out.update({SD1_CLIP_PREFIX + k: v for k, v in clip_to_ldm(pipe.text_encoder.state_dict()).items()})
    return {k: v.detach().contiguous().clone() for k, v in out.items()}

"""Full fine-tuning: every UNet weight trains (and the text encoder's with ``train_text_encoder``), from a
checkpoint or from random weights of a small SD-1.5-architecture model.

Why a random init at all: a model made from nothing on a few hundred captioned-shapes images shows the
whole pipeline (tokenizer, text encoder, VAE, UNet, scheduler) working end to end in minutes on a CPU.
``architecture`` keys (see :data:`ARCHITECTURE`) size it; the block types, the PNDM scheduler and the
CLIP text model are SD 1.5's, so the result saves and loads as an SD 1.5 checkpoint. The VAE is never
trained here (as in SD training): either a fixed random encoder of images into latents, which is enough for
tests, or ``vae`` — one trained first by :mod:`.vae_training`, whose decoder draws real pictures. The
tokenizer knows the captioned-shapes vocabulary as whole words, so a caption is a few tokens.

Outputs: a diffusers folder in the run's ``final/`` and a single-file checkpoint with the original LDM key
names (``modules.diffusion.ldm_keys``) in ``models/Stable-diffusion/<output_name>.safetensors``, with a
sidecar folder ``<output_name>/`` holding its configs and tokenizer, which Atelier's loader reads for
sizes other than SD 1.5's. Neither replaces an existing file.
"""
from __future__ import annotations

import json
import tempfile
from pathlib import Path

import torch

#: architecture key -> default (a model of about 2M parameters that trains in seconds)
ARCHITECTURE: dict[str, object] = {
    "unet_block_out_channels": [32, 64],
    "layers_per_block": 1,
    "attention_head_dim": 8,
    "cross_attention_dim": 64,
    "text_hidden_size": 64,
    "text_layers": 2,
    "text_heads": 4,
    "vae_block_out_channels": [16, 16, 32, 32],
    "norm_num_groups": 8,
    "sample_size": 64,
    # the noise schedule, saved in the model's scheduler config (so training and every sampler use it);
    # SD 1.5's by default, which ends at ᾱ_T ≈ 0.0047 (a trace of the picture is left at the last step).
    # DDPM's ``linear`` 0.0001-0.02 ends at ᾱ_T ≈ 4e-5. On atelier-shapes it did not make the position word
    # matter in 800 steps (docs/training.md), so the shipped recipe keeps SD's.
    "beta_schedule": "scaled_linear",
    "beta_start": 0.00085,
    "beta_end": 0.012,
}

#: beta schedules every Atelier sampler's diffusers scheduler accepts
BETA_SCHEDULES = ("scaled_linear", "linear")


def architecture_problems(spec: dict) -> list[str]:
    import difflib
    out = []
    for key in spec:
        if key not in ARCHITECTURE:
            close = difflib.get_close_matches(key, list(ARCHITECTURE), n=1)
            out.append(f"architecture.{key} is not a known key" + (f" (did you mean {close[0]!r}?)" if close else "")
                       + f"; known: {', '.join(ARCHITECTURE)}")
    full = {**ARCHITECTURE, **{k: v for k, v in spec.items() if k in ARCHITECTURE}}
    for key in ("unet_block_out_channels", "vae_block_out_channels"):
        value = full[key]
        if not (isinstance(value, list) and value and all(isinstance(v, int) and v > 0 for v in value)):
            out.append(f"architecture.{key} must be a list of positive widths, got {value!r}")
        elif isinstance(full["norm_num_groups"], int) and full["norm_num_groups"] > 0 and \
                any(v % full["norm_num_groups"] for v in value):
            out.append(f"architecture.{key} widths must divide by norm_num_groups ({full['norm_num_groups']})")
    if isinstance(full["vae_block_out_channels"], list) and not 2 <= len(full["vae_block_out_channels"]) <= 4:
        out.append("architecture.vae_block_out_channels needs 2 to 4 widths (n levels shrink images 2^(n-1) times;"
                   " SD's VAE has 4: 8x)")
    if full["beta_schedule"] not in BETA_SCHEDULES:
        out.append(f"architecture.beta_schedule must be one of {', '.join(BETA_SCHEDULES)}, got {full['beta_schedule']!r}")
    betas = (full["beta_start"], full["beta_end"])
    if not all(isinstance(b, (int, float)) and not isinstance(b, bool) for b in betas) or \
            not 0 < betas[0] < betas[1] < 1:
        out.append(f"architecture.beta_start and beta_end must be numbers with 0 < beta_start < beta_end < 1, "
                   f"got {betas[0]!r} and {betas[1]!r}")
    for key in ("layers_per_block", "attention_head_dim", "cross_attention_dim", "text_hidden_size",
                "text_layers", "text_heads", "sample_size"):
        if not (isinstance(full[key], int) and full[key] > 0):
            out.append(f"architecture.{key} must be a positive integer, got {full[key]!r}")
    if isinstance(full["text_hidden_size"], int) and isinstance(full["text_heads"], int) and full["text_heads"] > 0 \
            and full["text_hidden_size"] % full["text_heads"]:
        out.append(f"architecture.text_hidden_size ({full['text_hidden_size']}) must divide by text_heads "
                   f"({full['text_heads']})")
    if full["text_hidden_size"] != full["cross_attention_dim"]:
        out.append(f"architecture.text_hidden_size ({full['text_hidden_size']}) must equal cross_attention_dim "
                   f"({full['cross_attention_dim']}): the UNet attends to the text encoder's hidden states")
    return out


def tokenizer_words() -> tuple[str, ...]:
    """Words a new model's tokenizer gives their own tokens: the fixture's and every captioned-shapes word."""
    from modules.fixtures.diffusion import WORDS
    from modules.shapes.vocabulary import vocabulary_words
    return tuple(dict.fromkeys((*WORDS, *vocabulary_words())))


def build_random_sd15(spec: dict, seed: int, vae_path: str | Path | None = None,
                      prediction_type: str = "epsilon"):
    """A StableDiffusionPipeline of SD 1.5's architecture at the sizes of *spec*, seeded; with *vae_path*
    the VAE is that trained one (its scale sets the UNet's latent size). *prediction_type* goes into the
    scheduler's config, so what it was trained to predict is what txt2img samples with (SD 2's v-models
    carry it the same way)."""
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

    from modules.fixtures.diffusion import VOCAB_SIZE, write_tokenizer
    a = {**ARCHITECTURE, **spec}
    with tempfile.TemporaryDirectory() as tmp:
        write_tokenizer(Path(tmp), words=tokenizer_words())     # a real CLIP BPE tokenizer made offline
        tokenizer = CLIPTokenizer.from_pretrained(tmp)
    torch.manual_seed(seed)
    if vae_path:
        vae = AutoencoderKL.from_pretrained(Path(vae_path).expanduser())
    else:
        vae = AutoencoderKL(block_out_channels=tuple(a["vae_block_out_channels"]),
                            down_block_types=("DownEncoderBlock2D",) * len(a["vae_block_out_channels"]),
                            up_block_types=("UpDecoderBlock2D",) * len(a["vae_block_out_channels"]),
                            latent_channels=4, layers_per_block=1, norm_num_groups=a["norm_num_groups"],
                            sample_size=a["sample_size"], scaling_factor=0.18215)
    scale = 2 ** (len(vae.config.block_out_channels) - 1)
    widths = a["unet_block_out_channels"]
    down = ["CrossAttnDownBlock2D"] * (len(widths) - 1) + ["DownBlock2D"]
    up = ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * (len(widths) - 1)
    unet = UNet2DConditionModel(block_out_channels=tuple(widths), layers_per_block=a["layers_per_block"],
                                sample_size=a["sample_size"] // scale, in_channels=vae.config.latent_channels,
                                out_channels=vae.config.latent_channels,
                                down_block_types=tuple(down), up_block_types=tuple(up),
                                cross_attention_dim=a["cross_attention_dim"],
                                attention_head_dim=a["attention_head_dim"], norm_num_groups=a["norm_num_groups"])
    text_config = CLIPTextConfig(hidden_size=a["text_hidden_size"], intermediate_size=4 * a["text_hidden_size"],
                                 num_attention_heads=a["text_heads"], num_hidden_layers=a["text_layers"],
                                 vocab_size=VOCAB_SIZE, max_position_embeddings=77, hidden_act="quick_gelu",
                                 projection_dim=a["cross_attention_dim"], bos_token_id=tokenizer.bos_token_id,
                                 eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    text_encoder = CLIPTextModel(text_config)
    scheduler = PNDMScheduler(beta_start=float(a["beta_start"]), beta_end=float(a["beta_end"]),
                              beta_schedule=a["beta_schedule"],
                              skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                              prediction_type=prediction_type)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def make_full_trainable(base, config) -> None:
    """Every UNet weight trains; the text encoder(s) too with ``train_text_encoder``; the VAE never."""
    base.pipe.unet.requires_grad_(True)
    base.trained["unet"] = base.pipe.unet
    if config.train_text_encoder:
        for name, encoder in base.text_encoders:
            encoder.requires_grad_(True)
            base.trained[name] = encoder


def write_sidecar(pipe, folder: Path) -> None:
    """The configs and tokenizers of *pipe* (no weights): what the loader needs for a single file whose
    sizes are not a standard model's."""
    folder.mkdir(parents=True, exist_ok=True)
    pipe.save_config(folder)
    for name, component in pipe.components.items():
        if component is None:
            continue
        if name.startswith("tokenizer"):
            component.save_pretrained(folder / name)
        elif hasattr(component, "save_config"):
            component.save_config(folder / name)
        elif hasattr(component, "config") and hasattr(component.config, "save_pretrained"):
            component.config.save_pretrained(folder / name)


def write_finetune_outputs(trainer, checkpoint_path: Path) -> list[Path]:
    """``final/`` (diffusers folder) and the single file + sidecar in models/Stable-diffusion."""
    from safetensors.torch import save_file

    from modules.diffusion.ldm_keys import pipeline_to_ldm
    from modules.training.images.kohya_format import write_atomic
    pipe = trainer.base.pipe
    final = trainer.run.final
    with tempfile.TemporaryDirectory(dir=trainer.run.root, prefix=".final-") as tmp:
        pipe.save_pretrained(tmp, safe_serialization=True)
        if final.exists():
            raise FileExistsError(f"{final} exists already; it was left as it is")
        Path(tmp).replace(final)
    sidecar = checkpoint_path.with_suffix("")
    state = pipeline_to_ldm(pipe, kind="sd2" if trainer.base.kind == "sd2" else None)
    written = write_atomic(checkpoint_path, lambda tmp: save_file(state, str(tmp), {"format": "pt"}))
    if not sidecar.exists():
        write_sidecar(pipe, sidecar)
    (final / "atelier-training.json").write_text(json.dumps({"run": trainer.run.name, "steps": trainer.step,
                                                             "checkpoint": str(written)}, indent=2))
    return [final, written]

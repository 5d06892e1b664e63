"""Loading a checkpoint into a diffusers pipeline, fully offline.

Why: diffusers' ``from_single_file`` fetches configs and tokenizers from the Hub
unless it is given a local ``config=`` folder (and even with
``local_files_only=True`` it may try the network when nothing is cached). We
therefore always assemble that folder ourselves, in a temporary directory:

1. the shipped component configs for the detected type, ``configs/diffusion/<sd1|sd2|sdxl>/``;
2. overridden by any ``model_index.json`` / ``<component>/config.json`` /
   ``scheduler/scheduler_config.json`` in the checkpoint's *sidecar folder*
   ``X/`` beside ``X.safetensors`` (that is how the toy-sized fixtures and
   unusual fine-tunes describe themselves);
3. tokenizer files, searched in order: the sidecar ``X/tokenizer/`` (and
   ``X/tokenizer_2/`` for SDXL), then ``tokenizer/`` / ``tokenizer_2/`` in the
   folder holding the checkpoint (shared by all checkpoints there), then the
   local Hugging Face cache (``openai/clip-vit-large-patch14``,
   ``stabilityai/stable-diffusion-xl-base-1.0``, …). If none is found the error
   names the files and folders to create.

Diffusers folders load with ``from_pretrained(local_files_only=True)``; their
tokenizer may come from the same search when the folder lacks one.
The safety checker is never loaded. A VAE from ``models/VAE`` can replace the
checkpoint's own (LDM-named single file, or a diffusers VAE folder).
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modules.diffusion.checkpoints import CheckpointInfo, detect_kind
from modules.safetensors_header import check_file, read_header

log = logging.getLogger(__name__)

CONFIGS_DIR = Path(__file__).resolve().parent.parent.parent / "configs" / "diffusion"
TOKENIZER_FILES = ("vocab.json", "merges.txt")
#: Hugging Face cache repos (and subfolders) that hold the tokenizers, tried in order.
HF_TOKENIZER_SOURCES = {
    ("sd1", "tokenizer"): [("stable-diffusion-v1-5/stable-diffusion-v1-5", "tokenizer"),
                           ("runwayml/stable-diffusion-v1-5", "tokenizer"), ("openai/clip-vit-large-patch14", "")],
    ("sd2", "tokenizer"): [("stabilityai/stable-diffusion-2-1", "tokenizer"),
                           ("stabilityai/stable-diffusion-2-1-base", "tokenizer")],
    ("sdxl", "tokenizer"): [("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer"),
                            ("openai/clip-vit-large-patch14", "")],
    ("sdxl", "tokenizer_2"): [("stabilityai/stable-diffusion-xl-base-1.0", "tokenizer_2"),
                              ("laion/CLIP-ViT-bigG-14-laion2B-39B-b160k", "")],
}


class MissingTokenizer(FileNotFoundError):
    """No tokenizer files for a checkpoint; the message says where to put them."""


class UnsafeCheckpoint(PermissionError):
    """A pickled checkpoint was refused because --allow-unsafe-pickle is off."""


@dataclass(eq=False)  # identity semantics: two loads of one checkpoint are two models
class SDModel:
    """A loaded checkpoint: the diffusers pipeline plus what the app needs to know about it."""
    pipe: Any
    kind: str
    is_inpaint: bool
    info: CheckpointInfo
    vae_name: str | None = None
    #: the checkpoint's own VAE while an override is applied (restored by ``apply_vae(sd, None)``)
    original_vae: Any = field(default=None, repr=False)
    #: where prompts' textual-inversion names are looked up (None: models/embeddings beside the checkpoints)
    embeddings_dir: Path | None = None
    #: embeddings already loaded into the tokenizers/text encoders: {name: A1111 short hash}
    loaded_embeddings: dict[str, str] = field(default_factory=dict)
    #: loaded under --allow-unsafe-pickle: pickled (.pt/.bin) embeddings may then be read, with weights_only
    allow_unsafe_pickle: bool = False
    #: "none", "medvram" (the manager parks the whole pipeline in CPU RAM between jobs) or "lowvram"
    #: (weights stay in CPU RAM; :func:`sequential_offload` moves each submodule to *device* for its forward)
    offload: str = "none"
    #: where the model computes (under lowvram the weights themselves stay on the CPU)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    #: "sdpa" or "xformers": the attention processors :func:`set_attention_backend` installed
    attention: str = "sdpa"

    def memory_bytes(self) -> int:
        """Bytes of the pipeline's weights (shared tensors counted once)."""
        from modules.weight_bytes import weight_bytes
        return weight_bytes(self.pipe)

    def to(self, device) -> "SDModel":
        """Move the pipeline (the model manager calls this to park idle models on CPU). Under lowvram the
        weights never leave CPU RAM, so there is nothing to move."""
        if self.offload != "lowvram":
            self.pipe.to(device)
        return self


def set_attention_backend(pipe, backend: str) -> str:
    """Install xformers' memory-efficient attention processors on the UNet and VAE when *backend* is
    "xformers" (what ``enable_xformers_memory_efficient_attention`` does, without its CUDA trial run);
    "sdpa" leaves diffusers' default (PyTorch scaled_dot_product_attention) untouched, as does "xformers"
    when xformers cannot be imported. Returns the backend actually installed."""
    from modules.devices import xformers_available
    if backend != "xformers" or not xformers_available():
        return "sdpa"
    from diffusers.models.attention_processor import XFormersAttnProcessor
    for name in ("unet", "vae"):
        component = getattr(pipe, name, None)
        if component is not None and hasattr(component, "set_attn_processor"):
            component.set_attn_processor(XFormersAttnProcessor())
    return "xformers"


@contextlib.contextmanager
def sequential_offload(model: SDModel):
    """--lowvram for the duration of a job's sampling and decoding (A1111's lowvram, diffusers'
    ``enable_sequential_cpu_offload``): accelerate hooks keep every submodule's weights in CPU RAM (the
    module itself holds meta tensors) and copy them to the execution device only for that submodule's
    forward, so at most one layer's weights are on the device at a time. Applied per job, after LoRAs and
    embeddings are in place (PEFT and textual inversion edit real weights), and removed afterwards, which
    puts the weights back in the modules. Without lowvram this does nothing."""
    if model.offload != "lowvram":
        yield
        return
    from accelerate import cpu_offload
    from accelerate.hooks import remove_hook_from_module
    modules = [m for m in model.pipe.components.values() if isinstance(m, torch.nn.Module)]
    hooked = []
    try:
        for module in modules:
            # buffers travel too: accelerate's buffer-less path fails on torch 2.13's Parameter class
            cpu_offload(module, model.device, offload_buffers=True)
            hooked.append(module)
        yield
    finally:
        for module in hooked:
            remove_hook_from_module(module, recurse=True)


def pipeline_class(kind: str, is_inpaint: bool):
    from diffusers import (StableDiffusionInpaintPipeline, StableDiffusionPipeline,
                           StableDiffusionXLInpaintPipeline, StableDiffusionXLPipeline)
    if kind == "sdxl":
        return StableDiffusionXLInpaintPipeline if is_inpaint else StableDiffusionXLPipeline
    return StableDiffusionInpaintPipeline if is_inpaint else StableDiffusionPipeline


def sidecar_dir(info: CheckpointInfo) -> Path:
    """``X/`` beside ``X.safetensors``: optional configs and tokenizers for that checkpoint."""
    path = Path(info.filename)
    return path.with_name(path.name[: -len(path.suffix)] if path.suffix else path.name)


# -- tokenizers ----------------------------------------------------------------------------------
def _has_tokenizer(folder: Path) -> bool:
    """CLIP tokenizer files: the classic vocab.json + merges.txt, or a fast-tokenizer tokenizer.json."""
    return all((folder / f).is_file() for f in TOKENIZER_FILES) or (folder / "tokenizer.json").is_file()


def _hf_cached_tokenizer(kind: str, name: str) -> Path | None:
    """Tokenizer files already in the local Hugging Face cache (``HF_HUB_CACHE`` read at call time)."""
    import os

    from huggingface_hub import try_to_load_from_cache
    cache_dir = os.environ.get("HF_HUB_CACHE") or None
    for repo, sub in HF_TOKENIZER_SOURCES.get((kind, name), []):
        prefix = f"{sub}/" if sub else ""
        found = [try_to_load_from_cache(repo, prefix + f, cache_dir=cache_dir) for f in TOKENIZER_FILES]
        if all(isinstance(p, str) for p in found):
            return Path(found[0]).parent
    return None


def find_tokenizer(info: CheckpointInfo, kind: str, name: str = "tokenizer") -> Path:
    """The folder with tokenizer files for *info* (*name* is ``tokenizer`` or ``tokenizer_2``)."""
    path = Path(info.filename)
    candidates = [path / name] if info.format == "diffusers" else []
    candidates += [sidecar_dir(info) / name, path.parent / name]
    for folder in candidates:
        if _has_tokenizer(folder):
            return folder
    cached = _hf_cached_tokenizer(kind, name)
    if cached is not None:
        return cached
    which = "the OpenCLIP ViT-bigG tokenizer (SDXL's tokenizer_2)" if name == "tokenizer_2" else "the CLIP tokenizer"
    raise MissingTokenizer(
        f"no {name} files for {info.name}: put {which} — {', '.join(TOKENIZER_FILES)} plus tokenizer_config.json "
        f"and special_tokens_map.json — into {candidates[-1]} (shared by every checkpoint in that folder) or "
        f"{sidecar_dir(info) / name} (this checkpoint only). They are the files of the '{name}' folder of the "
        f"model's diffusers repository, e.g. {HF_TOKENIZER_SOURCES[(kind, name)][0][0]}.")


def _tokenizer_names(kind: str) -> tuple[str, ...]:
    return ("tokenizer", "tokenizer_2") if kind == "sdxl" else ("tokenizer",)


# -- config folder -----------------------------------------------------------------------------------
def _overlay(src: Path, dst: Path) -> None:
    """Copy the JSON configs of *src* (a sidecar) over *dst*; weights and tokenizers are not copied."""
    for f in src.rglob("*.json"):
        rel = f.relative_to(src)
        if rel.parts[0].startswith("tokenizer"):
            continue
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(f, dst / rel)


def build_config_dir(info: CheckpointInfo, kind: str, is_inpaint: bool, dest: Path) -> Path:
    """Assemble the diffusers-layout folder ``from_single_file(config=...)`` needs, under *dest*."""
    base = CONFIGS_DIR / kind
    if not base.is_dir():
        raise ValueError(f"no shipped configs for model type {kind!r} (looked in {base})")
    shutil.copytree(base, dest, dirs_exist_ok=True)
    sidecar = sidecar_dir(info)
    if sidecar.is_dir():
        _overlay(sidecar, dest)
    for name in _tokenizer_names(kind):
        shutil.copytree(find_tokenizer(info, kind, name), dest / name, dirs_exist_ok=True)
    index_file = dest / "model_index.json"
    index = json.loads(index_file.read_text())
    index["_class_name"] = pipeline_class(kind, is_inpaint).__name__
    for key in ("safety_checker", "feature_extractor", "image_encoder"):
        if key in index:
            index[key] = [None, None]
    index_file.write_text(json.dumps(index, indent=2))
    if is_inpaint:
        unet_file = dest / "unet" / "config.json"
        unet = json.loads(unet_file.read_text())
        unet["in_channels"] = 9
        unet_file.write_text(json.dumps(unet, indent=2))
    return dest


# -- loading ----------------------------------------------------------------------------------------
def _single_file_kind(info: CheckpointInfo, allow_unsafe_pickle: bool) -> tuple[str, bool]:
    if info.kind is not None:
        return info.kind, info.is_inpaint
    if info.is_pickle:
        state = _load_pickle(Path(info.filename), allow_unsafe_pickle)
        kind, inpaint = detect_kind({k: tuple(v.shape) for k, v in state.items() if hasattr(v, "shape")})
    else:
        kind, inpaint = detect_kind(read_header(info.filename).shapes())
    if kind is None:
        raise ValueError(f"{info.name}: cannot tell whether this is an SD1, SD2 or SDXL checkpoint from its keys")
    return kind, inpaint


def _load_pickle(path: Path, allow_unsafe_pickle: bool) -> dict:
    if not allow_unsafe_pickle:
        raise UnsafeCheckpoint(f"{path.name} is a pickled checkpoint, which can run code when loaded; convert it to "
                               "safetensors, or start with --allow-unsafe-pickle if you trust its source")
    state = torch.load(path, map_location="cpu", weights_only=True)
    while isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def _pipe_kwargs(cls) -> dict:
    from diffusers import StableDiffusionInpaintPipeline, StableDiffusionPipeline
    if cls in (StableDiffusionPipeline, StableDiffusionInpaintPipeline):
        return {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False}
    return {}


def sd2_uses_v_prediction(unet) -> bool:
    """A1111's probe for SD 2.x: a v-prediction UNet, fed a flat latent at t=999 with a flat context,
    answers far below the input (mean difference < -1); an epsilon UNet does not."""
    param = next(unet.parameters())
    with torch.no_grad():
        x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, device=param.device, dtype=param.dtype)
        cond = torch.full((1, 2, unet.config.cross_attention_dim), 0.5, device=param.device, dtype=param.dtype)
        out = unet(x, torch.tensor([999], device=param.device), encoder_hidden_states=cond).sample
    return (out.float() - x[:, :out.shape[1]].float()).mean().item() < -1


def _sd2_prediction_type(info: CheckpointInfo, pipe) -> str | None:
    """v or epsilon for an SD 2.x single file: ``X.yaml`` beside it (A1111's override), then a sidecar
    scheduler config, then the probe. None means "leave the scheduler as configured"."""
    yaml_file = Path(info.filename).with_suffix(".yaml")
    if yaml_file.is_file():
        text = yaml_file.read_text(errors="replace")
        is_v = any(f"parameterization: {q}v{q}" in text for q in ('"', "'", ""))
        return "v_prediction" if is_v else "epsilon"
    if (sidecar_dir(info) / "scheduler" / "scheduler_config.json").is_file():
        return None
    return "v_prediction" if sd2_uses_v_prediction(pipe.unet) else "epsilon"


def load_sd_model(info: CheckpointInfo, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
                  vae_path: str | Path | None = None, allow_unsafe_pickle: bool = False,
                  embeddings_dir: str | Path | None = None, vae_dtype: torch.dtype | None = None,
                  attention: str = "sdpa", offload: str = "none") -> SDModel:
    """Load *info* into a diffusers pipeline on *device* in *dtype*, without any network access.

    *vae_dtype* (``--no-half-vae``: fp32) keeps the VAE in another precision than the rest; *attention*
    "xformers" installs xformers' processors; *offload* "lowvram" keeps the weights in CPU RAM (see
    :func:`sequential_offload`).

    Raises ValueError for a broken or unknown checkpoint, UnsafeCheckpoint for a pickle without
    *allow_unsafe_pickle*, and MissingTokenizer (with instructions) when no tokenizer is found.
    """
    from safetensors import SafetensorError
    if info.error:
        raise ValueError(f"checkpoint {info.name} cannot be loaded: {info.error}")
    if info.is_pickle and not allow_unsafe_pickle:
        _load_pickle(Path(info.filename), allow_unsafe_pickle)  # raises UnsafeCheckpoint
    if info.format == "diffusers":
        kind, inpaint = info.kind or "sd1", info.is_inpaint
        for weights in sorted(Path(info.filename).rglob("*.safetensors")):
            check_file(weights)  # a damaged component file fails here, with its name, not inside diffusers
        cls = pipeline_class(kind, inpaint)
        extra = {}
        for name in _tokenizer_names(kind):
            if not _has_tokenizer(Path(info.filename) / name):
                from transformers import CLIPTokenizer
                extra[name] = CLIPTokenizer.from_pretrained(find_tokenizer(info, kind, name), local_files_only=True)
        pipe = cls.from_pretrained(info.filename, dtype=dtype, local_files_only=True,
                                   **_pipe_kwargs(cls), **extra)
    else:
        if not info.is_pickle:
            check_file(info.filename)  # it may have changed since it was listed; BrokenModelFile is a ValueError
        kind, inpaint = _single_file_kind(info, allow_unsafe_pickle)
        cls = pipeline_class(kind, inpaint)
        with tempfile.TemporaryDirectory(prefix="atelier-sdconfig-") as tmp:
            config_dir = build_config_dir(info, kind, inpaint, Path(tmp) / "config")
            try:
                pipe = cls.from_single_file(info.filename, config=str(config_dir), local_files_only=True,
                                            dtype=dtype, **_pipe_kwargs(cls))
            except (ValueError, KeyError, RuntimeError, TypeError, IndexError, SafetensorError) as exc:
                raise ValueError(f"{info.name} looks like an {kind} checkpoint but could not be loaded with the "
                                 f"{kind} configs ({type(exc).__name__}: {exc}). If it is a fine-tune with a "
                                 f"different architecture, put its diffusers configs in {sidecar_dir(info)}/"
                                 ) from exc
        if kind == "sd2" and not inpaint:
            prediction = _sd2_prediction_type(info, pipe)
            if prediction and prediction != pipe.scheduler.config.get("prediction_type"):
                pipe.register_modules(scheduler=type(pipe.scheduler).from_config(pipe.scheduler.config,
                                                                                 prediction_type=prediction))
    pipe.set_progress_bar_config(disable=True)
    if vae_dtype is not None and vae_dtype != dtype:
        pipe.vae.to(dtype=vae_dtype)
    attention = set_attention_backend(pipe, attention)
    pipe.to("cpu" if offload == "lowvram" else device)
    model = SDModel(pipe=pipe, kind=kind, is_inpaint=inpaint, info=info,
                    embeddings_dir=Path(embeddings_dir) if embeddings_dir else None,
                    allow_unsafe_pickle=allow_unsafe_pickle, offload=offload,
                    device=torch.device(device), attention=attention)
    if vae_path is not None:
        apply_vae(model, vae_path, allow_unsafe_pickle=allow_unsafe_pickle)
    log.info("loaded %s (%s%s, %s) on %s", info.title, kind, ", inpainting" if inpaint else "", info.format, device)
    return model


def load_vae(path: str | Path, like, *, allow_unsafe_pickle: bool = False):
    """An ``AutoencoderKL`` from *path* (LDM single file or diffusers folder) shaped like VAE *like*."""
    from diffusers import AutoencoderKL
    from diffusers.loaders.single_file_utils import convert_ldm_vae_checkpoint
    path = Path(path)
    dtype = next(like.parameters()).dtype
    if path.is_dir():
        return AutoencoderKL.from_pretrained(path, dtype=dtype, local_files_only=True)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file
        check_file(path)
        state = load_file(str(path))
    else:
        state = _load_pickle(path, allow_unsafe_pickle)
    state = {k.removeprefix("first_stage_model."): v for k, v in state.items()}
    vae = AutoencoderKL.from_config(like.config)
    if any(k.startswith("encoder.down_blocks.") for k in state):  # already diffusers-named
        expected = set(vae.state_dict())
        converted = {k: v for k, v in state.items() if k in expected or k.startswith(("encoder.", "decoder."))}
    else:  # LDM names; training leftovers (model_ema.*, loss.*) are not VAE weights and are dropped
        converted = convert_ldm_vae_checkpoint(state, dict(like.config))
    missing, unexpected = vae.load_state_dict(converted, strict=False)
    if missing or unexpected:
        raise ValueError(f"VAE {path.name} does not fit this checkpoint: {len(missing)} missing weights "
                         f"(e.g. {missing[:2]}), {len(unexpected)} unexpected (e.g. {unexpected[:2]}); "
                         "pick a VAE made for this model type")
    return vae.to(dtype=dtype).eval()


def apply_vae(model: SDModel, vae_path: str | Path | None, *, allow_unsafe_pickle: bool = False) -> None:
    """Swap the pipeline's VAE for the one at *vae_path*; ``None`` restores the checkpoint's own."""
    pipe = model.pipe
    if vae_path is None:
        if model.original_vae is not None:
            pipe.register_modules(vae=model.original_vae)
            model.original_vae, model.vae_name = None, None
        return
    device = pipe.vae.device
    vae = load_vae(vae_path, pipe.vae, allow_unsafe_pickle=allow_unsafe_pickle).to(device)
    if model.original_vae is None:
        model.original_vae = pipe.vae
    pipe.register_modules(vae=vae)
    set_attention_backend(pipe, model.attention)
    model.vae_name = Path(vae_path).name

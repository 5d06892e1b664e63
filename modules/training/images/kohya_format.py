"""kohya-format LoRA files: a trained peft LoRA out to ``.safetensors``, and a file back into peft.

Why this format: it is what A1111, Forge, ComfyUI, diffusers' ``load_lora_weights`` and every LoRA
site read (ComfyUI rejects diffusers' own layout, diffusers #10860). A file holds, per trained layer,
``<name>.lora_down.weight`` ``[r, in(, kh, kw)]``, ``<name>.lora_up.weight`` ``[out, r(, 1, 1)]`` and
``<name>.alpha`` (a scalar); the layer adds ``up(down(x)) · alpha / r``. peft adds
``B(A(x)) · lora_alpha / r`` (``/ √r`` with rsLoRA) with the same shapes, so down = A, up = B and
alpha = peft's scale × r; nothing is approximated. Names come from :mod:`lora_targets`.

Why our own code: diffusers converts kohya → diffusers only inside ``load_lora_weights`` (private
helpers, string heuristics, into a pipeline) and has no peft → kohya writer for SD 1.5/SDXL; its
``convert_state_dict_to_kohya`` keeps diffusers' SDXL names, not the SGM names sd-scripts writes.

Hashes. kohya stores ``sshs_model_hash`` (sha256 of the tensor bytes after the header; the hash A1111
shows for a LoRA) and ``sshs_legacy_hash`` (first 8 hex of the sha256 of the 64 KiB at offset 1 MiB),
both computed on a serialisation holding only the ``ss_*`` metadata, so editing other metadata later
changes neither. The model hash equals the written file's, because metadata never changes tensor bytes.

Writing never leaves a half-written file under the final name, and never replaces an existing file
unless asked (``if_exists``).
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import tempfile
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from modules.training.images.lora_targets import COMPONENTS, is_sdxl_unet, kohya_names, layers, prefixes

KOHYA_PREFIXES = ("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")
PARTS = ("lora_down.weight", "lora_up.weight", "alpha")
IF_EXISTS = ("error", "number", "replace")


class KohyaFormatError(ValueError):
    """A LoRA cannot be written or read in kohya format; the message names the file or layer."""


class LoraExistsError(FileExistsError):
    """The output file exists already and was left untouched."""


class LoraWriteError(RuntimeError):
    """The file could not be written (a full disk, no permission); nothing under the final name changed."""


@dataclass
class PeftLora:
    """One component's LoRA in peft terms: the ``LoraConfig`` and its state (``<path>.lora_A.weight`` …)."""
    config: object
    state: dict[str, torch.Tensor]


def pipeline_components(pipe) -> dict[str, torch.nn.Module]:
    """The UNet and text encoders of a diffusers pipeline, by their pipeline names."""
    return {name: getattr(pipe, name) for name in COMPONENTS if getattr(pipe, name, None) is not None}


def unwrap_peft(model: torch.nn.Module) -> torch.nn.Module:
    from peft import PeftModel
    return model.get_base_model() if isinstance(model, PeftModel) else model


def components_sdxl(components: Mapping[str, torch.nn.Module], sdxl: bool | None) -> bool:
    if sdxl is not None:
        return sdxl
    if "unet" in components:
        return is_sdxl_unet(unwrap_peft(components["unet"]))
    return "text_encoder_2" in components


# ---- peft -> kohya -------------------------------------------------------------------------------

def _check_exportable(layer, adapter: str, where: str) -> None:
    problems = []
    if layer.use_dora.get(adapter):
        problems.append("it uses DoRA (diffusers drops kohya's dora_scale, so the file would not load as trained)")
    if layer.lora_bias.get(adapter):
        problems.append("it has a LoRA bias (kohya files have none)")
    if getattr(layer, "fan_in_fan_out", False):
        problems.append("it is a fan-in/fan-out (Conv1D) layer")
    base = layer.get_base_layer()
    if not isinstance(base, (torch.nn.Linear, torch.nn.Conv2d)):
        problems.append(f"its base layer is a {type(base).__name__}, not a Linear or Conv2d")
    elif isinstance(base, torch.nn.Conv2d) and base.groups != 1:
        problems.append("it is a grouped convolution")
    if problems:
        raise KohyaFormatError(f"LoRA layer {where} cannot be written in kohya format: {'; '.join(problems)}")


def peft_to_kohya(components: Mapping[str, torch.nn.Module], *, adapter_name: str = "default",
                  dtype: torch.dtype | None = None, sdxl: bool | None = None) -> dict[str, torch.Tensor]:
    """The kohya state dict of the peft adapter *adapter_name* in *components* (``{"unet": …,
    "text_encoder": …, "text_encoder_2": …}``, any subset; see :func:`pipeline_components`).

    *dtype* casts the saved tensors (kohya's ``--save_precision``); by default they keep the trained dtype.
    *sdxl* picks the names (te1/te2 and SGM UNet names); by default it is read from the UNet.
    """
    from peft.tuners.lora import LoraLayer
    sdxl = components_sdxl(components, sdxl)
    out: dict[str, torch.Tensor] = {}
    for component, model in components.items():
        model = unwrap_peft(model)
        names = None
        for path, layer in model.named_modules():
            if not isinstance(layer, LoraLayer) or adapter_name not in layer.lora_A:
                continue
            _check_exportable(layer, adapter_name, f"{component}.{path}")
            names = names or kohya_names(component, model, sdxl=sdxl)
            rank, alpha = layer.r[adapter_name], float(layer.lora_alpha[adapter_name])
            if layer.use_rslora.get(adapter_name):  # peft scales by alpha/√r; kohya by alpha/r
                alpha *= rank ** 0.5
            name = names[path]
            for part, tensor in (("lora_down.weight", layer.lora_A[adapter_name].weight),
                                 ("lora_up.weight", layer.lora_B[adapter_name].weight)):
                out[f"{name}.{part}"] = tensor.detach().to("cpu", dtype or tensor.dtype).contiguous().clone()
            out[f"{name}.alpha"] = torch.tensor(alpha, dtype=dtype or torch.float32)
    if not out:
        raise KohyaFormatError(f"no LoRA adapter named {adapter_name!r} in {', '.join(components) or 'no components'}; "
                               "inject one with peft (e.g. unet.add_adapter(LoraConfig(...))) before saving")
    return out


# ---- hashes and files ----------------------------------------------------------------------------

def kohya_hashes(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str]) -> tuple[str, str]:
    """``(sshs_model_hash, sshs_legacy_hash)`` as sd-scripts computes them at save time."""
    from safetensors.torch import save
    blob = save(dict(tensors), {k: v for k, v in metadata.items() if k.startswith("ss_")})
    header_len = int.from_bytes(blob[:8], "little")
    model_hash = hashlib.sha256(memoryview(blob)[8 + header_len:]).hexdigest()
    legacy_hash = hashlib.sha256(memoryview(blob)[0x100000:0x110000]).hexdigest()[:8]
    return model_hash, legacy_hash


def _check_state(tensors: Mapping[str, torch.Tensor]) -> None:
    problems, groups = [], {}
    for key in tensors:
        name, _, part = key.partition(".")
        if not key.startswith(KOHYA_PREFIXES) or part not in PARTS:
            problems.append(f"{key!r} is not a kohya LoRA key "
                            "(<lora_unet_|lora_te…>.lora_down.weight/.lora_up.weight/.alpha)")
        else:
            groups.setdefault(name, set()).add(part)
    problems += [f"{name} lacks {', '.join(sorted(set(PARTS) - parts))}" for name, parts in groups.items()
                 if parts != set(PARTS)]
    if not tensors:
        problems.append("there are no tensors")
    if problems:
        raise KohyaFormatError("Refusing to write a kohya LoRA that loaders would reject: " + "; ".join(problems[:10]))


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # not every platform opens folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _candidates(path: Path):
    yield path
    for n in range(2, 10_000):
        yield path.with_name(f"{path.stem}-{n}{path.suffix}")


def _publish(tmp: Path, path: Path, if_exists: str) -> Path:
    """Give the finished *tmp* its final name: a hard link never replaces a file that appeared meanwhile."""
    if if_exists == "replace":
        os.replace(tmp, path)
        return path
    for target in _candidates(path):
        try:
            os.link(tmp, target)
            return target
        except FileExistsError:
            if if_exists == "error":
                break
        except OSError as exc:
            if exc.errno not in (errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EXDEV, errno.EMLINK):
                raise
            if not target.exists():  # no hard links here (FAT, some network shares): check, then rename
                os.replace(tmp, target)
                return target
            if if_exists == "error":
                break
    raise _exists(path)


def _exists(path: Path) -> LoraExistsError:
    return LoraExistsError(f"{path} already exists and was left as it is; choose another output name, or "
                           "allow a numbered name (if_exists='number') or replacing it (if_exists='replace')")


def write_atomic(path: str | Path, write: Callable[[Path], None], *, if_exists: str = "error") -> Path:
    """Run ``write(tmp_path)``, fsync, then publish under *path* (see :data:`IF_EXISTS`); returns the path used."""
    if if_exists not in IF_EXISTS:
        raise ValueError(f"if_exists must be one of {', '.join(IF_EXISTS)}, got {if_exists!r}")
    path = Path(path)
    if if_exists == "error" and path.exists():
        raise _exists(path)  # before any work is done
    tmp = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(prefix=f".{path.stem}.", suffix=".tmp", dir=path.parent)
        os.close(fd)
        tmp = Path(name)
        write(tmp)
        with open(tmp, "rb+") as fh:
            os.fsync(fh.fileno())
        final = _publish(tmp, path, if_exists)
        _fsync_dir(path.parent)
        return final
    except OSError as exc:
        if isinstance(exc, FileExistsError):
            raise
        why = "the disk is full" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else str(exc)
        raise LoraWriteError(f"{path} could not be written ({why}); no file under that name was changed. "
                             "Free some space or choose another folder, then save again.") from exc
    finally:
        if tmp is not None:
            tmp.unlink(missing_ok=True)


def save_kohya_lora(path: str | Path, tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], *,
                    if_exists: str = "error") -> Path:
    """Write *tensors* (from :func:`peft_to_kohya`) with *metadata* (``ss_*`` and others, all strings)
    plus ``sshs_model_hash``/``sshs_legacy_hash``; returns the path written."""
    from safetensors.torch import save_file
    _check_state(tensors)
    bad = [k for k, v in metadata.items() if not isinstance(k, str) or not isinstance(v, str)]
    if bad:
        raise KohyaFormatError(f"safetensors metadata values must be strings; not so for {', '.join(map(str, bad))}")
    model_hash, legacy_hash = kohya_hashes(tensors, metadata)
    header = {**metadata, "sshs_model_hash": model_hash, "sshs_legacy_hash": legacy_hash}
    return write_atomic(path, lambda tmp: save_file(dict(tensors), str(tmp), header), if_exists=if_exists)


def read_kohya_lora(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(tensors, metadata)`` of a safetensors LoRA file."""
    from safetensors import SafetensorError, safe_open
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as fh:
            return {k: fh.get_tensor(k) for k in fh.keys()}, dict(fh.metadata() or {})
    except (SafetensorError, OSError) as exc:
        raise KohyaFormatError(f"{path} is not a readable safetensors LoRA ({exc})") from exc


# ---- kohya -> peft -------------------------------------------------------------------------------

def _expected_shapes(layer: torch.nn.Module, rank: int) -> tuple[tuple, tuple]:
    if isinstance(layer, torch.nn.Linear):
        return (rank, layer.in_features), (layer.out_features, rank)
    return (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1)


def _index(components: Mapping[str, torch.nn.Module], sdxl: bool) -> dict[str, tuple[str, str, torch.nn.Module]]:
    """kohya name -> (component, path, layer); the UNet under both layouts (other trainers write SDXL
    files with diffusers names)."""
    index = {}
    for component, model in components.items():
        if component not in prefixes(sdxl):
            continue
        model = unwrap_peft(model)
        found = dict(layers(model))
        layouts = ("sgm", "diffusers") if component == "unet" else (None,)
        for layout in layouts:
            for path, name in kohya_names(component, model, sdxl=sdxl, layout=layout).items():
                index.setdefault(name, (component, path, found[path]))
    return index


def _group(tensors: Mapping[str, torch.Tensor], problems: list[str]) -> dict[str, dict[str, torch.Tensor]]:
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        name, _, part = key.partition(".")
        if part in PARTS:
            groups.setdefault(name, {})[part] = value
        elif part == "dora_scale":
            problems.append(f"{key}: DoRA layers cannot continue as a plain LoRA")
        elif part.startswith(("hada_", "lokr_", "oft_", "diff")):
            problems.append(f"{key}: a LyCORIS (LoHa/LoKr/OFT/full) layer, not a LoRA")
        else:
            problems.append(f"{key}: not a LoRA key (expected <layer>.lora_down.weight, .lora_up.weight or .alpha)")
    return groups


def _config(entries: list[tuple[str, int, float]], dropout: float):
    from peft import LoraConfig
    rank = Counter(r for _, r, _ in entries).most_common(1)[0][0]
    alpha = Counter(a for _, _, a in entries).most_common(1)[0][0]
    return LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout,
                      target_modules=[path for path, _, _ in entries],
                      rank_pattern={re.escape(p): r for p, r, _ in entries if r != rank},
                      alpha_pattern={re.escape(p): a for p, _, a in entries if a != alpha})


def kohya_to_peft(tensors: Mapping[str, torch.Tensor], components: Mapping[str, torch.nn.Module], *,
                  sdxl: bool | None = None, dropout: float = 0.0, source: str = "the LoRA") -> dict[str, PeftLora]:
    """The peft form of a kohya state dict for *components*: {component: PeftLora} for those it touches.

    Every key must name a layer of these components with matching shapes; all problems are reported
    at once (*source* names the file in the message). A missing or zero alpha means alpha = rank, as in kohya.
    """
    sdxl = components_sdxl(components, sdxl)
    other = ("lora_te_",) if sdxl else ("lora_te1_", "lora_te2_")
    if any(key.startswith(other) for key in tensors):  # one clear line instead of one per layer
        made_for, model = ("SD 1.x/2.x", "SDXL") if sdxl else ("SDXL", "SD 1.x/2.x")
        raise KohyaFormatError(f"{source} was made for {made_for} (it has {' / '.join(other)} keys); "
                               f"this is an {model} model. Pick a LoRA or base model of the same type.")
    problems: list[str] = []
    groups = _group(tensors, problems)
    index = _index(components, sdxl)
    per_component: dict[str, list[tuple[str, int, float]]] = {}
    states: dict[str, dict[str, torch.Tensor]] = {}
    seen: dict[tuple[str, str], str] = {}
    for name, parts in groups.items():
        if "lora_down.weight" not in parts or "lora_up.weight" not in parts:
            problems.append(f"{name}: needs both lora_down.weight and lora_up.weight")
            continue
        if name not in index:
            kind = "SDXL" if sdxl else "SD 1.x/2.x"
            problems.append(f"{name}: no such layer in this {kind} model")
            continue
        component, path, layer = index[name]
        if (component, path) in seen:
            problems.append(f"{name}: the same layer as {seen[component, path]}")
            continue
        seen[component, path] = name
        down, up = parts["lora_down.weight"], parts["lora_up.weight"]
        rank = down.shape[0] if down.ndim else 0
        want_down, want_up = _expected_shapes(layer, rank)
        if tuple(down.shape) != want_down or tuple(up.shape) != want_up:
            problems.append(f"{name}: shapes {tuple(down.shape)}/{tuple(up.shape)} do not fit this layer "
                            f"(expected {want_down}/{want_up})")
            continue
        alpha = float(parts["alpha"].item()) if "alpha" in parts else 0.0
        per_component.setdefault(component, []).append((path, rank, alpha or float(rank)))
        states.setdefault(component, {}).update({f"{path}.lora_A.weight": down, f"{path}.lora_B.weight": up})
    if not groups and not problems:
        problems.append("it holds no LoRA layers")
    if problems:
        more = f"\n  … and {len(problems) - 20} more" if len(problems) > 20 else ""
        raise KohyaFormatError(f"{source} cannot be loaded as a LoRA of this model:\n  "
                               + "\n  ".join(problems[:20]) + more)
    return {c: PeftLora(_config(entries, dropout), states[c]) for c, entries in per_component.items()}


def inject(model: torch.nn.Module, config, adapter_name: str = "default") -> None:
    """Add a peft LoRA adapter to a diffusers or transformers model.

    Why not always ``model.add_adapter``: diffusers' keeps its adapter bookkeeping (``set_adapters``,
    ``disable_adapters``), so the UNet uses it; transformers 5's refuses peft < 0.22, so text encoders
    get peft's own ``inject_adapter_in_model``, which also records ``model.peft_config``.
    """
    from diffusers import ModelMixin
    from peft import inject_adapter_in_model
    if isinstance(model, ModelMixin):
        model.add_adapter(config, adapter_name=adapter_name)
    else:
        inject_adapter_in_model(config, model, adapter_name=adapter_name)


def load_kohya_into_peft(components: Mapping[str, torch.nn.Module], source, *, adapter_name: str = "default",
                         sdxl: bool | None = None, dropout: float = 0.0) -> dict[str, str]:
    """Inject the kohya LoRA *source* (a path or a state dict) into *components* as the peft adapter
    *adapter_name*, with its weights, ready to train on; returns the file's metadata (``{}`` for a dict).

    This is how a run continues from a kohya LoRA (its own earlier output or one from elsewhere).
    """
    from peft import set_peft_model_state_dict
    if isinstance(source, Mapping):
        tensors, metadata, where = source, {}, "the LoRA"
    else:
        (tensors, metadata), where = read_kohya_lora(source), str(source)
    loras = kohya_to_peft(tensors, components, sdxl=sdxl, dropout=dropout, source=where)
    taken = [c for c in loras if adapter_name in (getattr(unwrap_peft(components[c]), "peft_config", None) or {})]
    if taken:  # checked before anything is injected
        raise KohyaFormatError(f"{', '.join(taken)} already has an adapter named {adapter_name!r}; pick another name")
    for component, lora in loras.items():
        model = unwrap_peft(components[component])
        inject(model, lora.config, adapter_name)
        result = set_peft_model_state_dict(model, lora.state, adapter_name=adapter_name)
        missing = [k for k in result.missing_keys if "lora_" in k and f".{adapter_name}." in k]
        if result.unexpected_keys or missing:
            raise KohyaFormatError(f"{where}: {component} did not take the LoRA weights exactly "
                                   f"(unexpected {result.unexpected_keys[:5]}, missing {missing[:5]})")
    return metadata


def save_peft_as_kohya(path: str | Path, components: Mapping[str, torch.nn.Module], metadata: Mapping[str, str], *,
                       adapter_name: str = "default", dtype: torch.dtype | None = None, sdxl: bool | None = None,
                       if_exists: str = "error") -> Path:
    """:func:`peft_to_kohya` then :func:`save_kohya_lora`: the trained adapter as a kohya file at *path*."""
    tensors = peft_to_kohya(components, adapter_name=adapter_name, dtype=dtype, sdxl=sdxl)
    return save_kohya_lora(path, tensors, metadata, if_exists=if_exists)

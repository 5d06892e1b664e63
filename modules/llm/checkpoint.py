"""Hugging Face model folders: load weights into :class:`~modules.llm.model.Llama`, and write them back.

A folder holds ``config.json`` and its weights as ``model.safetensors``, or shards listed in
``model.safetensors.index.json``. Safetensors files are memory-mapped (``safe_open``) and read one
tensor at a time, cast straight to the requested dtype and device, so loading never holds two copies
of the model. Pickled ``pytorch_model.bin`` files can run code when unpickled; they load only when the
caller passes ``allow_unsafe_pickle=True`` (the ``--allow-unsafe-pickle`` flag), and then with
``torch.load(weights_only=True)``.

Before any tensor is read, the key set is checked strictly (missing and unexpected keys are named)
and every shape is compared with the config, so a wrong or truncated download fails fast and clearly.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Iterator

import torch

from modules.llm.config import LlamaConfig
from modules.llm.model import Llama
from modules.weight_bytes import tensors_bytes

log = logging.getLogger(__name__)

SAFETENSORS = "model.safetensors"
SAFETENSORS_INDEX = "model.safetensors.index.json"
PICKLE = "pytorch_model.bin"
PICKLE_INDEX = "pytorch_model.bin.index.json"
#: Tokenizer and generation files copied along when a model is saved.
SIDE_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
              "generation_config.json")
#: Keys some checkpoints carry that are derived state, not weights.
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


class CheckpointError(ValueError):
    """A model folder that cannot be loaded; the message says which file and what to do."""


# ------------------------------------------------------------------------------------ weight sources
def weight_files(folder: Path, allow_unsafe_pickle: bool = False) -> list[Path]:
    """The weight files of ``folder``, safetensors preferred; errors name what is missing."""
    for index_name, single in ((SAFETENSORS_INDEX, SAFETENSORS), (PICKLE_INDEX, PICKLE)):
        pickled = single == PICKLE
        if (folder / index_name).is_file():
            files = _files_from_index(folder / index_name)
        elif (folder / single).is_file():
            files = [folder / single]
        else:
            continue
        if pickled and not allow_unsafe_pickle:
            raise CheckpointError(
                f"{folder} has only pickled weights ({files[0].name}). Pickle files can run arbitrary code "
                "when loaded, so Atelier refuses them by default. Convert the model to safetensors, or start "
                "with --allow-unsafe-pickle if you trust the file (it is then read with weights_only=True).")
        return files
    raise CheckpointError(f"No weights in {folder}: expected {SAFETENSORS} (or shards listed in "
                          f"{SAFETENSORS_INDEX}); {PICKLE} is accepted with --allow-unsafe-pickle.")


def _files_from_index(index_path: Path) -> list[Path]:
    try:
        weight_map = json.loads(index_path.read_text(encoding="utf-8"))["weight_map"]
    except (json.JSONDecodeError, KeyError, TypeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{index_path} is not a valid shard index (needs a 'weight_map' object): "
                              f"{exc}") from exc
    files = [index_path.parent / name for name in dict.fromkeys(weight_map.values())]
    missing = [f.name for f in files if not f.is_file()]
    if missing:
        raise CheckpointError(f"{index_path.name} lists shard(s) that are not in {index_path.parent}: "
                              f"{', '.join(missing)}. Download every shard.")
    return files


class CheckpointReader:
    """Uniform access to tensor names, shapes and values across safetensors and pickle files.

    Public because the GGUF exporter reads checkpoints through it too: one reader, one set of key checks."""

    def __init__(self, files: list[Path]):
        self.files = files
        self.location: dict[str, Path] = {}
        self._pickles: dict[Path, dict[str, torch.Tensor]] = {}
        self._headers: dict[Path, dict[str, tuple[int, ...]]] = {}
        for path in files:
            for name in self._names(path):
                self.location[name] = path

    def _header_shapes(self, path: Path) -> dict[str, tuple[int, ...]]:
        """The tensor shapes of a safetensors file, from the checked header (a damaged file fails here)."""
        if path not in self._headers:
            from modules.safetensors_header import BrokenModelFile, read_header
            try:
                self._headers[path] = read_header(path).shapes()
            except BrokenModelFile as exc:
                raise CheckpointError(f"{path.parent}: weight file {exc}") from None
        return self._headers[path]

    def _names(self, path: Path) -> list[str]:
        if path.suffix == ".safetensors":
            return list(self._header_shapes(path))
        return list(self._pickle(path))

    def _pickle(self, path: Path) -> dict[str, torch.Tensor]:
        if path not in self._pickles:
            import pickle
            import zipfile
            try:
                try:
                    data = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
                except RuntimeError as exc:    # files from before torch 1.6's zip format cannot be mapped
                    if "mmap" not in str(exc):
                        raise
                    data = torch.load(path, map_location="cpu", weights_only=True)
            except pickle.UnpicklingError as exc:
                raise CheckpointError(f"{path} was refused by the safe unpickler (weights_only=True): it holds "
                                      f"more than tensors ({str(exc).splitlines()[0][:200]})") from None
            except (EOFError, RuntimeError, OSError, zipfile.BadZipFile) as exc:
                raise CheckpointError(f"{path} is not a readable PyTorch weight file ({type(exc).__name__}: "
                                      f"{exc}); download it again") from None
            if not isinstance(data, dict):
                raise CheckpointError(f"{path} does not hold a state dict (found {type(data).__name__})")
            self._pickles[path] = data
        return self._pickles[path]

    def shapes(self) -> dict[str, tuple[int, ...]]:
        out: dict[str, tuple[int, ...]] = {}
        for path in self.files:
            if path.suffix == ".safetensors":
                out.update(self._header_shapes(path))
            else:
                out.update({k: tuple(v.shape) for k, v in self._pickle(path).items()})
        return out

    def tensors(self, names: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
        for path in self.files:
            if path.suffix == ".safetensors":
                from safetensors import safe_open
                with safe_open(str(path), framework="pt") as f:
                    for name in f.keys():
                        if name in names:
                            yield name, f.get_tensor(name)
            else:
                for name, tensor in self._pickle(path).items():
                    if name in names:
                        yield name, tensor


# ------------------------------------------------------------------------------------------ loading
def expected_shapes(model: Llama) -> dict[str, tuple[int, ...]]:
    """State-dict keys and shapes a checkpoint must provide (a tied lm_head is optional in the file)."""
    return {k: tuple(v.shape) for k, v in model.state_dict(keep_vars=True).items()}


def load_model(folder: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               allow_unsafe_pickle: bool = False, config: LlamaConfig | None = None) -> Llama:
    """Build the model described by ``folder/config.json`` and load its weights, cast to ``dtype``.

    A folder saved by :func:`modules.quantize.torch_weights.save_quantized_folder` (``quantization_config``
    in config.json) loads as that quantized model, from its stored int8/int4 tensors.
    """
    from modules.quantize.torch_weights import load_quantized_model, read_quantization_config

    folder = Path(folder)
    config = config or LlamaConfig.from_json_file(folder / "config.json")
    quant = read_quantization_config(folder)
    if quant is not None:
        return load_quantized_model(folder, device, dtype, config=config, quant=quant)
    files = weight_files(folder, allow_unsafe_pickle)
    with torch.device("meta"):
        model = Llama(config)
    reader = CheckpointReader(files)
    found = reader.shapes()
    check_keys_and_shapes(expected_shapes(model), found, config, folder)
    wanted = set(expected_shapes(model))
    state: dict[str, torch.Tensor] = {}
    for name, tensor in reader.tensors(wanted):
        state[name] = tensor.to(device=device, dtype=dtype)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:                      # assign=True replaces Parameters; tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    return model.eval().requires_grad_(False)


def check_keys_and_shapes(expected: dict[str, tuple[int, ...]], found: dict[str, tuple[int, ...]],
                          config: LlamaConfig, folder: Path) -> None:
    """Raise one CheckpointError listing every missing key, unexpected key and shape mismatch."""
    found = {k: v for k, v in found.items() if not k.endswith(IGNORED_SUFFIXES)}
    optional = {"lm_head.weight"} if config.tie_word_embeddings else set()
    missing = sorted(set(expected) - set(found) - optional)
    unexpected = sorted(set(found) - set(expected))
    mismatched = [f"{k}: checkpoint has {list(found[k])}, config.json implies {list(expected[k])}"
                  for k in expected if k in found and found[k] != expected[k]]
    problems = []
    if missing:
        problems.append(f"missing keys ({len(missing)}): {_listing(missing)}")
    if unexpected:
        problems.append(f"unexpected keys ({len(unexpected)}): {_listing(unexpected)}")
    if mismatched:
        problems.append("shape mismatches:\n      " + "\n      ".join(mismatched))
    if problems:
        raise CheckpointError(f"Weights in {folder} do not match its config.json (is this a Llama-architecture "
                              "model, and are config.json and the weights from the same download?):\n  - "
                              + "\n  - ".join(problems))


def _listing(keys: list[str], limit: int = 12) -> str:
    more = f", ... and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


# ------------------------------------------------------------------------------------------- saving
def save_hf_folder(model: Llama, out_dir: str | Path, tokenizer_dir: str | Path | None = None, *,
                   generation_config: dict | None = None, max_shard_bytes: int | None = None) -> Path:
    """Write ``model`` as a folder transformers' ``LlamaForCausalLM.from_pretrained`` loads.

    tokenizer_dir: copy its tokenizer and generation files along. max_shard_bytes: split the weights
    into ``model-0000i-of-0000n.safetensors`` shards of at most this size, with an index.
    """
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if tokenizer_dir is not None:
        for name in SIDE_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file() and src.resolve() != (out / name).resolve():
                shutil.copyfile(src, out / name)
    config = model.config
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    if config.tie_word_embeddings:
        state.pop("lm_head.weight")                      # safetensors stores a shared tensor once
    first = next(iter(state.values()))
    hf_config = config.to_hf_dict()
    hf_config["torch_dtype"] = str(first.dtype).replace("torch.", "")
    (out / "config.json").write_text(json.dumps(hf_config, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    if generation_config is not None:
        (out / "generation_config.json").write_text(json.dumps(generation_config, indent=2) + "\n",
                                                    encoding="utf-8")
    shards = _shard(state, max_shard_bytes)
    metadata = {"format": "pt"}
    if len(shards) == 1:
        save_file(shards[0], str(out / SAFETENSORS), metadata=metadata)
        return out
    weight_map, total = {}, 0
    for i, shard in enumerate(shards, start=1):
        name = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, str(out / name), metadata=metadata)
        for key, tensor in shard.items():
            weight_map[key] = name
            total += tensors_bytes([tensor])
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (out / SAFETENSORS_INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    return out


def _shard(state: dict[str, torch.Tensor], max_bytes: int | None) -> list[dict[str, torch.Tensor]]:
    if not max_bytes:
        return [state]
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, tensor in state.items():
        nbytes = tensors_bytes([tensor])
        if shards[-1] and size + nbytes > max_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = tensor
        size += nbytes
    return shards

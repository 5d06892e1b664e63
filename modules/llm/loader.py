"""Find LLM folders and ``.gguf`` files under ``models/LLM/`` and load one into a :class:`LoadedLLM` bundle.

The bundle is what the model manager holds and the generation engine uses: the model, its
tokenizer, its chat template and its generation defaults, loaded together so they never disagree.
A ``.gguf`` path goes to :mod:`modules.quantize.gguf_import` (dequantized into the same Llama), so
everything that serves a folder serves a GGUF file too.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modules.llm.chat_template import ChatTemplate, load_chat_template
from modules.llm.config import LlamaConfig
from modules.llm.model import Llama
from modules.llm.tokenizer import Tokenizer

log = logging.getLogger(__name__)


@dataclass
class LoadedLLM:
    name: str
    path: Path
    config: LlamaConfig
    model: Llama
    tokenizer: Tokenizer
    template: ChatTemplate
    #: generation_config.json (temperature, top_p, eos_token_id, ...) or {} when the folder has none
    generation_config: dict[str, Any] = field(default_factory=dict)

    def memory_bytes(self) -> int:
        """Bytes held by the weights (a tied embedding counted once)."""
        from modules.weight_bytes import weight_bytes
        return weight_bytes(self.model)

    @property
    def device(self) -> torch.device:
        return self.model.model.embed_tokens.weight.device   # lm_head may be quantized (no .weight)

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.embed_tokens.weight.dtype

    @property
    def context_length(self) -> int:
        return self.config.max_position_embeddings


@dataclass
class LLMFiles:
    """What a model folder says besides its weights: config, tokenizer, chat template, generation defaults.

    Cheap to read (no weights), so prompts can be tokenized and planned in the caller's thread while the
    weights load, and run, on the device worker only.
    """
    name: str
    path: Path
    config: LlamaConfig
    tokenizer: Tokenizer
    template: ChatTemplate
    generation_config: dict[str, Any] = field(default_factory=dict)


def is_gguf(path: str | Path) -> bool:
    """A llama.cpp GGUF file (by its suffix; :func:`read_llm_files` checks the content)."""
    return Path(path).suffix.lower() == ".gguf"


def read_llm_files(path: str | Path) -> LLMFiles:
    """Config, tokenizer, template and generation config of a Hugging Face Llama folder or a ``.gguf``
    file (fails fast)."""
    if is_gguf(path):
        from modules.quantize.gguf_import import read_gguf_files
        return read_gguf_files(path)
    folder = Path(path)
    if not folder.is_dir():
        raise FileNotFoundError(f"LLM folder {folder} does not exist; models go in models/LLM/<name>/")
    config = LlamaConfig.from_json_file(folder / "config.json")
    tokenizer = Tokenizer.from_dir(folder)
    if tokenizer.vocab_size > config.vocab_size:
        raise ValueError(f"{folder}: the tokenizer has {tokenizer.vocab_size} tokens but config.json's "
                         f"vocab_size is {config.vocab_size}; the tokenizer files belong to another model")
    return LLMFiles(name=folder.name, path=folder, config=config, tokenizer=tokenizer,
                    template=load_chat_template(folder),
                    generation_config=_read_generation_config(folder / "generation_config.json"))


def load_llm(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
             allow_unsafe_pickle: bool = False, row_parallel_threads: int = 1,
             files: LLMFiles | None = None, attention: str = "sdpa", weight_quant: str = "none") -> LoadedLLM:
    """Load a Hugging Face Llama folder: config, tokenizer and template first (cheap, fail fast), then weights.

    row_parallel_threads: on CPU, split decode matmuls over this many threads
    (:class:`~modules.llm.cpu_threading.RowParallel`); 1 leaves them to torch. The service passes the
    ``llm.cpu_row_parallel`` setting's choice.
    files: the folder's :func:`read_llm_files`, when the caller has it already (the tokenizer is then shared).
    attention: "sdpa" or "xformers" (``--xformers``).
    weight_quant: "none", or a :mod:`modules.quantize.torch_weights` scheme ("int8", "int4-g32", "int4-g64",
    "int4-g128") applied after loading (the ``llm.weight_quantization`` setting); a folder saved quantized
    keeps its own scheme.
    """
    from modules.llm.checkpoint import load_model
    from modules.quantize.torch_weights import apply_weight_quant

    if is_gguf(path):   # dequantized into Atelier's model, then (per the setting) kept 8- or 4-bit in memory
        from modules.quantize.gguf_import import load_gguf_llm
        llm = load_gguf_llm(path, device, dtype, files=files, attention=attention,
                            row_parallel_threads=row_parallel_threads if weight_quant == "none" else 1)
        quant = apply_weight_quant(llm.model, weight_quant, llm.name)
        if quant:
            log.info("LLM %s: weights %s in memory", llm.name, quant)
        return llm
    folder = Path(path)
    started = time.perf_counter()
    files = files or read_llm_files(folder)
    model = load_model(folder, device=device, dtype=dtype, allow_unsafe_pickle=allow_unsafe_pickle,
                       config=files.config)
    model.use_attention(attention)
    quant = apply_weight_quant(model, weight_quant, folder.name)   # None: plain weights
    if torch.device(device).type == "cpu" and row_parallel_threads > 1 and quant is None:
        model.use_row_parallel(row_parallel_threads)
    llm = LoadedLLM(name=folder.name, path=folder, config=files.config, model=model, tokenizer=files.tokenizer,
                    template=files.template, generation_config=files.generation_config)
    log.info("Loaded LLM %s (%.1fM parameters, %s%s, %s) in %.1f s", folder.name,
             files.config.num_parameters() / 1e6, str(dtype).replace("torch.", ""),
             f", weights {quant}" if quant else "", device, time.perf_counter() - started)
    return llm


def _read_generation_config(path: Path) -> dict[str, Any]:
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        log.warning("Ignoring %s: not valid JSON (%s)", path, exc)
        return {}
    return data if isinstance(data, dict) else {}


def list_llm_models(llm_dir: str | Path, *, allow_unsafe_pickle: bool = False) -> list[dict[str, Any]]:
    """Every subfolder of ``llm_dir`` with a config.json, sorted by name, then every ``*.gguf`` file in it,
    sorted by name: {"name", "path", "error", "format"}.

    ``format`` is "hf" for a folder, "gguf" for a file (whose name, ``.gguf`` included, never collides with
    a folder's). Folders come first so that adding a GGUF never changes which model is the default (the
    first usable one). ``error`` is None for a model that looks loadable, else the reason it cannot load
    (bad config, no tokenizer, no weights, pickled weights without *allow_unsafe_pickle*, a damaged
    safetensors header; for a GGUF whatever :func:`~modules.quantize.gguf_import.inspect_gguf` finds),
    found without reading any weights: only the headers are checked.
    """
    from modules.llm.checkpoint import CheckpointError, weight_files
    from modules.safetensors_header import check_file

    root = Path(llm_dir)
    if not root.is_dir():
        return []
    out = []
    for folder in sorted(p for p in root.iterdir() if p.is_dir() and (p / "config.json").is_file()):
        error = None
        try:
            LlamaConfig.from_json_file(folder / "config.json")
            if not (folder / "tokenizer.model").is_file() and not (folder / "tokenizer.json").is_file():
                raise ValueError(f"no tokenizer: put tokenizer.model and/or tokenizer.json into {folder}/")
            for weights in weight_files(folder, allow_unsafe_pickle=allow_unsafe_pickle):
                if weights.suffix == ".safetensors":
                    check_file(weights)  # BrokenModelFile is a ValueError naming the file and the damage
        except (ValueError, CheckpointError, OSError) as exc:
            error = str(exc)
        out.append({"name": folder.name, "path": str(folder), "error": error, "format": "hf"})
    for file in sorted(p for p in root.iterdir() if p.is_file() and is_gguf(p)):
        from modules.quantize.gguf_import import inspect_gguf
        error = None
        try:
            inspect_gguf(file)
        except (ValueError, OSError) as exc:      # GGUFImportError is a ValueError naming the file and the fix
            error = str(exc)
        out.append({"name": file.name, "path": str(file), "error": error, "format": "gguf"})
    return out

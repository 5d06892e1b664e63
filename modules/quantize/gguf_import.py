"""Import a llama.cpp ``.gguf`` file into Atelier's own Llama model.

A GGUF in ``models/LLM/`` is a model like a Hugging Face folder: :func:`inspect_gguf` says cheaply (header
only) what it is and whether Atelier can run it, :func:`read_gguf_files` gives the config, tokenizer and
chat template (an :class:`~modules.llm.loader.LLMFiles`), :func:`load_gguf_llm` the loaded model,
dequantized to the compute dtype - so speculative decoding, LoRA and training start from a GGUF too.

The conversion inverts llama.cpp's ``convert_hf_to_gguf.py`` for ``general.architecture == "llama"``:

* tensor names: ``blk.N.attn_q.weight`` -> ``model.layers.N.self_attn.q_proj.weight`` and so on
  (:data:`LAYER_TENSORS`); shapes come back in torch order; no ``output.weight`` means tied embeddings;
* values: ``gguf.quants.dequantize`` (the ``gguf`` package's reference code, bit-exact with ggml for the
  legacy and K quants) to float32, then the compute dtype;
* q/k rows: the converter permutes them from Hugging Face's rotate-half RoPE layout to ggml's adjacent
  pairs (``LlamaModel.permute``: ``reshape(heads, 2, hd/2, ...).swapaxes(1, 2)``); :func:`unpermute` is its
  inverse (``reshape(heads, hd/2, 2, ...).swapaxes(1, 2)``), with the KV head count for k;
* metadata: ``llama.*`` keys -> :class:`~modules.llm.config.LlamaConfig` (:func:`gguf_config`).

Anything else - another architecture, a tensor type the ``gguf`` package cannot dequantize, rope scaling
or layouts Atelier's model lacks, a tokenizer that cannot be rebuilt - is a :class:`GGUFImportError` that
names it, raised by :func:`inspect_gguf` before any weight is read.
"""
from __future__ import annotations

import logging
import re
import tempfile
import time
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from modules.llm.config import LlamaConfig
from modules.quantize.gguf_header import (GGUFHeader, GGUFImportError, GGUFTensorInfo, SkippedArray,
                                          read_gguf_header)
from modules.quantize.tokenizer_from_gguf import TOKENIZER_ARRAYS, check_gguf_tokenizer, special_token_ids

if TYPE_CHECKING:
    from modules.llm.loader import LLMFiles, LoadedLLM

__all__ = ["GGUFImportError", "GGUFInfo", "SUPPORTED_ARCHITECTURES", "inspect_gguf", "gguf_config",
           "gguf_state_dict", "gguf_load_bytes", "gguf_tokenizer_files", "read_gguf_files", "load_gguf_llm",
           "unpermute"]

log = logging.getLogger(__name__)

#: general.architecture values Atelier's own model runs (llama.cpp writes Mistral-7B and SmolLM as "llama" too)
SUPPORTED_ARCHITECTURES = ("llama",)

#: GGUF name -> HF name for the tensors outside the blocks
GLOBAL_TENSORS = {"token_embd.weight": "model.embed_tokens.weight", "output_norm.weight": "model.norm.weight",
                  "output.weight": "lm_head.weight"}
#: blk.N.<GGUF part> -> model.layers.N.<HF part>
LAYER_TENSORS = {
    "attn_norm.weight": "input_layernorm.weight",
    "attn_q.weight": "self_attn.q_proj.weight", "attn_q.bias": "self_attn.q_proj.bias",
    "attn_k.weight": "self_attn.k_proj.weight", "attn_k.bias": "self_attn.k_proj.bias",
    "attn_v.weight": "self_attn.v_proj.weight", "attn_v.bias": "self_attn.v_proj.bias",
    "attn_output.weight": "self_attn.o_proj.weight", "attn_output.bias": "self_attn.o_proj.bias",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    "ffn_gate.weight": "mlp.gate_proj.weight", "ffn_gate.bias": "mlp.gate_proj.bias",
    "ffn_up.weight": "mlp.up_proj.weight", "ffn_up.bias": "mlp.up_proj.bias",
    "ffn_down.weight": "mlp.down_proj.weight", "ffn_down.bias": "mlp.down_proj.bias",
}
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")
#: tensors some converters add that carry no weights (llama.cpp ignores them too)
_IGNORED = ("rope_freqs.weight",)


@dataclass
class GGUFInfo:
    """What :func:`inspect_gguf` finds: enough to list, describe and size the file without loading it."""
    path: Path
    size_bytes: int
    architecture: str
    #: general.name, when the file has one
    name: str | None
    #: llama.cpp's name for the file type ("Q4_K_M", "Q8_0", "F16"), or the majority tensor type when unsaid
    file_type: str
    #: tensor type name -> how many tensors have it, e.g. {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    tensor_types: dict[str, int]
    n_tensors: int
    n_parameters: int
    #: bits per weight over all tensors (8 * tensor bytes / elements)
    bits_per_weight: float
    tokenizer_model: str
    tokenizer_pre: str | None
    config: LlamaConfig
    chat_template: str | None = None
    #: scalar metadata (no vocabulary arrays), for display
    metadata: dict[str, Any] = field(default_factory=dict, repr=False)

    def summary(self) -> str:
        """One line for a model list: ``Q4_1 · 5.85 bits/weight · 134.5M parameters · 30 layers``."""
        return (f"{self.file_type} · {self.bits_per_weight:.2f} bits/weight · {self.n_parameters / 1e6:.1f}M "
                f"parameters · {self.config.num_hidden_layers} layers · {self.tokenizer_model} tokenizer")


# ------------------------------------------------------------------------------------------- inspecting
def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Read and check the header of the GGUF at *path* (no tensor data): architecture, the config it
    implies, tensor types, tokenizer, file type and size. Raises GGUFImportError naming whatever stops
    Atelier from loading it (not GGUF, truncated, another architecture, a tensor type it cannot
    dequantize, tensors that do not fit the config, a tokenizer it cannot build)."""
    return _inspect(read_gguf_header(path))


def _inspect(header: GGUFHeader) -> GGUFInfo:
    path = header.path
    arch = header.get("general.architecture")
    if arch not in SUPPORTED_ARCHITECTURES:
        raise GGUFImportError(
            f"{path} is a {arch!r} model (general.architecture); Atelier's own engine runs only "
            f"{', '.join(repr(a) for a in SUPPORTED_ARCHITECTURES)} (Llama, TinyLlama, SmolLM and other models "
            "llama.cpp converts as llama)" if arch else f"{path} has no general.architecture; it is not a model")
    undecodable = [t for t in header.tensors if not _can_dequantize(t.ggml_type)]
    if undecodable:
        first = undecodable[0]
        kinds = sorted({t.type_name for t in undecodable})
        raise GGUFImportError(
            f"{path}: tensor {first.name} is stored as {first.type_name}"
            + (f" ({len(undecodable)} tensors of type {', '.join(kinds)})" if len(undecodable) > 1 else "")
            + f", which the gguf package {_gguf_version()} cannot dequantize. Atelier can import "
            f"{', '.join(supported_tensor_types())}; re-quantize the model to one of those (e.g. Q4_K_M or Q8_0).")
    config = _config(header)
    _check_tensors(header, config)
    tokenizer_model = check_gguf_tokenizer(header)
    types = Counter(t.type_name for t in header.tensors)
    elements = sum(t.n_elements for t in header.tensors)
    data_bytes = sum(t.n_bytes or 0 for t in header.tensors)
    template = header.get("tokenizer.chat_template")
    return GGUFInfo(
        path=path, size_bytes=header.file_size, architecture=arch, name=header.get("general.name"),
        file_type=_file_type(header, types), tensor_types=dict(types.most_common()), n_tensors=len(header.tensors),
        n_parameters=elements, bits_per_weight=8 * data_bytes / elements if elements else 0.0,
        tokenizer_model=tokenizer_model, tokenizer_pre=header.get("tokenizer.ggml.pre"), config=config,
        chat_template=template if isinstance(template, str) else None,
        metadata={k: v for k, v in header.metadata.items() if isinstance(v, (int, float, str, bool))
                  and k != "tokenizer.chat_template"})


def supported_tensor_types() -> list[str]:
    """The ggml tensor types this ``gguf`` package dequantizes (what Atelier can import)."""
    from gguf import GGMLQuantizationType
    return [t.name for t in GGMLQuantizationType if _can_dequantize(int(t))]


@lru_cache(maxsize=None)
def _can_dequantize(ggml_type: int) -> bool:
    """Whether ``gguf.quants.dequantize`` handles this type: tried on one zero block (cached per type id)."""
    import numpy as np
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    from gguf.quants import dequantize
    try:
        qtype = GGMLQuantizationType(ggml_type)
        _, block_bytes = GGML_QUANT_SIZES[qtype]
        dequantize(np.zeros((1, block_bytes), dtype=np.uint8), qtype)
    except (ValueError, KeyError, NotImplementedError):
        return False
    return True


def _gguf_version() -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version("gguf")
    except PackageNotFoundError:
        return "(unknown version)"


def _file_type(header: GGUFHeader, types: Counter) -> str:
    from gguf import LlamaFileType
    value = header.get("general.file_type")
    try:
        name = LlamaFileType(value).name
    except ValueError:
        name = None
    if name and name != "GUESSED":
        return "F32" if name == "ALL_F32" else name.removeprefix("MOSTLY_")
    # unsaid: the type most weights have, ignoring the F32 norms (always F32 whatever the file type)
    weights = Counter({k: v for k, v in types.items() if k != "F32"}) or types
    return weights.most_common(1)[0][0] if weights else "unknown"


# ---------------------------------------------------------------------------------------------- config
def gguf_config(path: str | Path) -> LlamaConfig:
    """The :class:`LlamaConfig` a llama GGUF describes (raises GGUFImportError as :func:`inspect_gguf`)."""
    return inspect_gguf(path).config


def _config(header: GGUFHeader) -> LlamaConfig:
    path, arch = header.path, header.get("general.architecture")

    def key(name: str, default: Any = None) -> Any:
        return header.get(f"{arch}.{name}", default)

    heads, hidden = key("attention.head_count"), key("embedding_length")
    if isinstance(heads, list) or isinstance(key("attention.head_count_kv"), list):
        raise GGUFImportError(f"{path} cannot run on Atelier's Llama: its head counts differ per layer "
                              f"({arch}.attention.head_count is a list); Atelier's Llama has one count for all")
    required = ("embedding_length", "feed_forward_length", "block_count", "attention.head_count")
    missing = [f"{arch}.{k}" for k in required if not isinstance(key(k), int) or isinstance(key(k), bool)]
    if missing:
        raise GGUFImportError(f"{path} lacks {', '.join(missing)} (or has no whole number there); the model's "
                              "shape cannot be known. Re-convert it with a current llama.cpp.")
    problems = []
    if key("expert_count", 0):
        problems.append(f"it is a mixture-of-experts model ({arch}.expert_count = {key('expert_count')}); "
                        "Atelier's Llama has dense MLPs only")
    head_dim = key("attention.key_length") or (hidden // heads if heads else None)
    if key("attention.value_length", head_dim) != head_dim:
        problems.append(f"its key and value head sizes differ ({head_dim} and {key('attention.value_length')})")
    rope_dims = key("rope.dimension_count", head_dim)
    if rope_dims != head_dim:
        problems.append(f"RoPE covers {rope_dims} of {head_dim} head dimensions (partial rotary); Atelier rotates "
                        "all of them")
    if any(t.name in _IGNORED for t in header.tensors):
        problems.append("it carries rope_freqs.weight (Llama-3.1-style frequency scaling), which Atelier's RoPE "
                        "does not implement")
    scaling = None
    kind = key("rope.scaling.type")
    factor = key("rope.scaling.factor", key("rope.scale_linear"))
    if kind in (None, "none") and key("rope.scale_linear") not in (None, 1.0):
        kind = "linear"
    if kind == "linear" and factor not in (None, 1.0):
        scaling = {"type": "linear", "factor": float(factor)}
    elif kind not in (None, "none", "linear"):
        problems.append(f"it uses {kind!r} RoPE scaling ({arch}.rope.scaling.type); Atelier implements linear only")
    if problems:
        raise GGUFImportError(f"{path} cannot run on Atelier's Llama: " + "; ".join(problems))
    ids = special_token_ids(header)
    tokens = header.get("tokenizer.ggml.tokens")
    n_tokens = tokens.count if isinstance(tokens, SkippedArray) else len(tokens) if isinstance(tokens, list) else None
    embed = next((t for t in header.tensors if t.name == "token_embd.weight"), None)
    vocab = key("vocab_size") or (embed.shape[0] if embed is not None and embed.shape else None) or n_tokens
    eos = [i for i in dict.fromkeys((ids["eos"], ids["eot"])) if i is not None]
    try:
        return LlamaConfig(
            vocab_size=vocab, hidden_size=hidden, intermediate_size=key("feed_forward_length"),
            num_hidden_layers=key("block_count"), num_attention_heads=heads,
            num_key_value_heads=key("attention.head_count_kv", heads), head_dim=head_dim,
            max_position_embeddings=key("context_length", 2048),
            rms_norm_eps=float(key("attention.layer_norm_rms_epsilon", 1e-5)),
            rope_theta=float(key("rope.freq_base", 10000.0)), rope_scaling=scaling,
            tie_word_embeddings=not any(t.name == "output.weight" for t in header.tensors),
            attention_bias=any(t.name.endswith(("attn_q.bias", "attn_k.bias", "attn_v.bias", "attn_output.bias"))
                               for t in header.tensors),
            mlp_bias=any(t.name.endswith(("ffn_gate.bias", "ffn_up.bias", "ffn_down.bias")) for t in header.tensors),
            bos_token_id=ids["bos"], eos_token_id=eos[0] if len(eos) == 1 else (eos or None),
            pad_token_id=ids["pad"], torch_dtype=None, source=str(path))
    except ValueError as exc:
        raise GGUFImportError(f"{path}: the {arch}.* metadata does not describe a valid model: {exc}") from exc


# --------------------------------------------------------------------------------------------- tensors
def hf_name(gguf_name: str) -> str | None:
    """The Hugging Face state-dict name of a llama GGUF tensor, or None for one Atelier does not know."""
    if gguf_name in GLOBAL_TENSORS:
        return GLOBAL_TENSORS[gguf_name]
    match = _LAYER_NAME.match(gguf_name)
    if match and match.group(2) in LAYER_TENSORS:
        return f"model.layers.{match.group(1)}.{LAYER_TENSORS[match.group(2)]}"
    return None


def _hf_tensors(header: GGUFHeader) -> dict[str, GGUFTensorInfo]:
    return {hf_name(t.name): t for t in header.tensors if hf_name(t.name) is not None}


def _check_tensors(header: GGUFHeader, config: LlamaConfig) -> None:
    """Every tensor named, shaped as the config implies, and none missing (biases may be partly absent)."""
    from modules.llm.model import Llama

    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in Llama(config).state_dict().items()}
    unknown = [t.name for t in header.tensors if hf_name(t.name) is None and t.name not in _IGNORED]
    found = _hf_tensors(header)
    optional = {"lm_head.weight"} | {k for k in expected if k.endswith(".bias")}
    missing = sorted(set(expected) - set(found) - optional, key=_natural)
    wrong = [f"{found[k].name}: {list(found[k].shape)}, expected {list(shape)}"
             for k, shape in expected.items() if k in found and found[k].shape != shape]
    problems = []
    if unknown:
        problems.append(f"tensors Atelier's Llama has no place for: {_listing(unknown)}")
    if missing:
        problems.append(f"missing tensors: {_listing(missing)}")
    if wrong:
        problems.append("shapes that do not match the llama.* metadata: " + _listing(wrong))
    if problems:
        raise GGUFImportError(f"{header.path} does not hold a Llama model Atelier can load:\n  - "
                              + "\n  - ".join(problems))


def unpermute(weight: torch.Tensor, n_head: int) -> torch.Tensor:
    """Undo llama.cpp's q/k row permutation (rows = n_head * head_dim; a 1-D bias works too)."""
    rows = weight.shape[0]
    rest = weight.shape[1:]
    return weight.reshape(n_head, rows // n_head // 2, 2, *rest).swapaxes(1, 2).reshape(weight.shape)


def gguf_state_dict(path: str | Path, dtype: torch.dtype = torch.float32,
                    device: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """Every weight of the llama GGUF at *path* under its Hugging Face name, dequantized to *dtype*.

    q/k rows are un-permuted back to Hugging Face's rotate-half layout; missing biases (a file with q/k/v
    biases but none on the output projection) are zeros; ``lm_head.weight`` is absent when the embeddings
    are tied (``config.tie_word_embeddings``). Raises GGUFImportError as :func:`inspect_gguf`.
    """
    import numpy as np

    header = read_gguf_header(path)
    config = _inspect(header).config
    state: dict[str, torch.Tensor] = {}
    data = np.memmap(header.path, dtype=np.uint8, mode="r")
    for name, info in _hf_tensors(header).items():
        tensor = _dequantize(data, info)
        if name.endswith(("q_proj.weight", "q_proj.bias")):
            tensor = unpermute(tensor, config.num_attention_heads)
        elif name.endswith(("k_proj.weight", "k_proj.bias")):
            tensor = unpermute(tensor, config.num_key_value_heads)
        state[name] = tensor.to(device=device, dtype=dtype)
    for name, shape in _bias_shapes(config).items():
        if name not in state:
            state[name] = torch.zeros(shape, dtype=dtype, device=device)
    return state


def _dequantize(data, info: GGUFTensorInfo) -> torch.Tensor:
    """One tensor as float32 in torch order: the file's rows (``shape[-1]`` elements each) dequantized."""
    import numpy as np
    from gguf import GGMLQuantizationType
    from gguf.quants import dequantize

    raw = data[info.offset:info.offset + info.n_bytes]
    rows = info.n_elements // info.shape[-1] if info.shape else 1
    values = dequantize(raw.reshape(rows, -1), GGMLQuantizationType(info.ggml_type))
    values = np.asarray(values, dtype=np.float32).reshape(info.shape)
    if not values.flags.writeable:        # an F32 tensor comes back as a view of the read-only file map
        values = values.copy()
    return torch.from_numpy(values)


def _bias_shapes(config: LlamaConfig) -> dict[str, tuple[int, ...]]:
    out = {}
    q, kv, d, ff = (config.num_attention_heads * config.head_dim, config.num_key_value_heads * config.head_dim,
                    config.hidden_size, config.intermediate_size)
    for i in range(config.num_hidden_layers):
        prefix = f"model.layers.{i}"
        if config.attention_bias:
            out.update({f"{prefix}.self_attn.q_proj.bias": (q,), f"{prefix}.self_attn.k_proj.bias": (kv,),
                        f"{prefix}.self_attn.v_proj.bias": (kv,), f"{prefix}.self_attn.o_proj.bias": (d,)})
        if config.mlp_bias:
            out.update({f"{prefix}.mlp.gate_proj.bias": (ff,), f"{prefix}.mlp.up_proj.bias": (ff,),
                        f"{prefix}.mlp.down_proj.bias": (d,)})
    return out


def gguf_load_bytes(path: str | Path, dtype: torch.dtype | None = torch.float32) -> int:
    """Bytes the weights take once loaded at *dtype* (every tensor dequantized; a tied embedding once)."""
    header = read_gguf_header(path)
    size = torch.empty((), dtype=dtype or torch.float32).element_size()
    return sum(t.n_elements for t in header.tensors if hf_name(t.name) is not None) * size


# -------------------------------------------------------------------------------------------- tokenizer
def gguf_tokenizer_files(path: str | Path, out_dir: str | Path) -> list[Path]:
    """Write the GGUF's tokenizer as Hugging Face files into *out_dir* (tokenizer.model or tokenizer.json,
    and tokenizer_config.json with the special tokens, add_bos_token and the chat template)."""
    from modules.quantize.tokenizer_from_gguf import write_gguf_tokenizer_files
    header = read_gguf_header(path, TOKENIZER_ARRAYS)
    config = _inspect(header).config
    return write_gguf_tokenizer_files(header, out_dir, context_length=config.max_position_embeddings)


# ---------------------------------------------------------------------------------------------- loading
def read_gguf_files(path: str | Path) -> "LLMFiles":
    """Config, tokenizer and chat template of the GGUF at *path* (no weights read).

    The tokenizer files are built in a temporary folder, loaded and deleted: nothing is written next to the
    user's file, and nothing can go stale. Without a template in the file, a vocabulary with ChatML's
    ``<|im_start|>`` gets the ChatML builtin, any other the project default.
    """
    from modules.llm.chat_template import load_chat_template
    from modules.llm.loader import LLMFiles
    from modules.llm.tokenizer import Tokenizer, TokenizerError
    from modules.quantize.tokenizer_from_gguf import write_gguf_tokenizer_files

    header = read_gguf_header(path, TOKENIZER_ARRAYS)
    config = _inspect(header).config
    tokens = header.get("tokenizer.ggml.tokens") or []
    with tempfile.TemporaryDirectory(prefix="atelier-gguf-tokenizer-") as tmp:
        write_gguf_tokenizer_files(header, tmp, context_length=config.max_position_embeddings)
        try:
            tokenizer = Tokenizer.from_dir(tmp)
        except TokenizerError as exc:
            raise GGUFImportError(f"{header.path}: its vocabulary does not make a usable tokenizer: {exc}") from exc
        template = load_chat_template(tmp, fallback="chatml" if "<|im_start|>" in tokens else "tinyllama")
    if tokenizer.vocab_size > config.vocab_size:
        raise GGUFImportError(f"{header.path}: the vocabulary has {tokenizer.vocab_size} tokens but the embedding "
                              f"has {config.vocab_size} rows; the file is inconsistent")
    tokenizer.source = str(header.path)
    return LLMFiles(name=header.path.name, path=header.path, config=config, tokenizer=tokenizer, template=template,
                    generation_config={})


def load_gguf_llm(path: str | Path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, *,
                  row_parallel_threads: int = 1, files: "LLMFiles | None" = None,
                  attention: str = "sdpa") -> "LoadedLLM":
    """Load the GGUF at *path* into Atelier's Llama, dequantized to *dtype* on *device* (arguments as
    :func:`modules.llm.loader.load_llm`, which calls this for a ``.gguf`` path)."""
    from modules.llm.loader import LoadedLLM
    from modules.llm.model import Llama

    started = time.perf_counter()
    files = files or read_gguf_files(path)
    state = gguf_state_dict(path, dtype=dtype, device=device)
    config = files.config
    with torch.device("meta"):
        model = Llama(config)
    if config.tie_word_embeddings:
        state["lm_head.weight"] = state["model.embed_tokens.weight"]
    model.load_state_dict(state, strict=True, assign=True)
    if config.tie_word_embeddings:                      # assign=True replaces Parameters; tie them again
        model.lm_head.weight = model.model.embed_tokens.weight
    model = model.eval().requires_grad_(False)
    model.use_attention(attention)
    if torch.device(device).type == "cpu" and row_parallel_threads > 1:
        model.use_row_parallel(row_parallel_threads)
    log.info("Loaded GGUF %s (%.1fM parameters, dequantized to %s, %s) in %.1f s", files.name,
             model.num_parameters() / 1e6, str(dtype).replace("torch.", ""), device, time.perf_counter() - started)
    return LoadedLLM(name=files.name, path=files.path, config=config, model=model, tokenizer=files.tokenizer,
                     template=files.template, generation_config=files.generation_config)


def _natural(name: str) -> list:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _listing(items: list[str], limit: int = 8) -> str:
    more = f", ... and {len(items) - limit} more" if len(items) > limit else ""
    return ", ".join(items[:limit]) + more

"""A minimal GGUF writer for tests: an HF Llama folder (the tiny fixture) -> a llama.cpp-layout ``.gguf``.

Written here, with ``gguf.GGUFWriter`` and ``gguf.quants.quantize``, so the import tests do not depend on
the export helper. It follows ``convert_hf_to_gguf.py`` where the importer relies on it: llama.cpp's
tensor names, shapes reversed by the writer, q/k rows permuted (``LlamaModel.permute``), norms in F32, the
SentencePiece vocabulary as tokens/scores/types. Knobs let a test write files the importer must refuse.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

#: downloads the tests reuse across sessions (the starter model's wheel, 93 MB, and the model itself)
TEST_DOWNLOADS = Path.home() / ".cache" / "atelier" / "test-downloads"

#: HF name -> GGUF name, for the tensors outside the blocks
_GLOBAL = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight",
           "lm_head.weight": "output.weight"}
_LAYER = {"input_layernorm.weight": "attn_norm", "self_attn.q_proj.weight": "attn_q",
          "self_attn.k_proj.weight": "attn_k", "self_attn.v_proj.weight": "attn_v",
          "self_attn.o_proj.weight": "attn_output", "post_attention_layernorm.weight": "ffn_norm",
          "mlp.gate_proj.weight": "ffn_gate", "mlp.up_proj.weight": "ffn_up", "mlp.down_proj.weight": "ffn_down"}


def gguf_name(hf: str) -> str:
    if hf in _GLOBAL:
        return _GLOBAL[hf]
    _, _, index, rest = hf.split(".", 3)
    return f"blk.{index}.{_LAYER[rest]}.weight"


def permute(weights: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf.py's LlamaModel.permute (rotate-half rows -> ggml's adjacent pairs)."""
    return (weights.reshape(n_head, 2, weights.shape[0] // n_head // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def sentencepiece_vocab(tokenizer_model: Path) -> tuple[list[str], list[float], list[int]]:
    """tokens, scores and llama.cpp token types of a tokenizer.model (as convert_hf_to_gguf.py reads them)."""
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor()
    sp.Load(str(tokenizer_model))
    tokens, scores, types = [], [], []
    for i in range(sp.GetPieceSize()):
        tokens.append(sp.IdToPiece(i))
        scores.append(sp.GetScore(i))
        types.append(2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 5 if sp.IsUnused(i)
                     else 6 if sp.IsByte(i) else 1)
    return tokens, scores, types


def write_gguf(folder: Path, out: Path, qtype: str = "F32", *, arch: str = "llama",
               tokenizer_model: str = "llama", tensor_types: dict[str, Any] | None = None,
               drop: tuple[str, ...] = (), chat_template: str | None = None) -> Path:
    """Write the HF Llama *folder* as a GGUF at *out*.

    qtype: "F32", or "Q8_0" for every 2-D weight whose rows are a multiple of 32 long (others stay F32, as
    llama.cpp's quantizer falls back too). tensor_types: GGUF tensor name -> numpy dtype to store it as
    instead (an unsupported type for the error tests). drop: GGUF tensor names to leave out.
    """
    import gguf
    from safetensors.torch import load_file

    from modules.llm.config import LlamaConfig

    config = LlamaConfig.from_json_file(folder / "config.json")
    state = load_file(str(folder / "model.safetensors"))
    writer = gguf.GGUFWriter(str(out), arch)
    writer.add_name(folder.name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(config.rope_theta)
    writer.add_rope_dimension_count(config.head_dim)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(gguf.LlamaFileType.ALL_F32 if qtype == "F32" else gguf.LlamaFileType.MOSTLY_Q8_0)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
    tokens, scores, types = sentencepiece_vocab(folder / "tokenizer.model")
    writer.add_tokenizer_model(tokenizer_model)
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_unk_token_id(0)
    writer.add_add_bos_token(True)
    if chat_template:
        writer.add_chat_template(chat_template)
    for hf, tensor in state.items():
        name = gguf_name(hf)
        if name in drop:
            continue
        data = tensor.to(torch.float32).numpy()
        if hf.endswith("q_proj.weight"):
            data = permute(data, config.num_attention_heads)
        elif hf.endswith("k_proj.weight"):
            data = permute(data, config.num_key_value_heads)
        if tensor_types and name in tensor_types:
            writer.add_tensor(name, data.astype(tensor_types[name]))
        elif qtype == "Q8_0" and data.ndim == 2 and data.shape[1] % 32 == 0:
            q8 = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(name, gguf.quants.quantize(data, q8), raw_dtype=q8)
        else:
            writer.add_tensor(name, np.ascontiguousarray(data))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out


def q8_0_step(weights: torch.Tensor) -> torch.Tensor:
    """Q8_0's quantization step per element: the scale of its 32-element block (max |x| / 127)."""
    blocks = weights.reshape(-1, 32)
    step = blocks.abs().amax(dim=1, keepdim=True) / 127
    return step.expand_as(blocks).reshape(weights.shape)


def write_vocab_only(source: Path, out: Path, pre: str) -> Path:
    """A tensor-less GGUF with *source*'s byte-level BPE vocabulary under pre-tokenizer *pre* (what
    ``llama_cpp.Llama(vocab_only=True)`` and the tokenizer builder need, nothing more)."""
    import gguf

    from modules.quantize.gguf_header import read_gguf_header
    from modules.quantize.tokenizer_from_gguf import TOKENIZER_ARRAYS

    header = read_gguf_header(source, TOKENIZER_ARRAYS)
    writer = gguf.GGUFWriter(str(out), "llama")
    for key in ("block_count", "context_length", "embedding_length", "feed_forward_length", "attention.head_count",
                "attention.head_count_kv", "vocab_size", "rope.dimension_count"):
        writer.add_uint32(f"llama.{key}", header.get(f"llama.{key}"))
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", header.get("llama.attention.layer_norm_rms_epsilon"))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(header.get("tokenizer.ggml.tokens"))
    writer.add_token_types(header.get("tokenizer.ggml.token_type"))
    writer.add_token_merges(header.get("tokenizer.ggml.merges"))
    writer.add_bos_token_id(header.get("tokenizer.ggml.bos_token_id"))
    writer.add_eos_token_id(header.get("tokenizer.ggml.eos_token_id"))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out

"""Hugging Face Llama tensor names and layouts <-> llama.cpp's GGUF ones.

Two things differ between a Hugging Face ``LlamaForCausalLM`` state dict and a llama.cpp ``llama`` GGUF:

* **names**: ``model.layers.3.self_attn.q_proj.weight`` is ``blk.3.attn_q.weight``, and so on
  (:data:`LAYER_NAMES`);
* **the row order of q and k**: HF's converter permuted Meta's q/k rows so that RoPE rotates
  dimension i with i + head_dim/2 ("rotate half"); llama.cpp's ``llama`` architecture rotates
  consecutive pairs (2i, 2i+1), as Meta's original did, so the export undoes HF's permutation per head
  (:func:`permute_qk`, exactly llama.cpp's ``convert_hf_to_gguf.py`` ``LlamaModel.permute``) and an
  import redoes it (:func:`unpermute_qk`). Biases of q/k are rows too and get the same treatment.

Shapes are written in ggml order (the reverse of PyTorch's) by ``gguf.GGUFWriter`` itself, so
nothing here transposes anything. Import code (``gguf_import``) uses the same table in reverse.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from modules.llm.config import LlamaConfig

#: HF per-layer suffix (after ``model.layers.{i}.``) -> GGUF per-layer name (after ``blk.{i}.``)
LAYER_NAMES: dict[str, str] = {
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.q_proj.bias": "attn_q.bias",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.k_proj.bias": "attn_k.bias",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.v_proj.bias": "attn_v.bias",
    "self_attn.o_proj.weight": "attn_output.weight",
    "self_attn.o_proj.bias": "attn_output.bias",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.gate_proj.bias": "ffn_gate.bias",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.up_proj.bias": "ffn_up.bias",
    "mlp.down_proj.weight": "ffn_down.weight",
    "mlp.down_proj.bias": "ffn_down.bias",
}
#: HF names outside the layers -> GGUF names
GLOBAL_NAMES: dict[str, str] = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
}
_LAYER_PREFIX = "model.layers."


@dataclass(frozen=True)
class PlannedTensor:
    """One tensor of the GGUF file: where it comes from, its GGUF name, its PyTorch shape, how to treat it."""
    hf_name: str
    gguf_name: str
    shape: tuple[int, ...]
    #: query/key rows to re-order for llama.cpp's RoPE: the head count to permute with, else None
    permute_heads: int | None = None

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n


def gguf_name(hf_name: str) -> str | None:
    """The GGUF name of an HF Llama tensor, or None for a name llama.cpp has no slot for."""
    if hf_name in GLOBAL_NAMES:
        return GLOBAL_NAMES[hf_name]
    if hf_name.startswith(_LAYER_PREFIX):
        index, _, suffix = hf_name[len(_LAYER_PREFIX):].partition(".")
        if index.isdigit() and suffix in LAYER_NAMES:
            return f"blk.{int(index)}.{LAYER_NAMES[suffix]}"
    return None


def hf_name(gguf_tensor_name: str) -> str | None:
    """The HF Llama state-dict key of a GGUF tensor name, or None for a tensor outside this table."""
    for hf, gg in GLOBAL_NAMES.items():
        if gg == gguf_tensor_name:
            return hf
    if gguf_tensor_name.startswith("blk."):
        index, _, suffix = gguf_tensor_name[len("blk."):].partition(".")
        for hf_suffix, gg_suffix in LAYER_NAMES.items():
            if index.isdigit() and gg_suffix == suffix:
                return f"{_LAYER_PREFIX}{int(index)}.{hf_suffix}"
    return None


def tensor_plan(config: LlamaConfig) -> list[PlannedTensor]:
    """Every tensor a llama.cpp ``llama`` GGUF of this model holds, in llama.cpp's usual order.

    A tied ``lm_head`` is left out: llama.cpp reuses ``token_embd.weight`` when ``output.weight`` is absent.
    """
    d, hd, ff, v = config.hidden_size, config.head_dim, config.intermediate_size, config.vocab_size
    q_rows, kv_rows = config.num_attention_heads * hd, config.num_key_value_heads * hd
    plan = [PlannedTensor("model.embed_tokens.weight", "token_embd.weight", (v, d))]
    for i in range(config.num_hidden_layers):
        layer = [("input_layernorm.weight", (d,), None),
                 ("self_attn.q_proj.weight", (q_rows, d), config.num_attention_heads),
                 ("self_attn.k_proj.weight", (kv_rows, d), config.num_key_value_heads),
                 ("self_attn.v_proj.weight", (kv_rows, d), None),
                 ("self_attn.o_proj.weight", (d, q_rows), None)]
        if config.attention_bias:
            layer += [("self_attn.q_proj.bias", (q_rows,), config.num_attention_heads),
                      ("self_attn.k_proj.bias", (kv_rows,), config.num_key_value_heads),
                      ("self_attn.v_proj.bias", (kv_rows,), None),
                      ("self_attn.o_proj.bias", (d,), None)]
        layer += [("post_attention_layernorm.weight", (d,), None),
                  ("mlp.gate_proj.weight", (ff, d), None),
                  ("mlp.up_proj.weight", (ff, d), None),
                  ("mlp.down_proj.weight", (d, ff), None)]
        if config.mlp_bias:
            layer += [("mlp.gate_proj.bias", (ff,), None), ("mlp.up_proj.bias", (ff,), None),
                      ("mlp.down_proj.bias", (d,), None)]
        for suffix, shape, heads in layer:
            plan.append(PlannedTensor(f"{_LAYER_PREFIX}{i}.{suffix}", f"blk.{i}.{LAYER_NAMES[suffix]}", shape, heads))
    plan.append(PlannedTensor("model.norm.weight", "output_norm.weight", (d,)))
    if not config.tie_word_embeddings:
        plan.append(PlannedTensor("lm_head.weight", "output.weight", (v, d)))
    return plan


def permute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """HF "rotate half" rows -> llama.cpp's interleaved pairs, per head (llama.cpp's ``LlamaModel.permute``).

    w: (n_head * head_dim, ...) rows of q or k (weight or bias). Within each head, row j of the first half
    and row j of the second half become rows 2j and 2j+1.
    """
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot permute {rows} rows for {n_head} heads: rows must be a multiple of 2 * heads")
    # (H, 2, hd/2, ...) -> (H, hd/2, 2, ...) -> back to (rows, ...)
    return w.reshape(n_head, 2, rows // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def unpermute_qk(w: torch.Tensor, n_head: int) -> torch.Tensor:
    """The inverse of :func:`permute_qk`: llama.cpp's interleaved q/k rows -> HF's "rotate half" order."""
    rows = w.shape[0]
    if rows % (2 * n_head):
        raise ValueError(f"cannot un-permute {rows} rows for {n_head} heads: rows must be a multiple of 2 * heads")
    # (H, hd/2, 2, ...) -> (H, 2, hd/2, ...) -> back to (rows, ...)
    return w.reshape(n_head, rows // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)

"""Real weights: SmolLM2-135M-Instruct (30 layers, 9 heads / 3 KV heads, tied embeddings, BPE vocabulary)
read from its Q4_1 GGUF into Atelier's model, re-exported with export_tensors, and run by llama.cpp.

The F32 re-export must give llama.cpp exactly the greedy tokens Atelier's fp32 model gives with the same
(dequantized) weights; a Q8_0 re-export must agree with the original Q4_1 file on most of them.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from modules.llm.config import LlamaConfig
from modules.quantize.gguf_export import export_tensors
from modules.quantize.gguf_names import hf_name, tensor_plan, unpermute_qk
from modules.quantize.tokenizer_to_gguf import GGUFTokenizer

PROMPTS = ["<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n",
           "The three primary colors are"]


@pytest.fixture(scope="module")
def smollm2_model():
    """(path, config, HF-named fp32 tensors, tokenizer) read from the SmolLM2 GGUF."""
    from gguf import GGUFReader
    from gguf.quants import dequantize
    from smollm2_fetch import smollm2_gguf

    path = smollm2_gguf()
    reader = GGUFReader(str(path))

    def field(key):
        return reader.fields[key].contents()

    config = LlamaConfig(vocab_size=int(field("llama.vocab_size")), hidden_size=int(field("llama.embedding_length")),
                         intermediate_size=int(field("llama.feed_forward_length")),
                         num_hidden_layers=int(field("llama.block_count")),
                         num_attention_heads=int(field("llama.attention.head_count")),
                         num_key_value_heads=int(field("llama.attention.head_count_kv")),
                         max_position_embeddings=int(field("llama.context_length")),
                         rms_norm_eps=float(field("llama.attention.layer_norm_rms_epsilon")),
                         rope_theta=float(field("llama.rope.freq_base")), tie_word_embeddings=True)
    heads = {e.hf_name: e.permute_heads for e in tensor_plan(config)}
    state = {}
    for t in reader.tensors:
        name = hf_name(t.name)
        w = torch.from_numpy(dequantize(np.array(t.data), t.tensor_type).astype(np.float32))
        w = w.reshape([int(d) for d in reversed(t.shape)]) if len(t.shape) > 1 else w.reshape(-1)
        state[name] = unpermute_qk(w, heads[name]) if heads.get(name) else w
    return path, config, state, GGUFTokenizer.from_gguf(path)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_smollm2_reexported_f32_is_greedy_identical_and_q8_0_agrees_with_the_original(smollm2_model, tmp_path,
                                                                                      record_property):
    pytest.importorskip("llama_cpp")
    from llama_cpp_runner import LlamaCppModel, atelier_greedy

    from modules.llm.model import Llama
    path, config, state, tokenizer = smollm2_model
    assert (config.num_hidden_layers, config.num_attention_heads, config.num_key_value_heads) == (30, 9, 3)
    with torch.device("meta"):
        model = Llama(config)
    model.load_state_dict({**state, "lm_head.weight": state["model.embed_tokens.weight"]}, strict=True, assign=True)
    model.lm_head.weight = model.model.embed_tokens.weight
    model.eval()

    f32 = export_tensors(config, state.items(), tokenizer, tmp_path / "smol.F32.gguf", "F32", name="SmolLM2")
    q8 = export_tensors(config, state.items(), tokenizer, tmp_path / "smol.Q8_0.gguf", "Q8_0", name="SmolLM2",
                        threads=1)
    with LlamaCppModel(path) as original:
        prompts = [original.tokenize(p, special=True) for p in PROMPTS]
        reference = [original.greedy(ids, 12) for ids in prompts]
    with LlamaCppModel(f32) as reexport:
        assert [reexport.tokenize(p, special=True) for p in PROMPTS] == prompts
        f32_tokens = [reexport.greedy(ids, 12) for ids in prompts]
    for ids, tokens in zip(prompts, f32_tokens):
        assert tokens == atelier_greedy(model, ids, 12)
    with LlamaCppModel(q8) as requantized:
        q8_tokens = [requantized.greedy(ids, 12) for ids in prompts]
    matching = sum(a == b for seq_a, seq_b in zip(q8_tokens, reference) for a, b in zip(seq_a, seq_b))
    record_property("smollm2_q8_0_vs_q4_1_tokens", f"{matching}/{12 * len(prompts)}")
    assert matching >= 12 * len(prompts) // 2

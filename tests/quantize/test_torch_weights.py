"""Quantized Llama models: quantize_model, saved folders that load back exactly, the load-time setting,
generation through the engine, and what quantization costs the shipped demo chat model."""
import json
from pathlib import Path

import pytest
import torch

from modules.llm.checkpoint import CheckpointError, load_model
from modules.llm.config import LlamaConfig
from modules.llm.engine import GenerationRequest, generate
from modules.llm.loader import load_llm
from modules.llm.model import Llama
from modules.llm.sampling import SamplingParams
from modules.quantize.torch_linear import Int4Linear, Int8Linear
from modules.quantize.torch_weights import (QUANT_SCHEMES, WEIGHT_QUANT_CHOICES, QuantizedCheckpointError,
                                            model_quantization, quantize_model, read_quantization_config,
                                            save_quantized_folder)

DEMO = Path(__file__).resolve().parents[2] / "models" / "LLM" / "atelier-tiny-chat"
IDS = torch.tensor([[1, 17, 250, 33, 7, 400, 12, 5]])


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    from modules.fixtures import llm as fixture
    return fixture.write(tmp_path_factory.mktemp("torchq"))[0]


def logits(model, ids=IDS):
    with torch.inference_mode():
        return model(ids)


def tied_model(seed=0):
    from modules.fixtures.llm import randomize_weights
    config = LlamaConfig.from_name("tiny-gqa", tie_word_embeddings=True)
    torch.manual_seed(seed)
    model = Llama(config)
    randomize_weights(model, seed)
    return model.eval().requires_grad_(False)


@pytest.mark.parametrize("scheme", QUANT_SCHEMES)
def test_quantize_model_replaces_every_block_linear_and_lm_head(folder, scheme):
    model = load_model(folder)
    before = logits(model)
    quantize_model(model, scheme)
    kind = Int8Linear if scheme == "int8" else Int4Linear
    for block in model.model.layers:
        for layer in (block.self_attn.q_proj, block.self_attn.k_proj, block.self_attn.v_proj, block.self_attn.o_proj,
                      block.mlp.gate_proj, block.mlp.up_proj, block.mlp.down_proj):
            assert isinstance(layer, kind)
    assert isinstance(model.lm_head, kind)
    assert isinstance(model.model.embed_tokens, torch.nn.Embedding)           # embeddings stay
    assert model_quantization(model)["scheme"] == scheme
    after = logits(model)
    # close to the fp32 model (random fixture weights, logits of unit scale), not identical
    assert 0 < (after - before).abs().mean() < (0.02 if scheme == "int8" else 0.2)
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model, "int8")


@pytest.mark.parametrize("scheme", QUANT_SCHEMES)
def test_saved_folder_loads_back_with_identical_logits(folder, tmp_path, scheme):
    model = quantize_model(load_model(folder), scheme)
    out = save_quantized_folder(model, tmp_path / "q", scheme, tokenizer_dir=folder)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"] == {
        "quant_method": "atelier", "scheme": scheme, "bits": 8 if scheme == "int8" else 4,
        "group_size": None if scheme == "int8" else int(scheme.split("-g")[1]), "lm_head": True,
        "kernel_dtype": "bfloat16", "format_version": 1}
    assert (out / "tokenizer.model").is_file()
    from safetensors import safe_open
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        stored = f.get_tensor("model.layers.0.mlp.down_proj.weight")
    assert stored.dtype == (torch.int8 if scheme == "int8" else torch.uint8)
    back = load_model(out)
    assert model_quantization(back) == model_quantization(model)
    assert torch.equal(logits(back), logits(model))


@pytest.mark.parametrize("lm_head", [True, False])
def test_tied_embeddings_round_trip(tmp_path, lm_head):
    model = quantize_model(tied_model(), "int4-g32", lm_head=lm_head)
    assert isinstance(model.lm_head, Int4Linear) is lm_head
    if not lm_head:
        assert model.lm_head.weight is model.model.embed_tokens.weight
    out = save_quantized_folder(model, tmp_path / "tied")
    back = load_model(out)
    assert torch.equal(logits(back), logits(model))
    if not lm_head:
        assert back.lm_head.weight is back.model.embed_tokens.weight


def test_weight_quant_setting_through_load_llm_reduces_memory(folder, tmp_path):
    plain = load_llm(folder)
    sizes = {"none": plain.memory_bytes()}
    for scheme in ("int8", "int4-g32"):
        llm = load_llm(folder, weight_quant=scheme)
        assert model_quantization(llm.model)["scheme"] == scheme
        assert llm.dtype == torch.float32 and llm.device.type == "cpu"
        sizes[scheme] = llm.memory_bytes()
    assert sizes["int4-g32"] < sizes["int8"] < 0.5 * sizes["none"]
    # a folder stored quantized keeps its own scheme, whatever the setting asks
    out = save_quantized_folder(load_llm(folder, weight_quant="int8").model, tmp_path / "q8", tokenizer_dir=folder)
    assert model_quantization(load_llm(out, weight_quant="int4-g64").model)["scheme"] == "int8"
    with pytest.raises(ValueError, match="unknown weight quantization 'int3'"):
        load_llm(folder, weight_quant="int3")


def test_setting_is_declared_with_its_choices():
    from modules.llm.capability import settings_section
    spec = {s.key: s for s in settings_section().specs}["llm.weight_quantization"]
    assert spec.default == "none" and tuple(spec.choices) == WEIGHT_QUANT_CHOICES


def test_service_applies_the_setting(make_ctx, folder):
    """The Chat tab and /v1 load through LLMService: the setting applies there, and the model manager records
    the quantized size."""
    ctx = make_ctx(data_dir=folder.parent.parent.parent)
    sizes = {}
    for choice in ("none", "int8"):
        ctx.settings.set("llm.weight_quantization", choice)
        lease = ctx.llm.acquire(folder.name)
        try:
            assert isinstance(lease.model.model.lm_head, Int8Linear) is (choice == "int8")
            sizes[choice] = ctx.models.loaded("llm")[0]["size_mb"]
        finally:
            lease.release()
        if choice == "none":
            ctx.llm.unload(folder.name)
    assert sizes["int8"] < 0.5 * sizes["none"]
    run = ctx.llm.chat([{"role": "user", "content": "Hello"}], SamplingParams(temperature=0, max_new_tokens=6,
                                                                               ignore_eos=True))
    assert run.result(60).completion_tokens == 6


def test_bad_folders_and_calls_get_clear_errors(folder, tmp_path):
    model = quantize_model(load_model(folder), "int8")
    out = save_quantized_folder(model, tmp_path / "q")
    with pytest.raises(FileExistsError, match="overwrite=True"):
        save_quantized_folder(model, out)
    with pytest.raises(ValueError, match="quantized as int8, not int4-g32"):
        save_quantized_folder(model, tmp_path / "other", "int4-g32")
    with pytest.raises(ValueError, match="not quantized: call quantize_model"):
        save_quantized_folder(load_model(folder), tmp_path / "plain")
    with pytest.raises(ValueError, match="unknown weight quantization scheme 'int2'"):
        quantize_model(load_model(folder), "int2")

    config_path = out / "config.json"
    config = json.loads(config_path.read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    config_path.write_text(json.dumps(config))
    with pytest.raises(QuantizedCheckpointError, match="quantized with 'gptq', which Atelier cannot load"):
        load_model(out)
    config["quantization_config"] = {"quant_method": "atelier", "scheme": "int4-g64", "bits": 8, "group_size": None,
                                     "lm_head": True, "format_version": 1}
    config_path.write_text(json.dumps(config))
    with pytest.raises(QuantizedCheckpointError, match="do not match scheme int4-g64"):
        read_quantization_config(out)
    config["quantization_config"].update(bits=4, group_size=64)      # valid, but the tensors are int8's
    config_path.write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="weight_zero"):
        load_model(out)


def test_int4_refuses_a_model_off_the_cpu():
    with torch.device("meta"):
        model = Llama(LlamaConfig.from_name("tiny-gqa"))
    with pytest.raises(ValueError, match="no weights yet"):
        quantize_model(model, "int4-g32")


# ---------------------------------------------------------------------------- the shipped demo chat model
@pytest.fixture(scope="module")
def demo():
    return {scheme: load_llm(DEMO, weight_quant=scheme) for scheme in ("none", "int8", "int4-g32", "int4-g128")}


def test_greedy_generation_through_the_engine(demo):
    """int8 and int4 reply like the fp32 model on held-out drawing requests (the demo model's surest task)."""
    from modules.llm.service import render_prompt
    from modules.quantize.heldout_text import heldout_chats
    chats = [c for c in heldout_chats(6) if "background" in c[-1]["content"]]
    assert len(chats) == 6

    def replies(llm):
        params = SamplingParams(temperature=0, max_new_tokens=40)
        results = generate(llm, [GenerationRequest(render_prompt(llm, c[:-1])[1], params) for c in chats])
        assert all(r.finish_reason == "stop" for r in results)
        return [r.text for r in results]

    reference = replies(demo["none"])
    assert sum(r == c[-1]["content"] for r, c in zip(reference, chats)) >= 5
    for scheme in ("int8", "int4-g32", "int4-g128"):
        assert replies(demo[scheme]) == reference, scheme


def test_answer_perplexity_barely_moves(demo):
    """Measured by benchmarks/quantize_torch.py (120 chats): int8 -0.03 %, int4 +0.36 to +0.46 %; bounds 1 %, 3 %."""
    from modules.quantize.heldout_text import answer_perplexity, answer_requests, heldout_chats
    base = demo["none"]
    requests = answer_requests(base.tokenizer, base.template, heldout_chats(12))
    with torch.inference_mode():
        ppl = {scheme: answer_perplexity(llm.model, requests)["ppl"] for scheme, llm in demo.items()}
    assert 1 < ppl["none"] < 3
    assert abs(ppl["int8"] / ppl["none"] - 1) < 0.01
    for scheme in ("int4-g32", "int4-g128"):
        assert abs(ppl[scheme] / ppl["none"] - 1) < 0.03, (scheme, ppl)
    assert demo["int4-g32"].memory_bytes() < demo["int8"].memory_bytes() < 0.4 * demo["none"].memory_bytes()

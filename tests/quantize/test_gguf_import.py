"""GGUF import: tiny fixture round trips (F32 exact, Q8_0 within a step), every refusal, listing and serving
through LLMService; and the real SmolLM2-135M-Instruct Q4_1 file against transformers' and llama.cpp's own
readers of the same file."""
from __future__ import annotations

import shutil

import numpy as np
import pytest
import torch
from gguf_fixture import permute, q8_0_step, write_gguf

from modules.quantize.gguf_import import (GGUFImportError, gguf_load_bytes, gguf_state_dict, gguf_tokenizer_files,
                                          inspect_gguf, read_gguf_files, unpermute)

TEXTS = ["Hello! How are you today?", "  two leading spaces", "The capital of France is Paris.",
         "Numbers 12, 345 and 6789", "Café naïve 😀 日本語", "tabs\tand\nnew lines\n\n", ""]


def original_state(folder):
    from safetensors.torch import load_file
    return {k: v.float() for k, v in load_file(str(folder / "model.safetensors")).items()}


# ------------------------------------------------------------------------------------------ fixture files
def test_f32_round_trip_gives_the_weights_back_exactly(tiny_folder, tiny_ggufs):
    original = original_state(tiny_folder)
    state = gguf_state_dict(tiny_ggufs["F32"])
    assert set(state) == set(original)
    for name, tensor in original.items():
        assert torch.equal(state[name], tensor), name


def test_q8_0_round_trip_is_within_one_quant_step(tiny_folder, tiny_ggufs):
    original = original_state(tiny_folder)
    state = gguf_state_dict(tiny_ggufs["Q8_0"], dtype=torch.float32)
    quantized = 0
    for name, tensor in original.items():
        if tensor.ndim == 2 and tensor.shape[1] % 32 == 0:
            error = (state[name] - tensor).abs()
            assert (error <= q8_0_step(tensor)).all(), name
            assert error.max() > 0, f"{name} was not quantized"
            quantized += 1
        else:                      # norms (always F32) and down_proj (176-wide rows) stay exact
            assert torch.equal(state[name], tensor), name
    assert quantized == 14      # q, k, v, o, gate, up per layer; the embedding and the output
    assert gguf_state_dict(tiny_ggufs["Q8_0"], dtype=torch.bfloat16)["lm_head.weight"].dtype == torch.bfloat16


def test_unpermute_inverts_llama_cpps_permute():
    gen = torch.Generator().manual_seed(0)
    for heads, rows in ((4, 64), (2, 32), (3, 192)):
        weight = torch.randn(rows, 8, generator=gen)
        permuted = torch.from_numpy(permute(weight.numpy(), heads))
        assert not torch.equal(permuted, weight)
        assert torch.equal(unpermute(permuted, heads), weight)
        bias = torch.randn(rows, generator=gen)
        assert torch.equal(unpermute(torch.from_numpy(permute(bias.numpy(), heads)), heads), bias)


def test_inspect_reads_the_header_only(tiny_folder, tiny_ggufs):
    from modules.llm.config import LlamaConfig
    want = LlamaConfig.from_json_file(tiny_folder / "config.json")
    f32, q8 = inspect_gguf(tiny_ggufs["F32"]), inspect_gguf(tiny_ggufs["Q8_0"])
    for field in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "tie_word_embeddings"):
        assert getattr(f32.config, field) == getattr(want, field), field
    assert f32.config.rms_norm_eps == pytest.approx(want.rms_norm_eps)
    assert (f32.architecture, f32.file_type, f32.tokenizer_model) == ("llama", "F32", "llama")
    assert f32.tensor_types == {"F32": 21} and f32.bits_per_weight == 32.0
    assert q8.file_type == "Q8_0" and q8.tensor_types == {"Q8_0": 14, "F32": 7}
    assert q8.n_parameters == f32.n_parameters == want.num_parameters()
    assert q8.bits_per_weight < f32.bits_per_weight / 2 and q8.size_bytes == tiny_ggufs["Q8_0"].stat().st_size
    assert "Q8_0" in q8.summary() and f32.chat_template and "<|assistant|>" in f32.chat_template
    assert gguf_load_bytes(tiny_ggufs["Q8_0"], torch.float32) == 4 * want.num_parameters()


def test_gguf_model_computes_what_the_folder_model_computes(tiny_folder, tiny_ggufs, tmp_path):
    from modules.llm.loader import load_llm, read_llm_files
    folder, gguf = load_llm(tiny_folder), load_llm(tiny_ggufs["F32"])
    assert gguf.name == "tiny.F32.gguf" and gguf.path == tiny_ggufs["F32"]
    ids = torch.tensor([folder.tokenizer.encode("Once upon a time there was a little robot")])
    assert torch.equal(gguf.model(ids), folder.model(ids))
    for text in TEXTS:       # plain text: the rebuilt SentencePiece model splits as the original
        assert gguf.tokenizer.encode(text) == folder.tokenizer.encode(text), text
    files = read_llm_files(tiny_ggufs["F32"])
    assert files.template.origin == "tokenizer_config.json" and files.template.eos_token == "</s>"
    written = gguf_tokenizer_files(tiny_ggufs["F32"], tmp_path)
    assert sorted(p.name for p in written) == ["tokenizer.model", "tokenizer_config.json"]
    assert list(tiny_ggufs["F32"].parent.glob(".*")) == []     # nothing written next to the user's file


def test_sentencepiece_tokenizer_matches_llama_cpp(tiny_ggufs):
    llama_cpp = pytest.importorskip("llama_cpp")
    reference = llama_cpp.Llama(model_path=str(tiny_ggufs["F32"]), vocab_only=True, verbose=False)
    tokenizer = read_gguf_files(tiny_ggufs["F32"]).tokenizer
    for text in [*TEXTS, "<|user|>\nHi</s>\n<|assistant|>\n", "</s> after a special token"]:
        assert tokenizer.encode(text) == reference.tokenize(text.encode(), add_bos=True, special=True), text


# ------------------------------------------------------------------------------------------------ refusals
@pytest.fixture(scope="module")
def refused(tiny_folder, tiny_ggufs, tmp_path_factory):
    """name -> a GGUF (or not) that inspect_gguf must refuse."""
    out = tmp_path_factory.mktemp("refused")
    data = tiny_ggufs["F32"].read_bytes()
    files = {"truncated.gguf": data[:-1000], "header-cut.gguf": data[:2000], "tiny.gguf": data[:300], "empty.gguf": b"",
             "not-gguf.gguf": b'{"__metadata__": {}}' + bytes(100)}
    for name, content in files.items():
        (out / name).write_bytes(content)
    write_gguf(tiny_folder, out / "qwen.gguf", arch="qwen2")
    write_gguf(tiny_folder, out / "int8.gguf", tensor_types={"blk.0.attn_q.weight": np.int8})
    write_gguf(tiny_folder, out / "bert-vocab.gguf", tokenizer_model="bert")
    write_gguf(tiny_folder, out / "missing.gguf", drop=("blk.1.ffn_down.weight",))
    return out


@pytest.mark.parametrize("name, message", [
    ("truncated.gguf", r"is truncated: tensor blk\.1\.attn_v\.weight \(\[32, 64\], F32\) needs bytes "
                       r".* download the file again"),
    ("header-cut.gguf", r"truncated or damaged: reading .* runs past the end of the file"),
    ("tiny.gguf", r"truncated or damaged: its header lists 21 tensors and 23 metadata entries, more than its 300"),
    ("empty.gguf", r"is not a GGUF file: it has only 0 bytes"),
    ("not-gguf.gguf", r"is not a GGUF file \(it starts with b'\{\"__', not b'GGUF'\)"),
    ("qwen.gguf", r"is a 'qwen2' model \(general\.architecture\); Atelier's own engine runs only 'llama'"),
    ("int8.gguf", r"tensor blk\.0\.attn_q\.weight is stored as I8, which the gguf package .* cannot dequantize\. "
                  r"Atelier can import F32, F16, Q4_0, Q4_1, Q5_0, Q5_1, Q8_0, Q2_K, Q3_K, Q4_K"),
    ("bert-vocab.gguf", r"has a 'bert' tokenizer .* builds 'llama' \(SentencePiece\) and 'gpt2'"),
    ("missing.gguf", r"missing tensors: model\.layers\.1\.mlp\.down_proj\.weight"),
])
def test_bad_files_are_refused_with_a_reason(refused, name, message):
    with pytest.raises(GGUFImportError, match=message) as caught:
        inspect_gguf(refused / name)
    assert str(refused / name) in str(caught.value)
    with pytest.raises(GGUFImportError, match=message):   # loading says the same before reading any weight
        gguf_state_dict(refused / name)


# --------------------------------------------------------------------------------------- listing and serving
def test_service_lists_gguf_files_and_serves_one(make_ctx, tiny_folder, tiny_ggufs, refused, tmp_path):
    from modules.llm.sampling import SamplingParams
    llm_dir = tmp_path / "data" / "models" / "LLM"
    llm_dir.mkdir(parents=True)
    shutil.copytree(tiny_folder, llm_dir / tiny_folder.name)
    shutil.copy(tiny_ggufs["Q8_0"], llm_dir / "tiny.gguf")
    shutil.copy(refused / "qwen.gguf", llm_dir / "other-arch.gguf")
    (llm_dir / "notes.txt").write_text("not a model", encoding="utf-8")
    ctx = make_ctx(data_dir=tmp_path / "data")
    ctx.settings.set("llm.gguf_backend", "atelier")   # Atelier's own engine (llama.cpp: tests/llm/test_llamacpp_backend.py)
    service = ctx.llm
    listed = {m["name"]: m for m in service.list_models()}
    assert list(listed) == [tiny_folder.name, "other-arch.gguf", "tiny.gguf"]      # folders first
    assert listed[tiny_folder.name]["format"] == "hf" and listed["tiny.gguf"]["format"] == "gguf"
    assert listed["tiny.gguf"]["error"] is None and "'qwen2' model" in listed["other-arch.gguf"]["error"]
    assert service.model_names() == [tiny_folder.name, "tiny.gguf"]
    assert service.resolve_model() == tiny_folder.name        # adding a GGUF does not change the default

    prompt = service.files(tiny_folder.name).tokenizer.encode("Once upon a time")
    greedy = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    replies = {}
    for name in (tiny_folder.name, "tiny.gguf"):
        handle, used = service.complete(prompt, greedy, model=name)
        replies[name] = handle.result(timeout=60).token_ids
        assert used == name
    from modules.weight_bytes import estimate_load_bytes
    expected = gguf_load_bytes(llm_dir / "tiny.gguf", ctx.devices.dtype)  # dequantized: larger than the file
    assert estimate_load_bytes(llm_dir / "tiny.gguf", ctx.devices.dtype) == expected
    assert expected > (llm_dir / "tiny.gguf").stat().st_size
    entry = next(e for e in ctx.models.loaded("llm") if e["key"] == "llm:tiny.gguf")
    assert entry["size_mb"] == round(expected / 2**20, 1)
    # Q8_0 weights: the greedy path may part ways late, but not at the first tokens of a 0.2M-parameter model
    assert replies["tiny.gguf"][:2] == replies[tiny_folder.name][:2]
    run = service.chat([{"role": "user", "content": "Hello!"}], greedy, model="tiny.gguf")
    assert run.result(timeout=60).completion_tokens == 8
    assert run.plan.text == "<|user|>\nHello!</s>\n<|assistant|>\n"      # the template inside the file


# --------------------------------------------------------------------------- real weights: SmolLM2-135M Q4_1
SMOL_TEXTS = ["The capital of France is", "Numbers 12345 and 3.14159!", "  leading spaces\n\nand\ttabs  ",
              "Café naïve 😀 日本語", "<|im_start|>user\nHi<|im_end|>\n", "don't you'll I'M", "a1b22c333",
              "x = {'k': [1, 2]}\n\n\n    return x", "<|endoftext|>end", " ", ""]


@pytest.fixture(scope="module")
def smol(smollm_gguf):
    from modules.llm.loader import load_llm
    return load_llm(smollm_gguf, "cpu", torch.float32)


def test_smollm_header(smollm_gguf):
    info = inspect_gguf(smollm_gguf)
    c = info.config
    assert (c.num_hidden_layers, c.hidden_size, c.intermediate_size, c.num_attention_heads, c.num_key_value_heads,
            c.head_dim, c.vocab_size) == (30, 576, 1536, 9, 3, 64, 49152)
    assert c.tie_word_embeddings and c.rope_theta == 100000.0 and c.max_position_embeddings == 8192
    assert (c.bos_token_id, c.eos_token_id) == (1, 2)
    assert info.file_type == "Q4_1" and info.tensor_types == {"Q4_1": 210, "F32": 61, "Q8_0": 1}
    assert (info.tokenizer_model, info.tokenizer_pre) == ("gpt2", "smollm")
    assert info.n_parameters == c.num_parameters() == 134_515_008
    assert 5.7 < info.bits_per_weight < 5.8


def test_smollm_logits_equal_transformers_gguf_loader(smol, smollm_gguf):
    transformers = pytest.importorskip("transformers")
    transformers.logging.set_verbosity_error()
    reference = transformers.AutoModelForCausalLM.from_pretrained(
        str(smollm_gguf.parent), gguf_file=smollm_gguf.name, dtype=torch.float32).eval()
    prompt = smol.template.render([{"role": "user", "content": "What is the capital of France?"}])
    ids = torch.tensor([smol.tokenizer.encode(prompt, add_bos=False)])
    with torch.no_grad():
        ours, theirs = smol.model(ids), reference(ids).logits
    scale = theirs.abs().max().item()
    diff = (ours - theirs).abs().max().item()
    print(f"\nSmolLM2 Q4_1, {ids.shape[1]} tokens, fp32: max |logit difference| = {diff:.3g} "
          f"(logit scale {scale:.1f})")
    assert diff <= 1e-4 * scale
    assert torch.equal(ours[0].argmax(-1), theirs[0].argmax(-1))


def test_smollm_tokenizer_encodes_like_transformers(smol, smollm_gguf):
    from transformers import AutoTokenizer
    reference = AutoTokenizer.from_pretrained(str(smollm_gguf.parent), gguf_file=smollm_gguf.name)
    for text in SMOL_TEXTS:
        ids = smol.tokenizer.encode(text)            # add_bos_token is false in the file: no BOS
        assert ids == reference.encode(text, add_special_tokens=True), text
        assert smol.tokenizer.decode(ids, skip_special_tokens=False) == text
    specials = ("<|im_start|>", "<|im_end|>", "<|endoftext|>")
    assert (smol.tokenizer.bos_token, smol.tokenizer.eos_token, smol.tokenizer.unk_token) == specials
    assert (reference.bos_token, reference.eos_token, reference.unk_token) == specials


def test_smollm_tokenizer_encodes_like_llama_cpp(smol, smollm_gguf):
    llama_cpp = pytest.importorskip("llama_cpp")
    reference = llama_cpp.Llama(model_path=str(smollm_gguf), vocab_only=True, verbose=False)
    for text in SMOL_TEXTS:
        assert smol.tokenizer.encode(text) == reference.tokenize(text.encode(), add_bos=True, special=True), text


@pytest.mark.parametrize("pre", ["gpt-2", "llama-bpe", "smollm"])
def test_byte_level_pre_tokenizers_match_llama_cpp(smollm_gguf, tmp_path, pre):
    """The same vocabulary under each pre-tokenizer Atelier reproduces (Llama-3's regex and ignore_merges too)."""
    from gguf_fixture import write_vocab_only

    from modules.llm.tokenizer import Tokenizer
    from modules.quantize.gguf_header import read_gguf_header
    from modules.quantize.tokenizer_from_gguf import TOKENIZER_ARRAYS, write_gguf_tokenizer_files
    llama_cpp = pytest.importorskip("llama_cpp")
    path = write_vocab_only(smollm_gguf, tmp_path / f"{pre}.gguf", pre)
    reference = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False)
    write_gguf_tokenizer_files(read_gguf_header(path, TOKENIZER_ARRAYS), tmp_path / "tokenizer")
    tokenizer = Tokenizer.from_dir(tmp_path / "tokenizer")
    assert tokenizer.add_bos_token == (pre == "llama-bpe")       # llama.cpp's default for each pre-tokenizer
    for text in [*SMOL_TEXTS, "HELLO'S World's", " \n \n"]:
        assert tokenizer.encode(text, add_bos=False) == reference.tokenize(text.encode(), add_bos=False,
                                                                           special=True), text


def test_smollm_greedy_chat_through_the_service(make_ctx, smollm_gguf, tmp_path):
    from modules.llm.sampling import SamplingParams
    llm_dir = tmp_path / "data" / "models" / "LLM"
    llm_dir.mkdir(parents=True)
    (llm_dir / smollm_gguf.name).symlink_to(smollm_gguf)
    ctx = make_ctx(data_dir=tmp_path / "data")
    ctx.settings.set("llm.gguf_backend", "atelier")   # imported into Atelier's own model (llama.cpp: below)
    service = ctx.llm
    assert service.model_names() == [smollm_gguf.name]
    greedy = SamplingParams(temperature=0, max_new_tokens=16)
    run = service.chat([{"role": "user", "content": "What is the capital of France?"}], greedy)
    result = run.result(timeout=300)
    assert run.plan.text.startswith("<|im_start|>system\nYou are a helpful AI assistant named SmolLM")
    assert run.plan.ids.count(1) == 3 and run.plan.ids[0] == 1        # <|im_start|> x3, no extra BOS
    assert "Paris" in result.text, result.text
    handle, _ = service.complete("The capital of France is", SamplingParams(temperature=0, max_new_tokens=4))
    assert "Paris" in handle.result(timeout=300).text


def test_smollm_served_by_llama_cpp_answers_and_counts_like_the_native_engine(make_ctx, smollm_gguf, tmp_path):
    """The real Q4_1 file through the llama.cpp backend (the default for GGUF): same prompt ids as Atelier's
    engine, a sensible completion, token counts. Its greedy chat reply may differ from the dequantized model's:
    llama.cpp multiplies 4-bit weights with 8-bit-quantized activations, and SmolLM2's first reply token is a
    near tie ("The" 25.33 vs "L" 25.24 in fp32)."""
    from modules.llm.sampling import SamplingParams
    llm_dir = tmp_path / "data" / "models" / "LLM"
    llm_dir.mkdir(parents=True)
    (llm_dir / smollm_gguf.name).symlink_to(smollm_gguf)
    ctx = make_ctx(data_dir=tmp_path / "data")
    service = ctx.llm
    assert service.backend(smollm_gguf.name) == "llama.cpp"
    handle, _ = service.complete("The capital of France is", SamplingParams(temperature=0, max_new_tokens=4))
    result = handle.result(timeout=300)
    assert "Paris" in result.text and result.completion_tokens <= 4 and result.prompt_tokens == 5
    run = service.chat([{"role": "user", "content": "What is the capital of France?"}],
                       SamplingParams(temperature=0, max_new_tokens=24))
    reply = run.result(timeout=300)
    assert reply.prompt_tokens == len(run.plan.ids) and reply.completion_tokens >= 1
    assert reply.finish_reason in ("stop", "length")


def test_a_gguf_can_be_kept_8_bit_in_atelier_s_model(tiny_ggufs):
    """Point 2 with point 4: a GGUF dequantized into Atelier's model, then held as int8 weights (the
    ``llm.weight_quantization`` setting), smaller and still giving the same greedy tokens on this model."""
    from modules.llm.engine import GenerationRequest, generate
    from modules.llm.loader import load_llm
    from modules.llm.sampling import SamplingParams
    from modules.quantize.torch_linear import Int8Linear
    plain = load_llm(tiny_ggufs["Q8_0"])
    kept = load_llm(tiny_ggufs["Q8_0"], weight_quant="int8")
    assert isinstance(kept.model.model.layers[0].mlp.down_proj, Int8Linear)
    assert kept.memory_bytes() < 0.6 * plain.memory_bytes()
    ids = plain.tokenizer.encode("Once upon a time")
    params = SamplingParams(temperature=0, max_new_tokens=8, ignore_eos=True)
    a, b = (generate(llm, [GenerationRequest(ids, params)])[0] for llm in (plain, kept))
    assert b.completion_tokens == 8 and b.token_ids[:3] == a.token_ids[:3]

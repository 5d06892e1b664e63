"""GGUF export: llama.cpp's conventions, read back with gguf.GGUFReader, and llama.cpp's own output.

F32 exports must give llama.cpp exactly Atelier's greedy tokens (fixture and shipped demo model);
quantized exports are made by llama.cpp's quantizer and must carry the right types.
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from modules.fixtures.llm import FIXTURE_MODELS, write_model
from modules.llm.config import LlamaConfig
from modules.quantize.errors import DiskFullError, GGUFExportError
from modules.quantize.gguf_export import export_model, write_gguf
from modules.quantize.gguf_info import gguf_file_info
from modules.quantize.gguf_names import permute_qk, tensor_plan, unpermute_qk
from modules.quantize.tokenizer_to_gguf import GGUFTokenizer

REPO = Path(__file__).resolve().parents[2]
DEMO = REPO / "models" / "LLM" / "atelier-tiny-chat"
PROMPTS = ["Hello! How are you", "The quick brown fox", "Once upon a time there was",
           "What is the capital of France?", "def add(a, b):"]
#: 256-wide: k-quant blocks fit, so Q4_K_M really is Q4_K / Q6_K (the 64-wide fixture falls back)
WIDE = dict(vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
            tie_word_embeddings=False)


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """Atelier's reference decoding on one thread: on a shared 2-core host two threads are 100x slower."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("tiny") / "tiny", FIXTURE_MODELS["tiny-llama-gqa"])


@pytest.fixture(scope="module")
def wide(tmp_path_factory) -> Path:
    return write_model(tmp_path_factory.mktemp("wide") / "wide", WIDE, seed=3)


@pytest.fixture(scope="module")
def exports(tiny, tmp_path_factory) -> dict[str, Path]:
    out = tmp_path_factory.mktemp("exports")
    return {t: export_model(tiny, out / f"tiny.{t}.gguf", t, threads=1)
            for t in ("F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_K_M")}


def reader(path):
    from gguf import GGUFReader
    return GGUFReader(str(path))


def value(r, key):
    return r.fields[key].contents()


def hf_state(folder: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file
    return load_file(str(folder / "model.safetensors"))


# ------------------------------------------------------------------------------------ metadata
def test_every_llama_cpp_key_is_written_with_its_value(exports, tiny):
    r = reader(exports["F32"])
    config = LlamaConfig.from_json_file(tiny / "config.json")
    assert bytes(r.data[:4]) == b"GGUF" and value(r, "GGUF.version") == 3 and r.alignment == 32
    expected = {
        "general.architecture": "llama", "general.type": "model", "general.name": "tiny", "general.file_type": 0,
        "general.quantization_version": 2, "llama.block_count": 2, "llama.context_length": 256,
        "llama.embedding_length": 64, "llama.feed_forward_length": 176, "llama.attention.head_count": 4,
        "llama.attention.head_count_kv": 2, "llama.vocab_size": 512, "llama.rope.dimension_count": 16,
        "tokenizer.ggml.model": "llama", "tokenizer.ggml.pre": "default", "tokenizer.ggml.bos_token_id": 1,
        "tokenizer.ggml.eos_token_id": 2, "tokenizer.ggml.unknown_token_id": 0,
        "tokenizer.ggml.padding_token_id": 2, "tokenizer.ggml.add_bos_token": True,
        "tokenizer.ggml.add_eos_token": False,
    }
    assert {k: value(r, k) for k in expected} == expected
    assert value(r, "llama.rope.freq_base") == pytest.approx(config.rope_theta)
    assert value(r, "llama.attention.layer_norm_rms_epsilon") == pytest.approx(1e-5, rel=1e-6)
    assert "llama.attention.key_length" not in r.fields        # head_dim = hidden / heads: llama.cpp's default
    # The chat template goes in verbatim
    template = json.loads((tiny / "tokenizer_config.json").read_text())["chat_template"]
    assert value(r, "tokenizer.chat_template") == template
    assert {k: value(reader(exports[t]), "general.file_type") for k, t in
            (("F16", "F16"), ("BF16", "BF16"))} == {"F16": 1, "BF16": 32}


def test_tokenizer_pieces_scores_and_types_are_the_protobuf_s(exports, tiny):
    import sentencepiece as spm
    sp = spm.SentencePieceProcessor(model_file=str(tiny / "tokenizer.model"))
    r = reader(exports["F32"])
    tokens, scores = value(r, "tokenizer.ggml.tokens"), value(r, "tokenizer.ggml.scores")
    types = value(r, "tokenizer.ggml.token_type")
    assert tokens == [sp.IdToPiece(i) for i in range(sp.GetPieceSize())]
    assert np.allclose(scores, [sp.GetScore(i) for i in range(sp.GetPieceSize())])
    expected = [2 if sp.IsUnknown(i) else 3 if sp.IsControl(i) else 6 if sp.IsByte(i) else 1
                for i in range(sp.GetPieceSize())]
    assert types == expected and types[:4] == [2, 3, 3, 6] and types.count(6) == 256


def test_a_head_dim_other_than_hidden_over_heads_gets_key_and_value_length(tmp_path):
    tokenizer = GGUFTokenizer.from_hf_folder(DEMO, vocab_size=4096)
    config = LlamaConfig(**{**FIXTURE_MODELS["tiny-llama-gqa"], "head_dim": 32, "vocab_size": 4096})
    tensors = [(e.hf_name, torch.zeros(e.shape)) for e in tensor_plan(config)]
    path = write_gguf(config, tensors, tokenizer, tmp_path / "hd.gguf", "F16", name="hd")
    r = reader(path)
    assert value(r, "llama.attention.key_length") == 32 and value(r, "llama.attention.value_length") == 32
    assert value(r, "llama.rope.dimension_count") == 32
    assert {t.name: list(t.shape) for t in r.tensors}["blk.0.attn_q.weight"] == [64, 128]


# ------------------------------------------------------------------------------------- tensors
def test_tensors_renamed_reversed_permuted_and_norms_f32(exports, tiny):
    state = hf_state(tiny)
    config = LlamaConfig.from_json_file(tiny / "config.json")
    r = reader(exports["F32"])
    by_name = {t.name: t for t in r.tensors}
    assert set(by_name) == {e.gguf_name for e in tensor_plan(config)}
    assert "output.weight" in by_name and len(by_name) == 2 * 9 + 3
    for entry in tensor_plan(config):
        t = by_name[entry.gguf_name]
        assert list(t.shape) == list(reversed(entry.shape))                # ggml order: reversed
        assert t.tensor_type.name == "F32"
        data = torch.from_numpy(np.array(t.data)).reshape(entry.shape)
        source = state[entry.hf_name].float()
        if entry.permute_heads is None:
            assert torch.equal(data, source), entry.gguf_name
        else:
            assert not torch.equal(data, source)
            assert torch.equal(data, permute_qk(source, entry.permute_heads))
            assert torch.equal(unpermute_qk(data, entry.permute_heads), source)
    assert {e.gguf_name: e.permute_heads for e in tensor_plan(config) if e.permute_heads} == {
        "blk.0.attn_q.weight": 4, "blk.0.attn_k.weight": 2, "blk.1.attn_q.weight": 4, "blk.1.attn_k.weight": 2}
    f16 = {t.name: t.tensor_type.name for t in reader(exports["F16"]).tensors}
    assert {f16[n] for n in f16 if "norm" in n} == {"F32"} and f16["blk.0.attn_q.weight"] == "F16"
    assert f16["token_embd.weight"] == "F16"


def test_f16_and_bf16_values_are_torch_s_rounding(exports, tiny):
    state = hf_state(tiny)
    for kind, dtype in (("F16", torch.float16), ("BF16", torch.bfloat16)):
        t = {t.name: t for t in reader(exports[kind]).tensors}["blk.1.ffn_up.weight"]
        raw = np.array(t.data)
        expected = state["model.layers.1.mlp.up_proj.weight"].to(dtype)
        if kind == "F16":
            assert np.array_equal(raw.reshape(expected.shape), expected.numpy())
        else:   # stored as raw 16-bit patterns
            assert np.array_equal(raw.view(np.uint16).reshape(expected.shape),
                                  expected.view(torch.int16).numpy().view(np.uint16))


def test_permutation_pairs_rotate_half_rows_per_head():
    """Row j and row j + hd/2 of each head become rows 2j and 2j+1 (llama.cpp's interleaved RoPE pairs)."""
    heads, hd = 3, 8
    w = torch.arange(heads * hd, dtype=torch.float32)[:, None].expand(-1, 5).clone()
    p = permute_qk(w, heads)
    for h in range(heads):
        for j in range(hd // 2):
            assert p[h * hd + 2 * j, 0] == h * hd + j
            assert p[h * hd + 2 * j + 1, 0] == h * hd + hd // 2 + j
    for shape, n in (((24, 7), 3), ((24,), 3), ((96, 288), 2), ((288, 288), 6)):
        x = torch.randn(shape)
        assert torch.equal(unpermute_qk(permute_qk(x, n), n), x)
        assert torch.equal(permute_qk(unpermute_qk(x, n), n), x)
    with pytest.raises(ValueError, match="multiple of 2"):
        permute_qk(torch.zeros(10, 4), 3)


# -------------------------------------------------------------------------- llama.cpp vs Atelier
def test_f32_export_gives_llama_cpp_atelier_s_greedy_tokens_and_tokenization(exports, tiny):
    llama_cpp = pytest.importorskip("llama_cpp")
    from llama_cpp_runner import atelier_greedy

    from modules.llm.loader import load_llm
    llm = load_llm(tiny)
    model = llama_cpp.Llama(str(exports["F32"]), n_ctx=256, n_threads=1, verbose=False)
    try:
        for prompt in PROMPTS:
            ids = llm.tokenizer.encode(prompt)
            assert model.tokenize(prompt.encode(), add_bos=True, special=False) == ids
            model.reset()
            got = []
            for token in model.generate(ids, temp=0.0, top_k=1, repeat_penalty=1.0):
                got.append(token)
                if len(got) == 24:
                    break
            assert got == atelier_greedy(llm.model, ids, 24), prompt
        for text in ("Hello world", " leading space", "two  spaces", "new\nline", "Ünïcödé 123 ✓", "😀"):
            assert model.tokenize(text.encode(), add_bos=False, special=False) == llm.tokenizer.encode(text, False)
    finally:
        model.close()


def test_tied_embeddings_export_has_no_output_tensor_and_same_tokens(tmp_path):
    pytest.importorskip("llama_cpp")
    from llama_cpp_runner import LlamaCppModel, atelier_greedy

    from modules.llm.loader import load_llm
    folder = write_model(tmp_path / "tied", {**FIXTURE_MODELS["tiny-llama-gqa"], "tie_word_embeddings": True}, seed=5)
    out = export_model(folder, tmp_path / "tied.gguf", "F32")
    assert "output.weight" not in {t.name for t in reader(out).tensors}
    llm = load_llm(folder)
    with LlamaCppModel(out) as model:
        for prompt in PROMPTS[:3]:
            ids = llm.tokenizer.encode(prompt)
            assert model.greedy(ids, 16) == atelier_greedy(llm.model, ids, 16), prompt


def test_attention_and_mlp_biases_are_exported_permuted_and_used(tmp_path):
    """q/k biases are rows too (permuted like the weights); llama.cpp's llama architecture adds all of them."""
    pytest.importorskip("llama_cpp")
    from safetensors.torch import load_file, save_file

    from llama_cpp_runner import LlamaCppModel, atelier_greedy
    from modules.llm.loader import load_llm
    fields = {**FIXTURE_MODELS["tiny-llama-gqa"], "attention_bias": True, "mlp_bias": True}
    folder = write_model(tmp_path / "bias", fields, seed=7)
    state = load_file(str(folder / "model.safetensors"))
    gen = torch.Generator().manual_seed(1)
    state = {k: 0.5 * torch.randn(v.shape, generator=gen) if k.endswith(".bias") else v for k, v in state.items()}
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    out = export_model(folder, tmp_path / "bias.gguf", "F32")
    tensors = {t.name: np.array(t.data) for t in reader(out).tensors}
    assert len(tensors) == 21 + 2 * 7
    q_bias = state["model.layers.0.self_attn.q_proj.bias"]
    assert np.array_equal(tensors["blk.0.attn_q.bias"], permute_qk(q_bias, 4).numpy())
    assert np.array_equal(tensors["blk.1.ffn_down.bias"], state["model.layers.1.mlp.down_proj.bias"].numpy())
    llm = load_llm(folder)
    with LlamaCppModel(out) as model:
        for prompt in PROMPTS[:3]:
            ids = llm.tokenizer.encode(prompt)
            assert model.greedy(ids, 16) == atelier_greedy(llm.model, ids, 16), prompt


def test_demo_chat_model_f32_identical_and_q8_0_agreement(tmp_path, record_property):
    pytest.importorskip("llama_cpp")
    from llama_cpp_runner import LlamaCppModel, atelier_greedy

    from modules.llm.loader import load_llm
    llm = load_llm(DEMO)
    questions = ["What is Atelier?", "Draw a red circle on a blue background", "How do I load a model?", "Hello",
                 "What can you draw?", "Draw a small green square"]
    prompts = [llm.tokenizer.encode(llm.template.render([{"role": "user", "content": q}], add_generation_prompt=True))
               for q in questions]
    reference = [atelier_greedy(llm.model, ids, 24, stop=llm.tokenizer.eos_id) for ids in prompts]
    agree = {}
    for kind in ("F32", "Q8_0"):
        path = export_model(DEMO, tmp_path / f"chat.{kind}.gguf", kind, threads=1)
        with LlamaCppModel(path) as model:
            got = [model.greedy(ids, 24, stop=llm.tokenizer.eos_id) for ids in prompts]
        agree[kind] = sum(g == r for g, r in zip(got, reference))
    record_property("q8_0_greedy_agreement", f"{agree['Q8_0']}/{len(prompts)}")
    assert agree["F32"] == len(prompts)                 # identical
    assert agree["Q8_0"] >= len(prompts) // 2           # agreement, not identity: measured 6/6


# ----------------------------------------------------------------------------------- quantized
def test_quantized_exports_have_their_file_type_and_bits(exports):
    pytest.importorskip("llama_cpp")
    expected = {"Q8_0": (7, "Q8_0", 8.5), "Q4_0": (2, "Q4_0", 4.5), "Q4_K_M": (15, "Q5_0", 5.5)}
    for kind, (ftype, main, bits) in expected.items():
        r = reader(exports[kind])
        assert value(r, "general.file_type") == ftype
        tensors = {t.name: t for t in r.tensors}
        q = tensors["blk.0.attn_q.weight"]
        assert (q.tensor_type.name, 8 * int(q.n_bytes) / int(q.n_elements)) == (main, bits)
        # the 176-wide ffn_down rows are not whole 32-blocks: llama.cpp keeps them F16
        assert tensors["blk.0.ffn_down.weight"].tensor_type.name == "F16"
        assert {tensors[n].tensor_type.name for n in tensors if "norm" in n} == {"F32"}
        assert gguf_file_info(exports[kind]).file_type == kind
    assert tensor_types(exports["Q4_0"])["output.weight"] == "Q8_0"   # llama.cpp's Q6_K, 64 < 256 -> Q8_0
    sizes = {k: exports[k].stat().st_size for k in ("F32", "F16", "Q8_0", "Q4_0")}
    assert sizes["F32"] > sizes["F16"] > sizes["Q8_0"] > sizes["Q4_0"]
    assert not [p for p in exports["F32"].parent.iterdir() if p.suffix != ".gguf"]   # no temp / partial files


def tensor_types(path) -> dict[str, str]:
    return {t.name: t.tensor_type.name for t in reader(path).tensors}


def test_k_quants_on_256_wide_rows_and_the_q4_k_m_mix(wide, tmp_path):
    pytest.importorskip("llama_cpp")
    types = tensor_types(export_model(wide, tmp_path / "wide.Q4_K_M.gguf", "Q4_K_M", threads=1))
    assert types["blk.0.attn_q.weight"] == types["blk.0.ffn_gate.weight"] == "Q4_K"
    assert types["blk.1.attn_v.weight"] == types["blk.1.ffn_down.weight"] == "Q6_K"   # the _M mix's upgrades
    assert types["output.weight"] == "Q6_K"
    small = tensor_types(export_model(wide, tmp_path / "wide.Q4_K_S.gguf", "Q4_K_S", threads=1))
    assert list(types.values()).count("Q6_K") > list(small.values()).count("Q6_K")
    info = gguf_file_info(tmp_path / "wide.Q4_K_M.gguf")
    assert 4.5 < info.matrix_bits_per_weight < 6.0


def test_the_type_table_matches_llama_cpp(wide, tmp_path):
    """Every type without needs_imatrix is made with its ftype; llama.cpp itself refuses every needs_imatrix one.

    (Making the 1-2 bit i-quants costs ~15 s of llama.cpp codebook set-up, so of those only IQ2_XXS and
    Q2_K_S are made here, in the importance-matrix test.)
    """
    llama_cpp = pytest.importorskip("llama_cpp")
    from modules.quantize.gguf_types import GGUF_TYPES
    from modules.quantize.llama_quantize import quantize_gguf

    source = export_model(wide, tmp_path / "source.gguf", "F32")
    for kind in GGUF_TYPES.values():
        constant = "LLAMA_FTYPE_ALL_F32" if kind.name == "F32" else f"LLAMA_FTYPE_MOSTLY_{kind.name}"
        assert getattr(llama_cpp, constant) == kind.ftype, kind.name
        if kind.needs_imatrix:
            with pytest.raises(GGUFExportError, match="llama.cpp could not quantize"):
                quantize_gguf(source, tmp_path / "refused.gguf", kind.ftype, threads=1)
            continue
        out = export_model(wide, tmp_path / f"w.{kind.name}.gguf", kind.name, threads=1)
        assert value(reader(out), "general.file_type") == kind.ftype, kind.name
        assert gguf_file_info(out).file_type == kind.name
        out.unlink()


# ---------------------------------------------------------------------------- importance matrix
def test_imatrix_types_are_refused_without_one_and_made_with_one(wide, tmp_path):
    pytest.importorskip("llama_cpp")
    from modules.fixtures.llm import _CORPUS
    from modules.quantize.imatrix import imatrix_from_text

    with pytest.raises(GGUFExportError, match="IQ2_XXS needs an importance matrix.*--imatrix-text"):
        export_model(wide, tmp_path / "w.gguf", "IQ2_XXS")
    assert list(tmp_path.iterdir()) == []
    matrix = imatrix_from_text(wide, _CORPUS * 3, chunk_tokens=128)
    assert matrix.chunks >= 3 and set(matrix.values) >= {"blk.0.attn_q.weight", "blk.1.ffn_down.weight"}
    assert matrix.values["blk.0.ffn_down.weight"].shape == (512,)
    assert matrix.values["blk.0.attn_q.weight"].shape == (256,)
    types = tensor_types(export_model(wide, tmp_path / "w.gguf", "IQ2_XXS", imatrix=matrix, threads=1))
    assert types["blk.0.ffn_gate.weight"] == "IQ2_XXS"
    types = tensor_types(export_model(wide, tmp_path / "s.gguf", "Q2_K_S", imatrix=matrix, threads=1))
    assert types["blk.0.ffn_gate.weight"] == "Q2_K"


def test_imatrix_reaches_llama_cpp_and_lowers_the_weighted_error(wide, tmp_path):
    """Q4_K with the matrix differs from Q4_K without it, and is closer where the activations are large."""
    pytest.importorskip("llama_cpp")
    from gguf.quants import dequantize

    from modules.fixtures.llm import _CORPUS
    from modules.quantize.imatrix import imatrix_from_text

    matrix = imatrix_from_text(wide, _CORPUS * 3, chunk_tokens=128)
    plain = export_model(wide, tmp_path / "plain.gguf", "Q4_K_S", threads=1)
    weighted = export_model(wide, tmp_path / "weighted.gguf", "Q4_K_S", threads=1, imatrix=matrix)
    reference = {t.name: np.array(t.data) for t in reader(export_model(wide, tmp_path / "f32.gguf", "F32")).tensors}
    better = 0
    names = [f"blk.{i}.{n}.weight" for i in range(2) for n in ("attn_q", "ffn_gate", "ffn_up")]
    for name in names:
        errors = []
        for path in (plain, weighted):
            t = {t.name: t for t in reader(path).tensors}[name]
            assert t.tensor_type.name == "Q4_K"
            deq = dequantize(np.array(t.data), t.tensor_type).reshape(reference[name].shape)
            errors.append(float((((deq - reference[name]) ** 2) * matrix.values[name][None, :]).sum()))
        assert errors[0] != errors[1]
        better += errors[1] < errors[0]
    assert better == len(names)


# ------------------------------------------------------------------------------------ bad input
def test_an_existing_output_is_never_replaced_without_overwrite(tiny, tmp_path):
    out = tmp_path / "x.gguf"
    out.write_bytes(b"keep me")
    with pytest.raises(GGUFExportError, match="already exists.*overwrite"):
        export_model(tiny, out, "F16")
    assert out.read_bytes() == b"keep me"
    export_model(tiny, out, "F16", overwrite=True)
    assert out.read_bytes()[:4] == b"GGUF"


def test_a_full_disk_removes_the_partial_file_and_says_so(tiny, tmp_path, monkeypatch):
    import errno

    from modules.quantize import gguf_export

    calls = []

    def full(self, offset, array):
        calls.append(offset)
        if len(calls) > 3:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.fp.seek(self.start + offset)
        self.fp.write(array.tobytes())

    f32_bytes = export_model(tiny, tmp_path / "reference.gguf", "F32").stat().st_size
    (tmp_path / "reference.gguf").unlink()
    monkeypatch.setattr(gguf_export._TensorData, "write_at", full)
    needed = {}
    for kind in ("F32", "Q8_0"):
        calls.clear()
        with pytest.raises(DiskFullError, match=r"disk .* is full: the export needs about [\d,]+ bytes") as caught:
            export_model(tiny, tmp_path / f"x.{kind}.gguf", kind)
        assert "No partial file was left behind" in str(caught.value)
        assert list(tmp_path.iterdir()) == []               # neither the output, .partial nor the temp file
        needed[kind] = caught.value.needed
    assert f32_bytes <= needed["F32"] < f32_bytes + 4096     # the file's size
    assert needed["Q8_0"] > f32_bytes                        # the F32 temporary file and the Q8_0 output


def test_bad_types_sources_and_configs_get_clear_errors(tiny, tmp_path):
    with pytest.raises(GGUFExportError, match="Unknown GGUF type 'Q4_X'; known types: F32, F16, BF16, Q8_0"):
        export_model(tiny, tmp_path / "x.gguf", "Q4_X")
    with pytest.raises(GGUFExportError, match="no config.json"):
        export_model(tmp_path / "nothing", tmp_path / "x.gguf", "F16")
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text(json.dumps({"model_type": "gpt2", "vocab_size": 10, "hidden_size": 8,
                                                  "intermediate_size": 8, "num_hidden_layers": 1,
                                                  "num_attention_heads": 2}))
    with pytest.raises(GGUFExportError, match="(?s)not a Llama-architecture model.*model_type is 'gpt2'"):
        export_model(gpt2, tmp_path / "x.gguf", "F16")
    dynamic = tmp_path / "dynamic"
    shutil.copytree(tiny, dynamic)
    config = json.loads((dynamic / "config.json").read_text())
    config["rope_scaling"] = {"type": "dynamic", "factor": 2.0}
    (dynamic / "config.json").write_text(json.dumps(config))
    with pytest.raises(GGUFExportError, match="dynamic NTK"):
        export_model(dynamic, tmp_path / "x.gguf", "F16")
    with pytest.raises(GGUFExportError, match="only applies to quantized types"):
        from modules.quantize.imatrix import ImportanceMatrix
        export_model(tiny, tmp_path / "x.gguf", "F16", imatrix=ImportanceMatrix())
    with pytest.raises(GGUFExportError, match="folder .* does not exist"):
        export_model(tiny, tmp_path / "missing" / "x.gguf", "F16")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["dynamic", "gpt2"]


def test_write_gguf_checks_the_tensors_it_is_given(tiny, tmp_path):
    config = LlamaConfig.from_json_file(tiny / "config.json")
    tokenizer = GGUFTokenizer.from_hf_folder(tiny, vocab_size=config.vocab_size)
    state = hf_state(tiny)
    bad_shape = {**state, "model.norm.weight": torch.ones(3)}
    with pytest.raises(GGUFExportError, match="model.norm.weight has shape \\[3\\]"):
        write_gguf(config, bad_shape.items(), tokenizer, tmp_path / "x.gguf", name="x")
    missing = {k: v for k, v in state.items() if "layers.1.mlp" not in k}
    with pytest.raises(GGUFExportError, match="3 tensor\\(s\\) were not given"):
        write_gguf(config, missing.items(), tokenizer, tmp_path / "x.gguf", name="x")
    with pytest.raises(GGUFExportError, match="has no place"):
        write_gguf(config, [*state.items(), ("model.extra.weight", torch.ones(2))], tokenizer, tmp_path / "x.gguf",
                   name="x")
    with pytest.raises(GGUFExportError, match="Q4_0 is made by llama.cpp's quantizer"):
        write_gguf(config, state.items(), tokenizer, tmp_path / "x.gguf", "Q4_0", name="x")
    assert list(tmp_path.iterdir()) == []
    # tensors may come in any order (safetensors sorts by name)
    path = write_gguf(config, reversed(list(state.items())), tokenizer, tmp_path / "x.gguf", "F32", name="x")
    assert np.array_equal(np.array({t.name: t for t in reader(path).tensors}["token_embd.weight"].data),
                          state["model.embed_tokens.weight"].numpy())


def test_too_little_free_space_is_found_before_writing(tiny, tmp_path, monkeypatch):
    import collections

    from modules.quantize import gguf_export

    usage = collections.namedtuple("usage", "total used free")
    monkeypatch.setattr(gguf_export.shutil, "disk_usage", lambda path: usage(10**9, 10**9 - 5000, 5000))
    for kind in ("F16", "Q4_K_M"):
        with pytest.raises(DiskFullError, match="needs about .* and 5,000 bytes .* are free"):
            export_model(tiny, tmp_path / "x.gguf", kind)
    assert list(tmp_path.iterdir()) == []


def test_progress_reports_both_stages_and_a_cancel_leaves_nothing(tiny, tmp_path):
    pytest.importorskip("llama_cpp")
    seen: list[tuple[str, float]] = []
    export_model(tiny, tmp_path / "done.gguf", "Q4_0", threads=1, progress=lambda s, f: seen.append((s, f)))
    writing = [f for s, f in seen if s == "writing"]
    quantizing = [f for s, f in seen if s == "quantizing"]
    assert [s for s, _ in seen] == ["writing"] * len(writing) + ["quantizing"] * len(quantizing)
    assert writing == sorted(writing) and writing[-1] == 1.0 and len(writing) == 21    # one per tensor
    assert quantizing == sorted(quantizing) and quantizing[-1] == 1.0

    class Stop(Exception):
        pass

    def stop_in(stage):
        def progress(at, fraction):
            if at == stage and fraction > 0.3:
                raise Stop
        return progress

    for stage in ("writing", "quantizing"):
        with pytest.raises(Stop):
            export_model(tiny, tmp_path / "cancelled.gguf", "Q4_0", threads=1, progress=stop_in(stage))
    assert [p.name for p in tmp_path.iterdir()] == ["done.gguf"]

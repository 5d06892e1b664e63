"""Constrained JSON decoding on the engine: a tiny random model emits schema-valid JSON for any seed."""
import json
from dataclasses import replace

import jsonschema
import pytest
import torch

from modules.llm.engine import GenerationRequest, eos_token_ids, generate
from modules.llm.json_constraint import GrammarCompiler, SchemaError, schema_for
from modules.llm.sampling import RowState, SamplingParams

SCHEMA = {"type": "object", "additionalProperties": False, "required": ["name", "age", "ok", "tags", "kind"],
          "properties": {"name": {"type": "string", "maxLength": 6},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "ok": {"type": "boolean"},
                         "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
                         "kind": {"enum": ["cat", "dog", None]}}}


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    from modules.fixtures import llm as fixture
    from modules.llm.loader import load_llm
    return load_llm(fixture.write(tmp_path_factory.mktemp("json"))[0], "cpu", torch.float32)


@pytest.fixture(scope="module")
def compiler():
    return GrammarCompiler()


def spec(compiler, llm, schema):
    return compiler.compile(schema, llm.tokenizer, llm.config.vocab_size, eos_token_ids(llm))


def run(llm, params, n_rows=1):
    ids = llm.tokenizer.encode("Reply in JSON:", add_bos=True)
    return generate(llm, [GenerationRequest(ids, params) for _ in range(n_rows)])


def test_unconstrained_output_is_not_json(llm):
    """The premise: without the grammar the random model's text is not JSON at all."""
    for seed in range(3):
        text = run(llm, SamplingParams(temperature=1.0, seed=seed, max_new_tokens=40))[0].text
        with pytest.raises(json.JSONDecodeError):
            json.loads(text)


@pytest.mark.parametrize("seed", [0, 1, 2, 3, 4])
def test_schema_output_parses_and_validates(llm, compiler, seed):
    params = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=200, constraint=spec(compiler, llm, SCHEMA))
    result = run(llm, params)[0]
    assert result.finish_reason == "stop", result.text
    jsonschema.validate(json.loads(result.text), SCHEMA)
    assert result.token_ids[-1] in eos_token_ids(llm)  # ended on EOS, allowed only once the JSON was complete


def test_batched_rows_each_follow_their_own_grammar(llm, compiler):
    params = SamplingParams(temperature=1.0, seed=11, max_new_tokens=200, constraint=spec(compiler, llm, SCHEMA))
    free = SamplingParams(temperature=1.0, seed=11, max_new_tokens=30)
    ids = llm.tokenizer.encode("Reply in JSON:", add_bos=True)
    results = generate(llm, [GenerationRequest(ids, params), GenerationRequest(ids, free),
                             GenerationRequest(ids, replace(params, seed=12))])
    for result in (results[0], results[2]):
        jsonschema.validate(json.loads(result.text), SCHEMA)
    assert results[0].text != results[2].text


def test_json_object_mode_gives_an_object(llm, compiler):
    schema = schema_for({"type": "json_object"})
    for seed in range(3):
        params = SamplingParams(temperature=0.7, seed=seed, max_new_tokens=120,
                                constraint=spec(compiler, llm, schema))
        result = run(llm, params)[0]
        if result.finish_reason == "stop":
            assert isinstance(json.loads(result.text), dict)
        else:  # cut by max_tokens: still a valid prefix of an object
            assert result.finish_reason == "length" and result.text.startswith("{")


def test_max_tokens_cuts_the_json_with_length(llm, compiler):
    params = SamplingParams(temperature=1.0, seed=0, max_new_tokens=3, constraint=spec(compiler, llm, SCHEMA))
    result = run(llm, params)[0]
    assert result.finish_reason == "length" and result.completion_tokens == 3
    assert result.text.startswith("{")


def test_mask_allows_only_eos_once_complete(llm, compiler):
    constraint = spec(compiler, llm, {"type": "boolean"})
    state = RowState(SamplingParams(temperature=0, constraint=constraint), [1], llm.config.vocab_size)
    first = state.constraint.allowed()
    allowed = {llm.tokenizer.decode([i]) for i in torch.nonzero(first).flatten().tolist()}
    assert allowed and all("true".startswith(t) or "false".startswith(t) for t in allowed)
    for token in llm.tokenizer.encode_inner("true"):
        assert state.constraint.allowed()[token]
        state.observe(token)
    final = state.constraint.allowed()
    assert set(torch.nonzero(final).flatten().tolist()) == eos_token_ids(llm)


def test_fork_is_independent(llm, compiler):
    state = spec(compiler, llm, {"type": "boolean"}).start()
    twin = state.fork()
    for token in llm.tokenizer.encode_inner("true"):
        twin.advance(token)
    assert twin.complete and not state.complete


@pytest.mark.parametrize("response_format,unsupported,words", [
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "array", "uniqueItems": True}}},
     True, "uniqueItems"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}, False, "objekt"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"$ref": "#/nowhere"}}}, False, "nowhere"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?=a)"}}},
     True, "look-around"),
])
def test_bad_schemas_are_named(llm, compiler, response_format, unsupported, words):
    with pytest.raises(SchemaError) as err:
        spec(compiler, llm, schema_for(response_format))
    assert err.value.unsupported is unsupported and words in str(err.value)


@pytest.mark.parametrize("response_format,words", [
    ({"type": "yaml"}, "yaml"), ({"type": "json_schema"}, "json_schema must be an object"),
    ({"type": "json_schema", "json_schema": {"schema": {}}}, "name is required"),
    ({"type": "json_schema", "json_schema": {"name": "a b", "schema": {}}}, "must be a-z"),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": []}}, "JSON Schema object")])
def test_malformed_response_formats(response_format, words):
    with pytest.raises(SchemaError) as err:
        schema_for(response_format)
    assert words in str(err.value)


def test_text_format_is_unconstrained():
    assert schema_for({"type": "text"}) is None


@pytest.mark.parametrize("temperature", [0, 1.0])
def test_speculative_decoding_keeps_the_grammar(llm, compiler, tmp_path, temperature):
    """The draft proposes under its own grammar state and the target verifies each position after the
    drafts before it (forked state); greedy output equals the plain engine's."""
    from modules.fixtures.llm import FIXTURE_MODELS, write_model
    from modules.llm.loader import load_llm
    from modules.llm.speculative import generate_speculative
    draft = load_llm(write_model(tmp_path / "draft", dict(FIXTURE_MODELS["tiny-llama-gqa"], num_hidden_layers=1),
                                 seed=1), "cpu", torch.float32)
    ids = llm.tokenizer.encode("Reply in JSON:", add_bos=True)
    for seed in range(3):
        params = SamplingParams(temperature=temperature, seed=seed, max_new_tokens=200,
                                constraint=spec(compiler, llm, SCHEMA))
        got = generate_speculative(llm, draft, GenerationRequest(ids, params), max_k=4)
        assert got.finish_reason == "stop" and got.draft_tokens > 0
        jsonschema.validate(json.loads(got.text), SCHEMA)
        if temperature == 0:
            assert got.text == generate(llm, [GenerationRequest(ids, params)])[0].text


def _byte_level_tokenizer(folder):
    """A GPT-2-style byte-level BPE tokenizer.json (SmolLM's kind), trained on a few lines."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    lines = ["The quick brown fox jumps over the lazy dog.", 'He said: "Let\'s meet at noon," and left.',
             '{"name": "Ada", "age": 36, "tags": ["a", "b"], "ok": true, "kind": null}', "Numbers 12, 345, 6789."]
    tok.train_from_iterator(lines * 8, trainer)
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "unk_token": None, "add_bos_token": False}))


@pytest.mark.parametrize("kind", ["metaspace", "byte-level"])
def test_tokenizer_json_models(llm, tmp_path, kind):
    """The tokenizer.json path (llguidance reads the file itself): a SentencePiece vocabulary converted by
    transformers (Metaspace, "▁") and a byte-level BPE ("Ġ") both give schema-valid JSON."""
    import shutil
    from modules.llm.loader import load_llm
    folder = tmp_path / "fast"
    shutil.copytree(llm.path, folder)
    if kind == "metaspace":
        import transformers
        transformers.AutoTokenizer.from_pretrained(llm.path).save_pretrained(folder)
    else:
        _byte_level_tokenizer(folder)
    (folder / "tokenizer.model").unlink()
    fast = load_llm(folder, "cpu", torch.float32)
    assert fast.tokenizer.hf_json() is not None
    compiler = GrammarCompiler()
    ids = fast.tokenizer.encode("Reply in JSON:", add_bos=True)
    for seed in range(3):
        params = SamplingParams(temperature=1.0, seed=seed, max_new_tokens=200,
                                constraint=compiler.compile(SCHEMA, fast.tokenizer, fast.config.vocab_size,
                                                            eos_token_ids(fast)))
        result = generate(fast, [GenerationRequest(ids, params)])[0]
        assert result.finish_reason == "stop", result.text
        jsonschema.validate(json.loads(result.text), SCHEMA)

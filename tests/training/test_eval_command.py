"""``python -m modules.training eval``: results per model and per checkpoint, kept, and bad input named."""
import json
import shutil

import hashlib

import pytest

from modules.fixtures.llm import FIXTURE_MODELS, randomize_weights, write_model
from modules.llm.checkpoint import save_hf_folder
from modules.llm.config import LlamaConfig
from modules.llm.loader import load_llm
from modules.llm.model import Llama
from modules.training.__main__ import main
from modules.training.llm.eval_data import load_mc_items, load_texts
from modules.training.llm.evaluate import EvalError, multiple_choice, perplexity

TEXT = ("The library opens at nine in the morning and closes at six in the evening. Learning to play the "
        "piano takes patience, practice and a good teacher.\n")
ITEMS = [{"context": "The capital of France is", "choices": ["Paris", "London"], "gold": 0},
         {"context": "Water boils at 100 degrees", "choices": ["Celsius", "Fahrenheit", "cold"], "gold": 0}]


@pytest.fixture(scope="module")
def model_template(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("evalcmd") / "tiny-llama-gqa", FIXTURE_MODELS["tiny-llama-gqa"])


@pytest.fixture
def data(tmp_path, model_template):
    """A data dir with the fixture model, a held-out text and a multiple-choice file."""
    root = tmp_path / "data"
    shutil.copytree(model_template, root / "models" / "LLM" / "tiny-llama-gqa")
    (tmp_path / "held.txt").write_text(TEXT, encoding="utf-8")
    (tmp_path / "mc.jsonl").write_text("".join(json.dumps(i) + "\n" for i in ITEMS), encoding="utf-8")
    return root


def run_eval(data, *extra):
    return main(["eval", "--data-dir", str(data), *extra])


def tasks(data):
    return ["--task", f"ppl:{data.parent / 'held.txt'}", "--task", f"mc:{data.parent / 'mc.jsonl'}"]


def test_model_results_are_printed_stored_and_kept_across_runs(data, capsys):
    assert run_eval(data, "--model", "tiny-llama-gqa", *tasks(data)) == 0
    out = capsys.readouterr().out
    assert "ppl:held.txt" in out and "mc:mc.jsonl" in out and "acc_norm" in out
    stored = data / "training" / "eval" / "tiny-llama-gqa.json"
    first = json.loads(stored.read_text())["evaluations"]
    assert len(first) == 1
    entry = first[0]
    assert entry["model"]["name"] == "tiny-llama-gqa" and entry["checkpoint"] is None
    assert len(entry["weights_sha256"]) == 64
    # the stored figures are the library's figures for the same model and files
    llm = load_llm(data / "models" / "LLM" / "tiny-llama-gqa")
    ppl = perplexity(llm.model, llm.tokenizer, TEXT)
    mc = multiple_choice(llm.model, llm.tokenizer, ITEMS)
    by_kind = {t["kind"]: t for t in entry["tasks"]}
    assert by_kind["ppl"]["ppl"] == pytest.approx(ppl["ppl"]) and by_kind["ppl"]["tokens"] == ppl["tokens"]
    assert by_kind["mc"]["acc"] == mc["acc"] and by_kind["mc"]["acc_norm"] == mc["acc_norm"]
    assert [p["loglikelihoods"] for p in by_kind["mc"]["per_item"]] == \
        [pytest.approx(p["loglikelihoods"]) for p in mc["per_item"]]
    # a second evaluation is added next to the first, never over it
    assert run_eval(data, "--model", "tiny-llama-gqa", "--task", f"ppl:{data.parent / 'held.txt'}",
                    "--seq-len", "16") == 0
    history = json.loads(stored.read_text())["evaluations"]
    assert len(history) == 2 and history[0] == entry and history[1]["settings"]["seq_len"] == 16


def test_a_file_that_is_not_a_history_is_left_alone(data, capsys):
    stored = data / "training" / "eval" / "tiny-llama-gqa.json"
    stored.parent.mkdir(parents=True)
    stored.write_text("my notes, not JSON")
    assert run_eval(data, "--model", "tiny-llama-gqa", "--task", f"ppl:{data.parent / 'held.txt'}") == 0
    assert stored.read_text() == "my notes, not JSON"
    aside = [p for p in stored.parent.iterdir() if p != stored]
    assert len(aside) == 1 and aside[0].name.startswith("tiny-llama-gqa.")
    assert str(aside[0]) in capsys.readouterr().out
    assert json.loads(aside[0].read_text())["evaluations"][0]["tasks"][0]["kind"] == "ppl"


def test_results_that_cannot_be_written_are_still_printed_and_the_error_says_why(data, capsys):
    (data / "training").mkdir()
    (data / "training" / "eval").write_text("a file where the results folder should be")
    assert run_eval(data, "--model", "tiny-llama-gqa", "--task", f"ppl:{data.parent / 'held.txt'}") == 1
    captured = capsys.readouterr()
    assert "ppl:held.txt" in captured.out
    assert "cannot write the results to" in captured.err and "the figures are above" in captured.err
    assert (data / "training" / "eval").read_text() == "a file where the results folder should be"


def write_checkpoint(data, model_template, seed=5, **overrides):
    """A run's checkpoint folder with trained-looking weights: config.json + model.safetensors, no tokenizer."""
    config = LlamaConfig(**{**FIXTURE_MODELS["tiny-llama-gqa"], **overrides})
    model = Llama(config)
    randomize_weights(model, seed=seed)
    folder = data / "training" / "run1" / "checkpoints" / "step-000040"
    save_hf_folder(model, folder)
    return folder, model


def test_a_checkpoint_is_evaluated_with_its_own_weights_and_kept_in_its_run(data, model_template, capsys):
    folder, trained = write_checkpoint(data, model_template)
    assert run_eval(data, "--model", "tiny-llama-gqa", "--checkpoint", str(folder), *tasks(data)) == 0
    stored = data / "training" / "run1" / "eval" / "step-000040.json"
    entry = json.loads(stored.read_text())["evaluations"][0]
    assert entry["checkpoint"]["step"] == 40 and entry["checkpoint"]["run"] == str(folder.parent.parent)
    assert entry["weights_sha256"] == hashlib.sha256((folder / "model.safetensors").read_bytes()).hexdigest()
    # the figures are those of the checkpoint's weights (with the model's tokenizer), not the base model's
    tokenizer = load_llm(data / "models" / "LLM" / "tiny-llama-gqa").tokenizer
    expected = perplexity(trained.eval(), tokenizer, TEXT)["ppl"]
    base = load_llm(data / "models" / "LLM" / "tiny-llama-gqa")
    got = next(t for t in entry["tasks"] if t["kind"] == "ppl")["ppl"]
    assert got == pytest.approx(expected, rel=1e-5)
    assert got != pytest.approx(perplexity(base.model, base.tokenizer, TEXT)["ppl"], rel=1e-3)


def test_checkpoint_problems_are_named(data, model_template, capsys):
    folder, _ = write_checkpoint(data, model_template)
    # no tokenizer in the checkpoint and no --model to take it from
    assert run_eval(data, "--checkpoint", str(folder), *tasks(data)) == 2
    err = capsys.readouterr().err
    assert "has no tokenizer (tokenizer.model or tokenizer.json); also give --model NAME" in err
    # weights of another architecture than the config it is loaded with
    shutil.rmtree(folder)
    folder, _ = write_checkpoint(data, model_template, hidden_size=32, intermediate_size=88)
    (folder / "config.json").unlink()
    assert run_eval(data, "--model", "tiny-llama-gqa", "--checkpoint", str(folder), *tasks(data)) == 2
    err = capsys.readouterr().err
    assert "shape mismatches" in err and "model.layers.0.self_attn.q_proj.weight" in err
    assert run_eval(data, "--model", "tiny-llama-gqa", "--checkpoint", str(folder.parent / "nope"),
                    *tasks(data)) == 2
    assert "no such folder" in capsys.readouterr().err
    assert not (data / "training" / "run1" / "eval").exists()


@pytest.mark.parametrize("case, message", [
    ("unknown model", "no such model folder"),
    ("missing file", "no such file"),
    ("bad task kind", "write KIND:FILE with KIND one of ppl, mc"),
    ("malformed line", "mc.jsonl:2: not valid JSON"),
    ("gold out of range", "mc.jsonl:1: 'gold' is 5 but there are 2 choices (valid: 0 to 1)"),
    ("seq len too long", "--seq-len must be between 1 and the model's context of 256"),
])
def test_bad_input_is_exit_code_2_with_a_message_that_says_what_to_do(data, capsys, case, message):
    mc = data.parent / "mc.jsonl"
    args = ["--model", "tiny-llama-gqa", *tasks(data)]
    if case == "unknown model":
        args[1] = "no-such-model"
    elif case == "missing file":
        args[3] = "ppl:" + str(data.parent / "missing.txt")
    elif case == "bad task kind":
        args[3] = "perplexity:" + str(data.parent / "held.txt")
    elif case == "malformed line":
        mc.write_text(json.dumps(ITEMS[0]) + "\n{not json\n")
    elif case == "gold out of range":
        mc.write_text(json.dumps({**ITEMS[0], "gold": 5}) + "\n")
    elif case == "seq len too long":
        args += ["--seq-len", "1000"]
    assert run_eval(data, *args) == 2
    err = capsys.readouterr().err
    assert message in err
    if case == "unknown model":
        assert "models there: tiny-llama-gqa" in err
    assert not (data / "training" / "eval").exists(), "nothing is written for a failed evaluation"


def test_jsonl_readers_report_every_bad_line_with_file_and_line(tmp_path):
    path = tmp_path / "q.jsonl"
    path.write_text("\n".join([
        json.dumps(ITEMS[0]), "", "[1, 2]", json.dumps({"context": "x", "choices": ["a", "b"]}),
        json.dumps({"context": "x", "choices": ["a", ""], "gold": True}), json.dumps(ITEMS[1])]) + "\n")
    with pytest.raises(EvalError) as info:
        load_mc_items(path)
    message = str(info.value)
    assert "4 line(s)" not in message and "3 line(s) are not valid multiple-choice items" in message
    assert f"{path}:3: expected a JSON object" in message
    assert f"{path}:4: missing 'gold'" in message
    assert f"{path}:5: every choice must be a non-empty string; 'gold' must be the integer index" in message
    path.write_text("\n\n")
    with pytest.raises(EvalError, match="holds no items"):
        load_mc_items(path)
    texts = tmp_path / "docs.jsonl"
    texts.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"body": "two"}) + "\n")
    with pytest.raises(EvalError, match=r"docs.jsonl:2: expected a JSON object with a string field 'text'"):
        load_texts(texts)
    texts.write_text(json.dumps({"text": "one"}) + "\n" + json.dumps({"text": "two"}) + "\n")
    assert load_texts(texts) == ["one", "two"]
    binary = tmp_path / "held.txt"
    binary.write_bytes(b"caf\xe9\n")
    with pytest.raises(EvalError, match="not UTF-8 text"):
        load_texts(binary)
    valid = tmp_path / "v.jsonl"
    valid.write_text(json.dumps(ITEMS[0]) + "\n\n" + json.dumps(ITEMS[1]) + "\n")
    items = load_mc_items(valid)
    assert [i.gold for i in items] == [0, 0] and items[1].source == f"{valid}:3"

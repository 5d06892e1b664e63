"""lm-evaluation-harness end to end: its ``local-completions`` model against the real server scores the shipped
demo model exactly as Atelier's own evaluation (``python -m modules.training eval``) does.

Both sides run the same conventions (see modules/training/llm/evaluate.py): lm-eval's remote tokenizer
(found through the server's /tokenizer_info and /tokenize, no local tokenizer, no hub) encodes without BOS,
so Atelier's side runs with ``--no-bos``; lm-eval's ``max_length`` M gives rolling windows of M - 2
predictions, so Atelier's side runs with ``--seq-len M - 2``. Offline: tasks are YAML files over local JSONL.
"""
import argparse
import json
import math
import shutil

import pytest

from server_utils import REPO, start_server

MODEL = "atelier-tiny-chat"
MAX_LENGTH = 256  # the model's context

MC_ITEMS = [
    {"context": "The capital of France is", "choices": ["Paris", "a banana", "blue"], "gold": 0},
    {"context": "Water freezes at zero degrees", "choices": ["Celsius", "purple", "running"], "gold": 0},
    {"context": "A cat says", "choices": ["woof", "meow", "moo"], "gold": 1},
    {"context": "Two plus two is", "choices": ["five", "three", "four"], "gold": 2},
    {"context": "The sun rises in the", "choices": ["east", "west"], "gold": 0},
    {"context": "Birds can", "choices": ["fly", "swim underwater forever", "read"], "gold": 0},
    {"context": "The opposite of hot is", "choices": ["cold", "warm", "loud"], "gold": 0},
    {"context": "You write with a", "choices": ["pen", "spoon", "cloud"], "gold": 0},
]
DOCS = [
    "Once upon a time there was a little robot who loved to paint. Every morning it mixed its colours.",
    "The weather today is sunny with a light breeze from the west, and tomorrow it will rain. " * 12,
    "Hello! How are you today? I am fine, thank you.",
]

MC_YAML = """task: atelier_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: multiple_choice
doc_to_text: context
doc_to_choice: choices
doc_to_target: gold
metric_list:
  - metric: acc
  - metric: acc_norm
"""
PPL_YAML = """task: atelier_ppl
dataset_path: json
dataset_kwargs:
  data_files:
    test: {path}
test_split: test
output_type: loglikelihood_rolling
doc_to_text: ""
doc_to_target: text
metric_list:
  - metric: word_perplexity
  - metric: byte_perplexity
  - metric: bits_per_byte
"""


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval")
    mc, ppl = root / "mc.jsonl", root / "ppl.jsonl"
    mc.write_text("".join(json.dumps(item) + "\n" for item in MC_ITEMS), encoding="utf-8")
    ppl.write_text("".join(json.dumps({"text": doc}) + "\n" for doc in DOCS), encoding="utf-8")
    tasks = root / "tasks"
    tasks.mkdir()
    (tasks / "atelier_mc.yaml").write_text(MC_YAML.format(path=mc), encoding="utf-8")
    (tasks / "atelier_ppl.yaml").write_text(PPL_YAML.format(path=ppl), encoding="utf-8")
    data = root / "data"
    shutil.copytree(REPO / "models" / "LLM" / MODEL, data / "models" / "LLM" / MODEL)
    return {"root": root, "mc": mc, "ppl": ppl, "tasks": tasks, "data": data}


@pytest.fixture(scope="module")
def server(files):
    srv = start_server(files["data"], "--api", "--nowebui")
    yield srv
    srv.stop()


def atelier_eval(files) -> dict:
    """Atelier's own evaluation, through the ``python -m modules.training eval`` command's code."""
    from modules.training.llm.eval_command import add_arguments, evaluate
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--model", MODEL, "--data-dir", str(files["data"]), "--device", "cpu",
                              "--task", f"mc:{files['mc']}", "--task", f"ppl:{files['ppl']}", "--no-bos",
                              "--seq-len", str(MAX_LENGTH - 2)])
    entry, _target = evaluate(args)
    return {task["kind"]: task for task in entry["tasks"]}


def test_lm_eval_scores_equal_atelier_eval(server, files, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(files["root"] / "hf-datasets"))
    import lm_eval
    from lm_eval.tasks import TaskManager
    from lm_eval.utils import check_remote_tokenizer_support

    base_url = server.url + "/v1/completions"
    assert check_remote_tokenizer_support(base_url)  # so "auto" picks the server's tokenizer, not a hub download
    out = lm_eval.simple_evaluate(
        model="local-completions",
        model_args={"model": MODEL, "base_url": base_url, "tokenized_requests": True,
                    "max_length": MAX_LENGTH, "num_concurrent": 1, "max_retries": 1},
        tasks=["atelier_mc", "atelier_ppl"], task_manager=TaskManager(include_path=str(files["tasks"])),
        log_samples=True)
    results = out["results"]
    ours = atelier_eval(files)

    for sample in out["samples"]["atelier_mc"]:  # every choice's log-likelihood, not only the argmax
        theirs = [float(resp[0]) for resp in sample["filtered_resps"]]  # (loglikelihood, is_greedy) per choice
        assert theirs == pytest.approx(ours["mc"]["per_item"][sample["doc_id"]]["loglikelihoods"], abs=1e-3)

    mc = results["atelier_mc"]
    assert mc["acc,none"] == pytest.approx(ours["mc"]["acc"], abs=1e-9)
    assert mc["acc_norm,none"] == pytest.approx(ours["mc"]["acc_norm"], abs=1e-9)
    ppl = results["atelier_ppl"]
    assert ppl["word_perplexity,none"] == pytest.approx(ours["ppl"]["word_perplexity"], rel=1e-4)
    assert ppl["byte_perplexity,none"] == pytest.approx(ours["ppl"]["byte_perplexity"], rel=1e-4)
    assert ppl["bits_per_byte,none"] == pytest.approx(ours["ppl"]["bits_per_byte"], rel=1e-4)
    assert ours["ppl"]["windows"] > len(DOCS)  # a document longer than one window was rolled
    assert math.isfinite(ours["ppl"]["word_perplexity"]) and 1 < ours["ppl"]["word_perplexity"]

"""The prepare-data command: the example config builds on a fresh clone, configs are validated strictly (every
problem at once), a model's tokenizer can be reused, and an existing dataset is not overwritten silently."""
from __future__ import annotations

import json

import pytest

from modules.training.__main__ import main
from modules.training.llm.data import Mixture, PackedDataset
from modules.training.llm.tokenizer_train import tokenizer_fingerprint
from tests.conftest import REPO


def test_example_config_builds_from_repository_files(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(REPO)
    data_dir = tmp_path / "data"
    argv = ["prepare-data", "--config", "configs/training/data-example.yaml", "--data-dir", str(data_dir),
            "seq_len=64", "tokenizer.vocab_size=600"]
    assert main(argv) == 0
    summary = json.loads(capsys.readouterr().out)
    out = data_dir / "training" / "data" / "example"
    assert summary["dataset"] == str(out) and summary["tokens_per_second"] > 0
    ds = PackedDataset(out)
    assert ds.sources == ["text", "code"] and ds.seq_len == 64 and ds.weights == pytest.approx([0.7, 0.3])
    assert ds.meta["tokenizer"] == {"path": "tokenizer", "sha256": tokenizer_fingerprint(out / "tokenizer")}
    assert "seq_len: 64" in (out / "config.yaml").read_text()
    assert Mixture(ds, seed=0).next_batch(2).shape == (2, 65)
    before = (out / "meta.json").read_text()
    assert main(argv) == 2
    assert "already exists" in capsys.readouterr().err and (out / "meta.json").read_text() == before
    assert main(argv[:5] + ["--overwrite"] + argv[5:] + ["seq_len=32"]) == 0   # the last override wins
    assert PackedDataset(out).seq_len == 32


def test_every_config_problem_is_reported_at_once(tmp_path, capsys):
    config = tmp_path / "bad.yaml"
    config.write_text("name: x\nseq_len: many\nbatch: 4\ntokenizer: {vocab_size: 512, from: m}\n"
                      "sources:\n  - {name: text, path: docs}\n  - {name: code, paths: [a], weight: -1}\n")
    assert main(["prepare-data", "--config", str(config), "--data-dir", str(tmp_path), "val_fraction=2"]) == 2
    err = capsys.readouterr().err
    for expected in ("seq_len: 'many' is a str, expected a whole number", "batch: unknown key",
                     "exactly one of vocab_size", "sources.0.path: unknown key", "sources.0.paths: missing",
                     "weight -1 must be a positive number", "val_fraction: 2 must be at least 0 and below 1"):
        assert expected in err, expected
    assert "7 problem(s)" in err
    assert not (tmp_path / "training").exists()


def test_reuse_a_models_tokenizer_by_name(fixture_data_dir, tmp_path, capsys):
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(3):
        (docs / f"{i}.txt").write_text(f"Document {i}: the quick brown fox jumps over the lazy dog. " * 20)
    config = tmp_path / "data.yaml"
    config.write_text(f"name: reuse\nseq_len: 32\ntokenizer: {{from: tiny-llama-gqa}}\n"
                      f"sources:\n  - {{name: prose, paths: ['{docs}']}}\n")
    data_dir = tmp_path / "data"
    (data_dir / "models").mkdir(parents=True)
    (data_dir / "models" / "LLM").symlink_to(fixture_data_dir / "models" / "LLM")
    assert main(["prepare-data", "--config", str(config), "--data-dir", str(data_dir)]) == 0
    ds = PackedDataset(data_dir / "training" / "data" / "reuse")
    assert ds.meta["tokenizer"]["sha256"] == tokenizer_fingerprint(fixture_data_dir / "models" / "LLM" / "tiny-llama-gqa")
    capsys.readouterr()
    config.write_text(config.read_text().replace("tiny-llama-gqa", "no-such-model").replace("name: reuse", "name: r2"))
    assert main(["prepare-data", "--config", str(config), "--data-dir", str(data_dir)]) == 2
    assert "'no-such-model' is neither a folder nor a model" in capsys.readouterr().err

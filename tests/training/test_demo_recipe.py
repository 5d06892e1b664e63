"""The demo-model recipe end to end at toy scale: the same commands as the shipped models' recipe (each a
real ``python -m modules.training`` process), a rerun that skips what is done, and an install that measures
the fp16 folder, writes its model card from the measurements and never replaces an existing model."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
from safetensors import safe_open

from modules.paths import REPO_DIR
from modules.training.llm import demo_recipe
from modules.training.llm.demo_corpus import SOURCES
from training_corpus import write_corpus

TINY = {"pretrain": ["model.hidden_size=32", "model.intermediate_size=64", "model.num_hidden_layers=1",
                     "model.num_attention_heads=4", "model.num_key_value_heads=2", "model.vocab_size=512",
                     "seq_len=32", "micro_batch=2", "global_batch_tokens=64", "max_steps=3", "warmup_steps=1",
                     "eval_every=3", "eval_batches=1", "save_every_tokens=0", "precision=fp32", "log_every=1"],
        "sft": ["max_steps=2", "epochs=null", "micro_batch=2", "batch_size=2", "eval_every=0",
                "save_every_steps=0", "precision=fp32", "warmup_steps=1", "log_every=1"]}


def fake_corpus(folder: Path, text_source: Path) -> None:
    """A corpus folder as fetch-corpus leaves it, with a little real text in each source."""
    texts = sorted(text_source.glob("*.txt"))
    meta = {"sources": {}, "stdlib": {"path": "-", "python": sys.version.split()[0], "exclude": []}}
    for index, name in enumerate(SOURCES):
        (folder / name).mkdir(parents=True)
        (folder / name / "doc.txt").write_text(texts[index % len(texts)].read_text())
        meta["sources"][name] = {"packages": [f"pkg-{name}"], "licence": "test", "documents": 1, "characters": 10,
                                 "files": [], "sha256": "-"}
    (folder / "meta.json").write_text(json.dumps(meta))


def test_recipe_makes_installs_and_describes_both_models(tmp_path):
    write_corpus(tmp_path / "src")
    data_dir = tmp_path / "data"
    fake_corpus(data_dir / "training" / "corpora" / "demo", tmp_path / "src" / "text")
    code = tmp_path / "src" / "code"
    recipe = demo_recipe.Recipe(data_dir, REPO_DIR, overrides=TINY,
                                sft_counts={"drawing": 16, "arithmetic": 4, "formatting": 4, "held-out": 2},
                                data_overrides=["tokenizer.vocab_size=512", "seq_len=32", "val_fraction=0.2",
                                                f"sources.1.paths=[{code}]", "sources.1.exclude=[]"])
    installed = recipe.run()
    assert set(installed) == {"atelier-tiny-chat", "atelier-tiny-draft"}
    record = json.loads((data_dir / "training" / "recipes" / "demo-models.json").read_text())
    for step in ("prepare-data", "atelier-tiny-chat-pretrain", "atelier-tiny-draft-pretrain", "make-sft-data",
                 "atelier-tiny-chat-sft", "atelier-tiny-draft-sft"):
        assert record["steps"][step]["seconds"] > 0, step
    assert "fetch-corpus" not in record["steps"]              # the corpus was there: not fetched again

    chat = Path(installed["atelier-tiny-chat"])
    assert chat == data_dir / "models" / "LLM" / "atelier-tiny-chat"
    with safe_open(str(chat / "model.safetensors"), "pt") as weights:
        assert {str(weights.get_tensor(k).dtype) for k in weights.keys()} == {"torch.float16"}
    assert json.loads((chat / "config.json").read_text())["torch_dtype"] == "float16"
    quality = record["quality"]["atelier-tiny-chat"]
    assert set(quality["exact_match"]) == {"arithmetic", "docs", "drawing", "formatting"}
    assert set(quality["perplexity"]) == {"text", "code"} and quality["perplexity"]["text"]["ppl"] > 1
    assert set(quality["perplexity_pretrained"]) == {"text", "code"}
    card = (chat / "README.md").read_text()
    assert "python -m modules.training demo-models" in card
    assert f"| drawing | {quality['exact_match']['drawing'] * 100:.1f}% |" in card
    assert f"{quality['parameters'] / 1e6:.2f}M parameters" in card
    assert "pkg-austen" in card and "| text | 0.7 |" in card
    draft = Path(installed["atelier-tiny-draft"])
    assert (draft / "tokenizer.model").read_bytes() == (chat / "tokenizer.model").read_bytes()
    agreement = record["quality"]["atelier-tiny-draft"]["agreement"]
    assert agreement["target"] == "atelier-tiny-chat" and 0 <= agreement["overall"] <= 1 and agreement["tokens"] > 0
    assert "acceptance rate a greedy speculative decoder" in (draft / "README.md").read_text()

    # a rerun trains nothing again and installs beside the existing models, never over them
    (chat / "notes.txt").write_text("the user's own file")
    again = demo_recipe.Recipe(data_dir, REPO_DIR, overrides=TINY, models=("atelier-tiny-chat",)).run()
    second = Path(again["atelier-tiny-chat"])
    assert second != chat and second.name.startswith("atelier-tiny-chat-") and (chat / "notes.txt").is_file()
    after = json.loads((data_dir / "training" / "recipes" / "demo-models.json").read_text())
    assert after["steps"]["atelier-tiny-chat-pretrain"] == record["steps"]["atelier-tiny-chat-pretrain"]

"""The chat models shipped in models/LLM/ load (ours and transformers', same logits), keep their model
cards, and still meet a quick quality floor on held-out synthetic items (phrasings never trained on).

The floors sit below what the model cards report for the full held-out sets (the recipe's install step
measures those), so this fails when the shipped weights are damaged or replaced by worse ones, not on noise."""
from __future__ import annotations

import pytest
import torch

from modules.llm.loader import load_llm
from modules.paths import REPO_DIR
from modules.training.llm.chat_eval import chat_exact_match
from modules.training.llm.sft_synthetic import SyntheticSpec, default_docs, make_sft_data

SHIPPED = REPO_DIR / "models" / "LLM"
#: exact-match floors on 40 held-out items per family
FLOORS = {"atelier-tiny-chat": {"drawing": 0.9, "arithmetic": 0.1},
          "atelier-tiny-draft": {"drawing": 0.9}}


@pytest.fixture(scope="module")
def heldout():
    items = make_sft_data(SyntheticSpec(docs=tuple(default_docs()), drawing=0, arithmetic=0, formatting=0,
                                        held_out=40))["heldout"]
    return [i for i in items if i["family"] in ("drawing", "arithmetic")]


@pytest.mark.parametrize("name", sorted(FLOORS))
def test_shipped_model_meets_its_quality_floor(name, heldout):
    folder = SHIPPED / name
    card = (folder / "README.md").read_text(encoding="utf-8")
    assert "python -m modules.training demo-models" in card and "## Measured quality" in card
    llm = load_llm(folder)
    scores = chat_exact_match(llm, heldout, max_new_tokens=48)["accuracy"]
    for family, floor in FLOORS[name].items():
        assert scores[family] >= floor, (name, family, scores)


def test_both_share_one_tokenizer_and_transformers_reads_them_with_our_logits():
    chat, draft = SHIPPED / "atelier-tiny-chat", SHIPPED / "atelier-tiny-draft"
    assert (chat / "tokenizer.model").read_bytes() == (draft / "tokenizer.model").read_bytes()
    from transformers import LlamaForCausalLM
    ours = load_llm(chat)
    ids = torch.tensor([ours.tokenizer.encode("<|user|>\ndraw a small red circle on the left</s>\n<|assistant|>\n")])
    theirs = LlamaForCausalLM.from_pretrained(chat, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours.model(ids), theirs(ids).logits, atol=1e-4, rtol=1e-4)

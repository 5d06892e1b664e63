"""LLM folders with damaged weights are listed with the reason and fail to load with CheckpointError."""
from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file

from model_damage import variants
from modules.llm.checkpoint import CheckpointError, load_model
from modules.llm.loader import list_llm_models

MODEL = "tiny-llama-gqa"


@pytest.fixture
def llm_dir(fixture_data_dir, tmp_path):
    root = tmp_path / "LLM"
    shutil.copytree(fixture_data_dir / "models" / "LLM" / MODEL, root / MODEL)
    good = (root / MODEL / "model.safetensors").read_bytes()
    for name, raw in variants(good).items():
        shutil.copytree(root / MODEL, root / f"a-{name}", ignore=shutil.ignore_patterns("model.safetensors"))
        (root / f"a-{name}" / "model.safetensors").write_bytes(raw)
    pickled = root / "a-pickled"
    shutil.copytree(root / MODEL, pickled, ignore=shutil.ignore_patterns("model.safetensors"))
    torch.save(load_file(str(root / MODEL / "model.safetensors")), pickled / "pytorch_model.bin")
    return root


def test_damaged_weights_are_listed_as_unusable_with_the_reason(llm_dir):
    listing = {m["name"]: m["error"] for m in list_llm_models(llm_dir)}
    assert listing[MODEL] is None
    damaged = [n for n in listing if n.startswith("a-") and n != "a-pickled"]
    assert len(damaged) == 12 and all(listing[n] and "model.safetensors" in listing[n] for n in damaged)
    assert "header claims" in listing["a-huge-header-length"] and "data_offsets" in listing["a-one-data-offset"]
    assert "--allow-unsafe-pickle" in listing["a-pickled"]
    assert {m["name"]: m["error"] for m in list_llm_models(llm_dir, allow_unsafe_pickle=True)}["a-pickled"] is None


def test_loading_damaged_weights_is_a_checkpoint_error(llm_dir):
    for name in ("random-bytes", "cut-in-data", "one-data-offset", "not-json"):
        with pytest.raises(CheckpointError, match="model.safetensors"):
            load_model(llm_dir / f"a-{name}")
    (llm_dir / "a-pickled" / "pytorch_model.bin").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(CheckpointError, match="not a readable PyTorch weight file"):
        load_model(llm_dir / "a-pickled", allow_unsafe_pickle=True)

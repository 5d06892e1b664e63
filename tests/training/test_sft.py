"""The sft command end to end on the fixture model: LoRA saved as a peft adapter that transformers + peft load
with our logits, merged into a folder the Chat tab's loader serves; full fine-tuning that resumes exactly."""
from __future__ import annotations

import json

import pytest
import torch

from modules.fixtures.llm import FIXTURE_MODELS, write_model
from modules.training.config import ConfigError
from modules.training.llm.sft_command import run_sft

CHATS = [
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello! How are you?"},
                  {"role": "assistant", "content": "I am fine, thank you."}]},
    {"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
    {"messages": [{"role": "user", "content": "Why is the sky blue?"},
                  {"role": "assistant", "content": "Because air scatters blue light."},
                  {"role": "user", "content": "Thank you."}, {"role": "assistant", "content": "You are welcome."}]},
    {"prompt": "Water boils at?", "response": "100 degrees Celsius."},
]


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return write_model(tmp_path_factory.mktemp("sft") / "tiny", FIXTURE_MODELS["tiny-llama-gqa"])


@pytest.fixture
def chats(tmp_path):
    path = tmp_path / "chats.jsonl"
    path.write_text("".join(json.dumps(c) + "\n" for c in CHATS), encoding="utf-8")
    return path


def overrides(base, chats, **extra):
    values = dict(base_model=str(base), data=str(chats), micro_batch=2, batch_size=4, lr=1e-2, min_lr=1e-3,
                  warmup_steps=1, max_steps=3, precision="fp32", device="cpu", log_every=1, seed=5,
                  run_name="run")
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def test_lora_adapter_loads_in_peft_with_equal_logits_and_merged_folder_serves(base, chats, tmp_path):
    import transformers
    from peft import PeftModel

    from modules.llm.loader import load_llm
    result = run_sft(None, overrides(base, chats, method="lora", lora_rank=4, lora_alpha=8, lora_dropout=0.0,
                                     lora_target_modules="[q_proj,v_proj,down_proj]"),
                     data_dir=tmp_path)
    assert result.finished and result.step == 3
    assert sorted(p.name for p in result.adapter_dir.iterdir()) == ["adapter_config.json",
                                                                   "adapter_model.safetensors"]
    ids = torch.tensor([[1, 20, 300, 45, 99, 7, 260, 511]])
    hf_base = transformers.LlamaForCausalLM.from_pretrained(base, dtype=torch.float32).eval()
    with torch.no_grad():
        base_logits = hf_base(ids).logits
    peft_model = PeftModel.from_pretrained(hf_base, result.adapter_dir).eval()
    with torch.no_grad():
        peft_logits = peft_model(ids).logits
    served = load_llm(result.final_dir)                       # what the Chat tab loads
    with torch.no_grad():
        ours = served.model(ids)
    assert (peft_logits - base_logits).abs().max() > 1e-3      # the adapter was trained: not a vacuous check
    torch.testing.assert_close(ours, peft_logits, atol=1e-4, rtol=1e-4)
    assert served.template.origin == "tokenizer_config.json" and "<|assistant|>" in served.template.source
    records = [json.loads(line) for line in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    start = records[0]
    assert start["method"] == "lora" and start["trainable_parameters"] < start["parameters"] / 5


def test_full_finetune_learns_and_resumes_exactly(base, chats, tmp_path):
    from safetensors.torch import load_file
    straight = run_sft(None, overrides(base, chats, max_steps=4, run_name="straight"), data_dir=tmp_path)
    records = [json.loads(line) for line in (straight.run_dir / "metrics.jsonl").read_text().splitlines()]
    losses = [r["loss"] for r in records if r["kind"] == "train"]
    assert losses[-1] < losses[0]

    calls = []

    def stop_after_two_steps() -> bool:          # asked once after every optimizer step
        calls.append(1)
        return len(calls) == 2

    stopped = run_sft(None, overrides(base, chats, max_steps=4, run_name="stopped"), data_dir=tmp_path,
                      should_stop=stop_after_two_steps)
    assert not stopped.finished and stopped.step == 2 and stopped.final_dir is None
    resumed = run_sft(None, [], data_dir=tmp_path, resume=str(stopped.run_dir))
    assert resumed.finished and resumed.step == 4
    a = load_file(str(straight.final_dir / "model.safetensors"))
    b = load_file(str(resumed.final_dir / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    original = load_file(str(base / "model.safetensors"))
    assert not torch.equal(a["model.layers.0.mlp.up_proj.weight"], original["model.layers.0.mlp.up_proj.weight"])


def test_bad_config_reports_every_problem(base, chats, tmp_path):
    with pytest.raises(ConfigError) as info:
        run_sft(None, overrides(base, chats, method="lora", lora_rank=0, lr=0, batch_size=3,
                                lora_target_modules="[q_proj,qkv]"), data_dir=tmp_path)
    text = str(info.value)
    for expected in ("lora_rank must be at least 1, got 0", "lr must be > 0",
                     "batch_size (3) must be a multiple of micro_batch", "lora_target_modules must be"):
        assert expected in text
    with pytest.raises(ConfigError, match="longer than the model's context"):
        run_sft(None, overrides(base, chats, seq_len=100000), data_dir=tmp_path)

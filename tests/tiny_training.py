"""Tiny training data and configs for tests/training: an in-memory object with the training-data protocol
(next_batch / val_batches / state_dict / load_state_dict), a real tokenizer folder, and a child-process
entry point that trains (and can SIGKILL itself at a chosen step) for the exact-resume test."""
from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent


class TinyData:
    """Fixed random sequences in a seeded order; the read position is the whole state."""

    def __init__(self, seq_len: int, *, vocab: int = 512, sequences: int = 256, seed: int = 0,
                 tokenizer_dir: str | Path | None = None, poison_at: int | None = None):
        gen = torch.Generator().manual_seed(seed)
        # A learnable signal: each sequence counts up from a random start, so loss falls fast.
        starts = torch.randint(3, vocab, (sequences + 16, 1), generator=gen)
        self.tokens = (starts + torch.arange(seq_len + 1)) % (vocab - 3) + 3
        self.train_rows = self.tokens[:sequences]
        self.val_rows = self.tokens[sequences:]
        self.order = torch.randperm(sequences, generator=gen)
        self.position = 0
        self.tokenizer_dir = tokenizer_dir
        self.poison_at = poison_at

    def next_batch(self, batch_size: int) -> torch.Tensor:
        idx = [int(self.order[(self.position + i) % len(self.order)]) for i in range(batch_size)]
        self.position += batch_size
        return self.train_rows[idx].clone()

    def val_batches(self, batch_size: int):
        for start in range(0, len(self.val_rows), batch_size):
            yield self.val_rows[start:start + batch_size]

    def state_dict(self) -> dict:
        return {"position": self.position}

    def load_state_dict(self, state: dict) -> None:
        self.position = int(state["position"])


def write_tokenizer(folder: Path) -> Path:
    """A real Llama-2-layout SentencePiece folder (the fixture tokenizer, 512 pieces)."""
    from modules.fixtures.llm import train_tokenizer
    from modules.training.llm.tokenizer_train import tokenizer_config
    folder.mkdir(parents=True, exist_ok=True)
    train_tokenizer(folder / "tokenizer.model", vocab_size=512)
    (folder / "tokenizer_config.json").write_text(json.dumps(tokenizer_config(256)), encoding="utf-8")
    return folder


def tiny_overrides(**extra) -> list[str]:
    """key=value overrides for a 2-layer, 32-wide GQA model trained a few fp32 steps on CPU."""
    base = dict(model_preset="tiny-gqa", **{"model.hidden_size": 32, "model.intermediate_size": 64,
                                             "model.num_attention_heads": 4, "model.num_key_value_heads": 2},
                data="unused-by-TinyData", seq_len=16, micro_batch=4, global_batch_tokens=128, lr=3e-3,
                min_lr=3e-4, warmup_steps=2, max_steps=8, precision="fp32", device="cpu", eval_every=4,
                eval_batches=2, log_every=1, keep_last=2, seed=11, run_name="run")
    base.update(extra)
    return [f"{k}={v}" for k, v in base.items()]


def child_main() -> None:
    """python tests/tiny_training.py DATA_DIR TOKENIZER_DIR KILL_AT_STEP|-1 [--resume] [key=value ...]"""
    sys.path.insert(0, str(REPO))
    from modules.training.llm.pretrain_command import run_pretrain
    data_dir, tokenizer_dir, kill_at = sys.argv[1], sys.argv[2], int(sys.argv[3])
    resume = "--resume" in sys.argv[4:]
    overrides = [a for a in sys.argv[4:] if a != "--resume"]
    torch.set_num_threads(1)

    def on_log(record: dict) -> None:
        if record["kind"] == "train" and record["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    run_dir = Path(data_dir) / "training" / "run"
    result = run_pretrain(None, overrides, data_dir=data_dir, resume=str(run_dir) if resume else None,
                          open_data=lambda config: TinyData(config.seq_len, tokenizer_dir=tokenizer_dir),
                          on_log=on_log)
    print(json.dumps({"step": result.step, "finished": result.finished}))


if __name__ == "__main__":
    child_main()

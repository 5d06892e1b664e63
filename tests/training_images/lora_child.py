"""A LoRA run in its own process for the resume and multi-process tests.

    python lora_child.py DATA_DIR DATASET KILL_AT [--resume] [key=value ...]

KILL_AT >= 1: the process SIGKILLs itself right after logging that step (no clean-up of any kind).
Prints the final {"step", "finished"} as the last line of stdout.
"""
import json
import os
import signal
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from modules.training.images.train_command import run_image_training  # noqa: E402

CONFIG = ROOT / "configs" / "training" / "lora-sd15-tiny.yaml"


def main() -> None:
    data_dir, dataset, kill_at, *rest = sys.argv[1:]
    resume = "--resume" in rest
    overrides = [a for a in rest if a != "--resume"]
    kill_at = int(kill_at)

    def on_log(record: dict) -> None:
        if record["step"] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)

    run_dir = Path(data_dir) / "training" / "run"
    result = run_image_training(None if resume else str(CONFIG),
                                overrides if resume else [f"dataset={dataset}", "run_name=run", *overrides],
                                data_dir=data_dir, mode="lora", resume=str(run_dir) if resume else None,
                                on_log=on_log)
    print(json.dumps({"step": result.step, "finished": result.finished}))


if __name__ == "__main__":
    main()

"""Chat fine-tuning of an existing model, full or LoRA: ``python -m modules.training sft``.

    python -m modules.training sft --config configs/training/sft-tiny.yaml [key=value ...]
    python -m modules.training sft --resume <data-dir>/training/<run-name> [key=value ...]

``base_model`` is a folder of ``<data-dir>/models/LLM`` or a path; the data is JSONL conversations (see
sft_data.py). The result is ``<run>/final/`` (an HF folder the Chat tab loads; copy or link it into
models/LLM/) and, for LoRA, ``<run>/adapter/`` (a peft adapter).
"""
from __future__ import annotations

import argparse
import logging
from pathlib import Path

from modules.training.checkpoints import CheckpointWriteError
from modules.training.config import ConfigError, load_config, world_size_from_env
from modules.training.run_dir import RunDirError, create_run_dir, default_run_name, open_run_dir

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", help="YAML config (see configs/training/sft-tiny.yaml)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue this run from its latest checkpoint")
    parser.add_argument("--data-dir", help="Atelier's data dir; runs go to <data-dir>/training/ and base_model "
                                           "names are looked up in <data-dir>/models/LLM")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config keys")


def run_sft(config_path: str | None, overrides: list[str], *, data_dir: str | Path, resume: str | None = None,
            on_log=None, should_stop=None):
    """Config -> base model, template and data -> run folder -> :class:`SFTTrainer` -> :class:`SFTResult`."""
    from modules.llm.tokenizer import Tokenizer, TokenizerError
    from modules.paths import Paths
    from modules.training.llm.eval_command import resolve_model
    from modules.training.llm.evaluate import EvalError
    from modules.training.llm.pretrain import TrainingError
    from modules.training.llm.sft import SFTTrainer, chat_template_for
    from modules.training.llm.sft_config import SFTConfig
    from modules.training.llm.sft_data import SFTData, build_examples, read_conversations

    if world_size_from_env() != 1:
        raise TrainingError("sft runs in one process; start it without torchrun")
    if resume:
        run = open_run_dir(resume)
        config = load_config(config_path, overrides, cls=SFTConfig, base=run.read_config())
    else:
        config = load_config(config_path, overrides, cls=SFTConfig)
        if not config.run_name:
            config.run_name = default_run_name("sft")
        run = None
    try:
        base_dir = resolve_model(config.base_model, Paths.from_options(data_dir).model_dir("LLM"))
        tokenizer = Tokenizer.from_dir(base_dir)
    except (EvalError, TokenizerError) as exc:
        raise TrainingError(f"base_model: {exc}") from None
    template = chat_template_for(config, base_dir)
    from modules.llm.config import LlamaConfig
    context = LlamaConfig.from_json_file(base_dir / "config.json").max_position_embeddings
    if config.seq_len > context:
        raise ConfigError([(f"seq_len {config.seq_len} is longer than the model's context ({context} tokens); "
                            f"use seq_len={context} or less (0 means the context)")])
    seq_len = config.seq_len or context
    examples = build_examples(read_conversations(config.data), tokenizer, template, seq_len, source=config.data)
    val = build_examples(read_conversations(config.val_data), tokenizer, template, seq_len,
                         source=config.val_data) if config.val_data else []
    data = SFTData(examples, seed=config.seed, val_examples=val)
    if run is None:
        run = create_run_dir(data_dir, config.run_name, config.to_dict())
    trainer = SFTTrainer(config, base_dir, data, run, template=template, resume=bool(resume), on_log=on_log,
                         should_stop=should_stop)
    if resume:
        run.write_config(config.to_dict())
    return trainer.train()


def run(args: argparse.Namespace) -> int:
    from modules.paths import Paths
    from modules.training.llm.pretrain import TrainingError
    from modules.training.llm.sft_data import SFTDataError
    if not args.config and not args.resume:
        log.error("give --config FILE.yaml for a new run, or --resume RUN_DIR to continue one")
        return 2
    data_dir = Paths.from_options(args.data_dir).data_dir

    def show(record: dict) -> None:
        if record["kind"] == "train":
            log.info("step %d/%d  loss %.4f  lr %.2e  %.0f assistant tok/s", record["step"],
                     record["total_steps"], record["loss"], record["lr"], record["tokens_per_s"])
        elif record["kind"] == "val":
            log.info("step %d  val loss %.4f", record["step"], record["val_loss"])

    try:
        result = run_sft(args.config, args.overrides, data_dir=data_dir, resume=args.resume, on_log=show)
    except (ConfigError, RunDirError, TrainingError, CheckpointWriteError, SFTDataError) as exc:
        log.error("%s", exc)
        return 2
    if result.finished:
        log.info("finished at step %d; model in %s%s", result.step, result.final_dir,
                 f", adapter in {result.adapter_dir}" if result.adapter_dir else "")
    else:
        log.info("stopped at step %d; resume with --resume %s", result.step, result.run_dir)
    return 0

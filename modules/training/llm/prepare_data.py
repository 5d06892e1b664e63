"""prepare-data: train (or reuse) a tokenizer and build a packed dataset into <data-dir>/training/data/<name>/.

``python -m modules.training prepare-data --config configs/training/data-example.yaml [key=value ...]``

The output folder holds ``tokenizer/`` (the tokenizer a new model is trained with), ``meta.json`` and one
folder of ``.bin`` shards per source (see :mod:`modules.training.llm.data`), and ``config.yaml``, the config
as resolved after overrides. Relative data paths start at the folder the command runs from.
"""
from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path

import yaml

from modules.training.llm.data import DataError, build_dataset, remove_dataset
from modules.training.llm.data_config import DataConfig, DataConfigError, load_data_config
from modules.training.llm.documents import iter_documents, source_files
from modules.training.llm.tokenizer_train import TokenizerTrainingError, copy_tokenizer, train_tokenizer

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", required=True, help="YAML data config (see configs/training/data-example.yaml)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="override config values, e.g. seq_len=128")
    parser.add_argument("--data-dir", default=None, help="Atelier's data dir (default: the repository)")
    parser.add_argument("--overwrite", action="store_true", help="replace a dataset of the same name")


def run(args: argparse.Namespace) -> int:
    from modules.paths import Paths

    try:
        config = load_data_config(args.config, args.overrides)
        paths = Paths.from_options(args.data_dir)
        summary = prepare(config, paths, overwrite=args.overwrite)
    except (DataConfigError, DataError, TokenizerTrainingError) as exc:
        print(f"prepare-data: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(summary, indent=2))
    return 0


def dataset_dir(paths, name: str) -> Path:
    """Where dataset ``name`` lives in the data dir."""
    return paths.data_dir / "training" / "data" / name


def prepare(config: DataConfig, paths, *, overwrite: bool = False) -> dict:
    """Tokenizer, then dataset, then ``config.yaml``; returns a summary with the measured tokens/s."""
    out = dataset_dir(paths, config.name)
    if (out / "meta.json").exists() and not overwrite:
        raise DataError(f"dataset {config.name!r} already exists in {out}; pass --overwrite to rebuild it, or "
                        "choose another name (name=...)")
    for source in config.sources:      # every path problem before any slow work
        source_files(source)
    if (out / "meta.json").exists():
        remove_dataset(out)
    started = time.perf_counter()
    tokenizer_dir = out / "tokenizer"
    if config.tokenizer.from_model:
        copy_tokenizer(_model_folder(config.tokenizer.from_model, paths), tokenizer_dir)
        log.info("reusing the tokenizer of %s", config.tokenizer.from_model)
    else:
        texts = (text for source in config.sources for _, text in iter_documents(source))
        train_tokenizer(texts, config.tokenizer.vocab_size, tokenizer_dir, seed=config.seed,
                        max_sentences=config.tokenizer.max_sentences, model_max_length=config.seq_len)
        log.info("trained a %d-piece tokenizer in %.1f s", config.tokenizer.vocab_size,
                 time.perf_counter() - started)
    built = time.perf_counter()
    build_dataset(config.sources, tokenizer_dir, config.seq_len, out, val_fraction=config.val_fraction,
                  seed=config.seed, overwrite=True, shard_sequences=config.shard_sequences)
    seconds = time.perf_counter() - built
    (out / "config.yaml").write_text(yaml.safe_dump(config.raw, sort_keys=False), encoding="utf-8")
    meta = json.loads((out / "meta.json").read_text(encoding="utf-8"))
    tokens = sum(s["tokens"]["train"] + s["tokens"]["val"] for s in meta["sources"])
    return {"dataset": str(out), "tokens": tokens, "build_seconds": round(seconds, 2),
            "tokens_per_second": round(tokens / seconds) if seconds > 0 else None,
            "sources": {s["name"]: {"weight": s["weight"], "files": s["files"], "documents": s["documents"],
                                    "sequences": s["sequences"], "tokens": s["tokens"]} for s in meta["sources"]}}


def _model_folder(spec: str, paths) -> Path:
    """``from:`` is a folder path, or the name of a model in ``<data-dir>/models/LLM/``."""
    direct = Path(spec).expanduser()
    if direct.is_dir():
        return direct
    named = paths.model_dir("LLM") / spec
    if named.is_dir():
        return named
    raise TokenizerTrainingError(f"tokenizer.from: {spec!r} is neither a folder nor a model in "
                                 f"{paths.model_dir('LLM')}; give a model folder with tokenizer.model")

"""Evaluate: perplexity and multiple-choice accuracy of a model or a training checkpoint, kept per checkpoint.

    python -m modules.training eval --model NAME_OR_PATH --task ppl:FILE --task mc:FILE
                                    [--checkpoint RUN_DIR/checkpoints/step-N] [--data-dir DIR]

NAME is a folder of ``models/LLM/`` in the data dir (or a path to an HF folder). ``--checkpoint`` takes the
weights from a checkpoint folder (``model.safetensors`` with Hugging Face keys) and the architecture and
tokenizer from its own ``config.json`` / tokenizer files when it has them, else from ``--model``.

Results are printed as a table and appended to a JSON file, one entry per evaluation (time, model and
checkpoint identity with the weights' sha256, settings, every task's figures and per-item scores):
``<run>/eval/<checkpoint>.json`` for a run's checkpoint, ``<data-dir>/training/eval/<model>.json`` for a
model. Earlier entries are kept; a file that cannot be read as such a history is left untouched and the
new result goes next to it under a timestamped name.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from modules.training.llm.eval_data import load_mc_items, load_texts
from modules.training.llm.evaluate import EvalError, multiple_choice, perplexity

log = logging.getLogger(__name__)

TASK_KINDS = {"ppl": "perplexity of held-out text (.txt/.md/... one document, .jsonl one per line)",
              "mc": "multiple choice, JSONL lines {context, choices, gold}"}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, help="model folder name in <data-dir>/models/LLM, or a path "
                        "to an HF Llama folder (may be left out when --checkpoint has config and tokenizer)")
    parser.add_argument("--checkpoint", default=None, type=Path,
                        help="a checkpoint folder, e.g. <data-dir>/training/RUN/checkpoints/step-000100")
    parser.add_argument("--task", action="append", default=[], metavar="KIND:FILE", required=True,
                        help="repeatable; " + "; ".join(f"{k}:FILE {v}" for k, v in TASK_KINDS.items()))
    parser.add_argument("--data-dir", default=None, help="Atelier's data dir (default: the repository)")
    parser.add_argument("--seq-len", type=int, default=None, help="window in tokens (default: model context)")
    parser.add_argument("--rolling-context", type=int, default=1, metavar="N",
                        help="perplexity: tokens each window re-reads from the previous one (1: lm-eval's "
                             "disjoint windows; larger: strided, more context per token)")
    parser.add_argument("--batch-size", type=int, default=16, help="sequences per forward pass")
    parser.add_argument("--no-bos", action="store_true",
                        help="multiple choice without <s> before the context (lm-eval's HF default)")
    parser.add_argument("--device", default="auto", help="auto (CUDA when available), cpu, cuda, cuda:1 ...")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))


def run(args: argparse.Namespace) -> int:
    try:
        result, target = evaluate(args)
    except EvalError as exc:
        print(f"eval: error: {exc}", file=sys.stderr)
        return 2
    print(format_table(result))     # shown before writing: a full disk does not lose the figures
    try:
        path = append_result(target, result)
    except OSError as exc:
        print(f"eval: error: cannot write the results to {target} ({exc.strerror or exc}); free space or fix "
              "the folder's permissions and run again (the figures are above)", file=sys.stderr)
        return 1
    print(f"\nResults written to {path}")
    return 0


def evaluate(args: argparse.Namespace) -> tuple[dict, Path]:
    """Check every input, load the model, run the tasks; returns (result entry, the JSON file it belongs in)."""
    from modules.paths import Paths

    # 1. Check inputs (files before the model: a bad line costs a second, not a model load)
    paths = Paths.from_options(args.data_dir)
    tasks = [parse_task(spec) for spec in args.task]
    loaded = [(kind, path, load_texts(path) if kind == "ppl" else load_mc_items(path)) for kind, path in tasks]
    for name, value, low in (("--batch-size", args.batch_size, 1), ("--rolling-context", args.rolling_context, 1)):
        if value < low:
            raise EvalError(f"{name} must be at least {low}, got {value}")
    device = _device(args.device)
    model_folder = resolve_model(args.model, paths.model_dir("LLM")) if args.model else None
    checkpoint = _checked_checkpoint(args.checkpoint) if args.checkpoint else None
    if model_folder is None and checkpoint is None:
        raise EvalError("give --model NAME_OR_PATH (a folder of models/LLM) and/or --checkpoint FOLDER")

    # 2. Load
    started = time.perf_counter()
    model, tokenizer, identity = load_for_eval(model_folder, checkpoint, device=device, dtype=DTYPES[args.dtype])
    seq_len = args.seq_len
    if seq_len is not None and not 1 <= seq_len <= model.config.max_position_embeddings:
        raise EvalError(f"--seq-len must be between 1 and the model's context of "
                        f"{model.config.max_position_embeddings}, got {seq_len}")
    if args.rolling_context > (seq_len or model.config.max_position_embeddings):
        raise EvalError(f"--rolling-context {args.rolling_context} is larger than the window; use at most "
                        f"{seq_len or model.config.max_position_embeddings}")

    # 3. Run every task
    results = []
    for kind, path, data in loaded:
        task_started = time.perf_counter()
        if kind == "ppl":
            figures = perplexity(model, tokenizer, data, seq_len, context_len=args.rolling_context,
                                 batch_size=args.batch_size)
        else:
            figures = multiple_choice(model, tokenizer, data, add_bos=not args.no_bos, seq_len=seq_len,
                                      batch_size=args.batch_size)
        results.append({"task": f"{kind}:{path.name}", "kind": kind, "file": str(path),
                        "file_sha256": _sha256([path]), "seconds": round(time.perf_counter() - task_started, 3),
                        **figures})
        log.info("%s:%s done in %.1f s", kind, path, time.perf_counter() - task_started)

    # 4. The entry to store
    entry = {"time": datetime.now(timezone.utc).isoformat(timespec="seconds"), **identity,
             "settings": {"device": str(device), "dtype": args.dtype, "seq_len": seq_len or
                          model.config.max_position_embeddings, "rolling_context": args.rolling_context,
                          "add_bos": not args.no_bos, "batch_size": args.batch_size},
             "seconds": round(time.perf_counter() - started, 3), "tasks": results}
    return entry, result_path(paths.data_dir, model_folder, checkpoint)


# ---------------------------------------------------------------------------------------- inputs
def parse_task(spec: str) -> tuple[str, Path]:
    kind, sep, file = spec.partition(":")
    if not sep or kind not in TASK_KINDS or not file:
        raise EvalError(f"--task {spec!r}: write KIND:FILE with KIND one of {', '.join(TASK_KINDS)} "
                        "(e.g. --task ppl:heldout.txt --task mc:questions.jsonl)")
    path = Path(file).expanduser()
    if not path.is_file():
        raise EvalError(f"--task {spec}: no such file {path}; give the path of an existing file")
    return kind, path


def resolve_model(spec: str, llm_dir: Path) -> Path:
    """A path to an HF folder, or the name of a folder in ``llm_dir``; unknown names list what exists."""
    from modules.llm.loader import list_llm_models

    as_path = Path(spec).expanduser()
    for candidate in (as_path, llm_dir / spec):
        if candidate.is_dir() and (candidate / "config.json").is_file():
            return candidate.resolve()
    names = [m["name"] for m in list_llm_models(llm_dir)]
    available = f"models there: {', '.join(names)}" if names else "there are no models there yet"
    raise EvalError(f"--model {spec!r}: no such model folder (looked for the path and for {llm_dir / spec}); "
                    f"{available}")


def _checked_checkpoint(folder: Path) -> Path:
    folder = folder.expanduser()
    if not folder.is_dir():
        raise EvalError(f"--checkpoint {folder}: no such folder; give a run's checkpoints/step-NNNNNN folder")
    return folder.resolve()


def _device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise EvalError(f"--device {spec!r} is not a device; use auto, cpu or cuda[:N]") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise EvalError(f"--device {spec}: CUDA is not available on this machine; use --device cpu")
    return device


# ------------------------------------------------------------------------------------------ loading
def load_for_eval(model_folder: Path | None, checkpoint: Path | None, *, device: torch.device,
                  dtype: torch.dtype):
    """(model, tokenizer, identity): the architecture and tokenizer from the checkpoint when it has them,
    else from the model folder; the weights from the checkpoint when given."""
    from modules.llm.checkpoint import CheckpointError, load_model, weight_files
    from modules.llm.config import LlamaConfig
    from modules.llm.tokenizer import Tokenizer, TokenizerError

    weights_folder = checkpoint or model_folder
    config_folder = _first_with(("config.json",), checkpoint, model_folder)
    tokenizer_folder = _first_with(("tokenizer.model", "tokenizer.json"), checkpoint, model_folder)
    if config_folder is None or tokenizer_folder is None:
        lacking = "config.json" if config_folder is None else "tokenizer (tokenizer.model or tokenizer.json)"
        raise EvalError(f"--checkpoint {checkpoint} has no {lacking}; also give --model NAME, the model whose "
                        "architecture and tokenizer the run trains")
    try:
        config = LlamaConfig.from_json_file(config_folder / "config.json")
        tokenizer = Tokenizer.from_dir(tokenizer_folder)
        if tokenizer.vocab_size > config.vocab_size:
            raise EvalError(f"the tokenizer in {tokenizer_folder} has {tokenizer.vocab_size} tokens but "
                            f"{config_folder / 'config.json'} has vocab_size {config.vocab_size}: they belong to "
                            "different models; give the --model the checkpoint was trained from")
        model = load_model(weights_folder, device=device, dtype=dtype, config=config)
        files = weight_files(weights_folder)
    except (CheckpointError, TokenizerError) as exc:
        raise EvalError(str(exc)) from None
    except ValueError as exc:       # LlamaConfig validation names the file and every bad field
        raise EvalError(str(exc)) from None
    identity = {
        "model": {"name": (model_folder or config_folder).name, "path": str(model_folder or config_folder),
                  "parameters": model.num_parameters(), "layers": config.num_hidden_layers,
                  "hidden_size": config.hidden_size, "vocab_size": config.vocab_size,
                  "context": config.max_position_embeddings,
                  "tokenizer": str(tokenizer.source), "tokenizer_sha256": _sha256([Path(tokenizer.source)])},
        "checkpoint": None if checkpoint is None else {
            "name": checkpoint.name, "path": str(checkpoint), "run": str(_run_dir(checkpoint)),
            "step": _step(checkpoint.name)},
        "weights_sha256": _sha256(files),
    }
    return model, tokenizer, identity


def _first_with(names: tuple[str, ...], *folders: Path | None) -> Path | None:
    for folder in folders:
        if folder is not None and any((folder / name).is_file() for name in names):
            return folder
    return None


def _sha256(files: list[Path]) -> str:
    digest = hashlib.sha256()
    for path in files:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return digest.hexdigest()


def _run_dir(checkpoint: Path) -> Path:
    """``RUN/checkpoints/step-N`` -> RUN; any other folder (``RUN/final``) -> its parent."""
    return checkpoint.parent.parent if checkpoint.parent.name == "checkpoints" else checkpoint.parent


def _step(name: str) -> int | None:
    prefix, _, number = name.partition("-")
    return int(number) if prefix == "step" and number.isdigit() else None


# ------------------------------------------------------------------------------------------ results
def result_path(data_dir: Path, model_folder: Path | None, checkpoint: Path | None) -> Path:
    if checkpoint is not None:
        return _run_dir(checkpoint) / "eval" / f"{checkpoint.name}.json"
    return Path(data_dir) / "training" / "eval" / f"{model_folder.name}.json"


def append_result(path: Path, entry: dict) -> Path:
    """Add ``entry`` to the history in ``path`` (written atomically); returns the file written.

    A file that is not such a history (damaged, or written by something else) is never overwritten: the
    entry goes to ``<stem>.<UTC time>.json`` next to it instead.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    history = {"evaluations": []}
    if path.exists():
        try:
            history = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(history, dict) or not isinstance(history.get("evaluations"), list):
                raise ValueError("no 'evaluations' list")
        except (ValueError, UnicodeDecodeError, OSError) as exc:
            stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S%fZ")
            aside = path.with_name(f"{path.stem}.{stamp}.json")
            log.warning("%s is not an evaluation history (%s); leaving it as it is and writing %s", path, exc, aside)
            path, history = aside, {"evaluations": []}
    history["evaluations"].append(entry)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(history, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def format_table(entry: dict) -> str:
    """One row per task: the figures people compare (ppl and bits per byte, or acc and acc_norm)."""
    source = entry["checkpoint"]["path"] if entry.get("checkpoint") else entry["model"]["path"]
    header = ("task", "size", "ppl", "bits/byte", "acc", "acc_norm")
    rows = []
    for task in entry["tasks"]:
        if task["kind"] == "ppl":
            rows.append((task["task"], f"{task['tokens']} tokens", f"{task['ppl']:.3f}",
                         f"{task['bits_per_byte']:.4f}", "", ""))
        else:
            rows.append((task["task"], f"{task['items']} items", "", "", f"{task['acc']:.4f}",
                         f"{task['acc_norm']:.4f}"))
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    settings = entry["settings"]
    title = f"Evaluation of {source} ({settings['dtype']}, {settings['device']}, {entry['seconds']:.1f} s)"
    lines = [title,
             "  ".join(h.ljust(w) for h, w in zip(header, widths)),
             "  ".join("-" * w for w in widths)]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    return "\n".join(lines)

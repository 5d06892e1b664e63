"""Quantize a model into several formats and print the table the Quantize tab shows.

    python -m modules.quantize report MODEL [--types Q8_0,Q4_K_M,int8] [--overwrite] [--threads N]
                                      [--max-new-tokens 32] [--json FILE] [--data-dir DIR]

MODEL is a folder or a ``.gguf`` file of ``models/LLM/`` in the data dir, or a path. Each type is written into
``models/LLM`` (``<MODEL>.<TYPE>.gguf`` for llama.cpp's types, ``<MODEL>-<scheme>/`` for Atelier's int8 /
int4) unless it exists already (then it is measured as it is; ``--overwrite`` rewrites it), and measured
against Atelier's fp32 model of the same weights: size, bits per weight, perplexity of the answers of
held-out chats and its change, greedy agreement over a fixed prompt set, decode and prefill tokens/s
(:mod:`modules.quantize.report`, :mod:`modules.quantize.measure`).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from modules.quantize.report import DEFAULT_FORMATS, known_formats
    parser.add_argument("model", metavar="MODEL", help="folder or .gguf file in <data-dir>/models/LLM, or a path")
    parser.add_argument("--types", default=",".join(DEFAULT_FORMATS),
                        help="comma-separated formats (default %(default)s); known: " + ", ".join(known_formats()))
    parser.add_argument("--overwrite", action="store_true", help="rewrite formats whose files exist already")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="threads for llama.cpp")
    parser.add_argument("--max-new-tokens", type=int, default=48, help="most greedy tokens per agreement prompt (replies end at EOS)")
    parser.add_argument("--json", type=Path, default=None, metavar="FILE", help="also write the report as JSON")
    parser.add_argument("--data-dir", default=None, help="Atelier's data dir (default: the repository)")


def run(args: argparse.Namespace) -> int:
    from modules.paths import Paths
    from modules.quantize.errors import GGUFExportError
    from modules.quantize.report import QuantizeError, run_report

    llm_dir = Paths.from_options(args.data_dir).model_dir("LLM")
    formats = [f.strip() for f in args.types.split(",") if f.strip()]
    if args.max_new_tokens < 1 or args.threads < 1:
        print("report: error: --max-new-tokens and --threads must be at least 1", file=sys.stderr)
        return 2
    shown: list[str] = []

    def progress(fraction: float, text: str) -> None:
        if not shown or shown[-1] != text:      # llama.cpp's quantizer reports often: one line per stage
            shown.append(text)
            print(f"[{fraction * 100:3.0f}%] {text}", flush=True)

    try:
        report = run_report(llm_dir, args.model, formats, threads=args.threads, overwrite=args.overwrite,
                            max_new_tokens=args.max_new_tokens, progress=progress)
    except (QuantizeError, GGUFExportError, FileNotFoundError) as exc:
        print(f"report: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("report: interrupted; formats finished before it are in models/LLM", file=sys.stderr)
        return 130
    print(report.markdown())
    if args.json is not None:
        args.json.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 0

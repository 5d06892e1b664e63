"""Export a model to GGUF (llama.cpp's format), unquantized or quantized by llama.cpp.

    python -m modules.quantize export MODEL --type Q4_K_M [--out FILE] [--overwrite] [--threads N]
                                      [--imatrix-text FILE] [--data-dir DIR]

MODEL is a folder of ``models/LLM/`` in the data dir, or a path to a Hugging Face Llama folder, or a GGUF file
(re-exported as another type: its weights dequantized, its tokenizer copied). The file goes
to ``models/LLM/<MODEL>.<TYPE>.gguf`` unless ``--out`` says otherwise: the type after the model name and a
dot, upper-case as llama.cpp spells it, is the naming most published GGUF files use
(``SmolLM2-135M-Instruct.Q4_1.gguf``), so a folder of exports sorts by model and reads by type. An existing
file is never replaced without ``--overwrite``. ``--help`` lists the types.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from modules.quantize.gguf_types import GGUF_TYPES


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.epilog = "types (bits per weight of the main matrices; * = needs --imatrix-text):\n" + "\n".join(
        f"  {t.name:8s} {t.nominal_bits:6.3f}{'*' if t.needs_imatrix else ' '} {t.note}" for t in GGUF_TYPES.values())
    parser.add_argument("model", metavar="MODEL", help="folder name in <data-dir>/models/LLM, or a path to an HF "
                                                       "Llama folder")
    parser.add_argument("--type", required=True, metavar="TYPE", help="GGUF type: " + ", ".join(GGUF_TYPES))
    parser.add_argument("--out", type=Path, default=None,
                        help="output file (default: <data-dir>/models/LLM/<MODEL>.<TYPE>.gguf)")
    parser.add_argument("--overwrite", action="store_true", help="replace the output file if it exists")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                        help="llama.cpp quantizer threads (default: every core)")
    parser.add_argument("--imatrix-text", type=Path, default=None, metavar="FILE",
                        help="calibration text: compute an importance matrix with the model over it and give it "
                             "to llama.cpp's quantizer (required by the * types, improves the k-quants)")
    parser.add_argument("--imatrix-chunks", type=int, default=None, metavar="N",
                        help="use at most N chunks of 512 tokens of the calibration text")
    parser.add_argument("--data-dir", default=None, help="Atelier's data dir (default: the repository)")
    parser.add_argument("--allow-unsafe-pickle", action="store_true",
                        help="accept pickled pytorch_model.bin weights (they can run code when loaded)")


def run(args: argparse.Namespace) -> int:
    from modules.quantize.errors import GGUFExportError

    try:
        out = export(args)
    except (GGUFExportError, FileNotFoundError) as exc:
        print(f"export: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("export: interrupted; no partial file was left behind", file=sys.stderr)
        return 130
    from modules.quantize.gguf_info import gguf_file_info
    info = gguf_file_info(out)
    print(f"Wrote {out}: {info.file_bytes / 2**20:.2f} MiB, {info.file_type}, "
          f"{info.matrix_bits_per_weight:.2f} bits/weight over the matrices "
          f"({info.bits_per_weight:.2f} over all {sum(info.tensor_types.values())} tensors; "
          + ", ".join(f"{n} {t}" for t, n in sorted(info.tensor_types.items(), key=lambda kv: -kv[1])) + ")")
    return 0


def export(args: argparse.Namespace) -> Path:
    """Resolve the model and the output, compute an importance matrix if asked, export; returns the file."""
    from modules.paths import Paths
    from modules.quantize.errors import GGUFExportError
    from modules.quantize.gguf_export import export_model
    from modules.quantize.gguf_types import gguf_type

    kind = gguf_type(args.type)
    llm_dir = Paths.from_options(args.data_dir).model_dir("LLM")
    folder = resolve_model(args.model, llm_dir)
    stem = folder.name[:-len(".gguf")].rsplit(".", 1)[0] if folder.suffix.lower() == ".gguf" else folder.name
    out = args.out if args.out is not None else llm_dir / f"{stem}.{kind.name}.gguf"
    if out.exists() and not args.overwrite:
        raise GGUFExportError(f"{out} already exists; pass --overwrite to replace it, or --out to write elsewhere")
    if args.threads < 0:
        raise GGUFExportError(f"--threads must be 0 (every core) or more, got {args.threads}")
    imatrix = None
    if args.imatrix_text is not None:
        from modules.quantize.imatrix import imatrix_from_text
        if not args.imatrix_text.is_file():
            raise GGUFExportError(f"--imatrix-text {args.imatrix_text}: no such file")
        text = args.imatrix_text.read_text(encoding="utf-8", errors="replace")
        imatrix = imatrix_from_text(folder, text, max_chunks=args.imatrix_chunks)
        print(f"importance matrix: {imatrix.tokens} tokens in {imatrix.chunks} chunks, {len(imatrix.values)} tensors")
    return export_model(folder, out, kind.name, overwrite=args.overwrite, imatrix=imatrix, threads=args.threads,
                        progress=_Printer(), allow_unsafe_pickle=args.allow_unsafe_pickle)


def resolve_model(spec: str, llm_dir: Path) -> Path:
    """A path to an HF folder, or the name of a folder in *llm_dir*; an unknown name lists what is there."""
    from modules.quantize.errors import GGUFExportError

    for candidate in (Path(spec).expanduser(), llm_dir / spec):
        if candidate.is_dir() and (candidate / "config.json").is_file():
            return candidate.resolve()
        if candidate.is_file() and candidate.suffix.lower() == ".gguf":     # a re-export of another GGUF
            return candidate.resolve()
    names = sorted(p.name for p in llm_dir.iterdir() if (p / "config.json").is_file()) if llm_dir.is_dir() else []
    available = f"models there: {', '.join(names)}" if names else "there are no models there"
    raise GGUFExportError(f"MODEL {spec!r}: no such model folder (looked for the path and for {llm_dir / spec}); "
                          f"{available}")


class _Printer:
    """Prints each stage at every 10%, on one line per step (readable in logs, not only in terminals)."""

    def __init__(self) -> None:
        self.shown: dict[str, int] = {}

    def __call__(self, stage: str, fraction: float) -> None:
        step = int(fraction * 10)
        if step > self.shown.get(stage, -1):
            self.shown[stage] = step
            print(f"{stage}: {step * 10:3d}%", flush=True)

"""Quantize one model into several formats and measure each against the unquantized model.

What the Quantize tab and ``python -m modules.quantize report MODEL`` show: per format, the file it
wrote into ``models/LLM/`` (so every row can be loaded in Chat), its size and bits per weight, perplexity
on held-out text and its change against Atelier's own fp32 model of the same weights, greedy agreement
with that model over a fixed prompt set, and decode / prefill speed on the backend that serves the
format (llama.cpp for GGUF, Atelier's engine for its int8 / int4 weights). Definitions:
:mod:`modules.quantize.measure`.

Files: a GGUF type ``T`` of model ``M`` becomes ``models/LLM/M.T.gguf`` and a torch-native scheme ``S``
the folder ``models/LLM/M-S/``. A file that exists already is measured as it is and never replaced unless
*overwrite* is set (the row's note says which happened).

Models loaded for measuring go through the shared model manager when one is given (keys
``quantize:<path>``), so they count against the same memory budget as everything else, and are unloaded
as soon as their row is measured.
"""
from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from modules.quantize import measure

log = logging.getLogger(__name__)

#: Atelier's torch-native weight formats (modules.quantize.torch_weights), besides llama.cpp's GGUF types
TORCH_FORMATS = ("int8", "int4-g32", "int4-g64", "int4-g128")
#: what the tab ticks by default
DEFAULT_FORMATS = ("Q8_0", "Q4_K_M", "int8")

Progress = Callable[[float, str], None]


class QuantizeError(ValueError):
    """A report that cannot run (unknown format, unusable model); the message says what to do."""


def gguf_types() -> dict[str, Any]:
    from modules.quantize.gguf_types import GGUF_TYPES
    return dict(GGUF_TYPES)


def known_formats() -> list[str]:
    """Every format a report can make: llama.cpp's GGUF types, then Atelier's int8 / int4."""
    return list(gguf_types()) + list(TORCH_FORMATS)


def model_stem(name: str) -> str:
    """The model's name without ``.gguf`` and a GGUF type: ``SmolLM2-135M-Instruct.Q4_1.gguf`` ->
    ``SmolLM2-135M-Instruct``, so re-exports are named after the model, not after the file they came from."""
    if not name.lower().endswith(".gguf"):
        return name
    base = name[:-5]
    head, _, tail = base.rpartition(".")
    return head if head and tail.upper() in gguf_types() else base


def output_path(models_dir: Path, source: str, fmt: str) -> Path:
    """Where format *fmt* of model *source* is written (see the module docstring)."""
    base = model_stem(Path(source).name)
    return models_dir / (f"{base}-{fmt}" if fmt in TORCH_FORMATS else f"{base}.{fmt}.gguf")


@dataclass
class ReportRow:
    format: str
    model: str              # the name to load in Chat (a folder or file in models/LLM)
    backend: str            # "llama.cpp" or "atelier"
    size_bytes: int
    bits_per_weight: float
    ppl: float
    ppl_change: float       # relative to the reference: 0.01 = 1 % higher perplexity
    agreement: float        # greedy tokens reproduced before the first divergence (share)
    identical: float        # prompts with identical greedy continuations (share)
    decode_tps: float
    prefill_tps: float
    seconds: float = 0.0    # time to write and quantize the file (0 when it existed)
    note: str = ""


@dataclass
class QuantizeReport:
    source: str
    parameters: int
    heldout_tokens: int
    reference: ReportRow
    rows: list[ReportRow] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"source": self.source, "parameters": self.parameters, "heldout_tokens": self.heldout_tokens,
                "reference": asdict(self.reference), "rows": [asdict(r) for r in self.rows]}

    def table_rows(self) -> list[list[Any]]:
        """One list per row for a table widget: the columns of :data:`COLUMNS`."""
        out = []
        for row in [self.reference, *self.rows]:
            out.append([row.format, row.model, row.backend, round(row.size_bytes / 2**20, 2),
                        round(row.bits_per_weight, 2), round(row.ppl, 3), f"{row.ppl_change * 100:+.2f}%",
                        f"{row.agreement * 100:.1f}%", f"{row.identical * 100:.0f}%", round(row.decode_tps, 1),
                        round(row.prefill_tps, 1), row.note])
        return out

    def markdown(self) -> str:
        head = "| " + " | ".join(COLUMNS) + " |\n|" + "---|" * len(COLUMNS) + "\n"
        body = "".join("| " + " | ".join(str(c) for c in r) + " |\n" for r in self.table_rows())
        return (f"Model {self.source} ({self.parameters / 1e6:.2f}M parameters); perplexity of the answers of held-out "
                f"chats ({self.heldout_tokens} tokens); greedy agreement over {len(measure.AGREEMENT_PROMPTS)} "
                f"prompts.\n\n" + head + body)


COLUMNS = ("format", "model", "backend", "size MB", "bits/weight", "perplexity", "ppl change", "greedy agreement",
           "identical replies", "decode tok/s", "prefill tok/s", "note")


def _source_folder(models_dir: Path, source: str) -> Path:
    """The model to quantize: a Hugging Face folder, or a GGUF file (measured against its dequantized weights)."""
    path = Path(source)
    folder = path if path.is_absolute() or path.exists() else models_dir / source
    if not folder.exists():
        raise QuantizeError(f"no model {source!r} in {models_dir}: give a model folder or .gguf file name from "
                            "models/LLM, or a path")
    if folder.is_file() and folder.suffix.lower() != ".gguf":
        raise QuantizeError(f"{folder.name} is neither a model folder (config.json + safetensors) nor a .gguf file")
    return folder


def _check_formats(formats: Sequence[str]) -> list[str]:
    known = known_formats()
    formats = list(dict.fromkeys(formats))
    unknown = [f for f in formats if f not in known]
    if unknown:
        raise QuantizeError(f"unknown format(s) {', '.join(unknown)}; known: {', '.join(known)}")
    if not formats:
        raise QuantizeError("choose at least one format")
    return formats


class _Loads:
    """Loads for measuring, through the model manager when there is one (then unloaded after use)."""

    def __init__(self, models: Any = None):
        self.models = models

    def run(self, key: str, load: Callable[[], Any], use: Callable[[Any], Any]) -> Any:
        if self.models is None:
            obj = load()
            try:
                return use(obj)
            finally:
                getattr(obj, "close", lambda: None)()
        key = f"quantize:{key}"
        lease = self.models.acquire(key, load, kind="llm")
        try:
            return use(lease.model)
        finally:
            lease.release()
            self.models.unload(key)


def _weights_size(path: Path) -> int:
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.glob("*.safetensors"))


def run_report(models_dir: str | Path, source: str, formats: Sequence[str], *, threads: int = 2,
               progress: Progress | None = None, overwrite: bool = False, max_new_tokens: int = 48,
               heldout: Sequence[tuple[list[int], list[int]]] | None = None, models: Any = None, extra_buffers: bool | None = None,
               check_interrupted: Callable[[], None] | None = None) -> QuantizeReport:
    """Write every format of model *source* into *models_dir* and measure it (see the module docstring).

    progress(fraction, text): called as each stage (writing, quantizing, evaluating) starts.
    heldout: (prompt ids, answer ids) to score (default :func:`measure.answer_requests` for the model).
    extra_buffers: llama.cpp's AMX / repacked buffers (None: probe, :func:`~modules.llm.llamacpp_runtime.extra_buffers_work`).
    """
    from modules.llm.loader import load_llm, read_llm_files
    models_dir = Path(models_dir)
    formats = _check_formats(formats)
    if extra_buffers is None and any(f not in TORCH_FORMATS for f in formats):
        from modules.llm.llamacpp_runtime import extra_buffers_work
        extra_buffers = extra_buffers_work()
    folder = _source_folder(models_dir, source)
    files = read_llm_files(folder)
    loads = _Loads(models)
    say = progress or (lambda fraction, text: None)
    check = check_interrupted or (lambda: None)
    requests = list(heldout) if heldout is not None else measure.answer_requests(files)
    prompts = [measure.chat_prompt_ids(files, text) for text in measure.AGREEMENT_PROMPTS]
    seq_len = int(files.config.max_position_embeddings)
    params = files.config.num_parameters()
    steps = 1 + 2 * len(formats)
    done = [0]

    def stage(text: str) -> None:
        check()
        say(done[0] / steps, text)
        log.info("quantize report %s: %s", folder.name, text)
        done[0] += 1

    def atelier_logits(llm: Any) -> Callable[[Sequence[int]], torch.Tensor]:
        return lambda ids: llm.model(torch.tensor([list(ids)], dtype=torch.long, device=llm.device))[0]

    stage("evaluating the unquantized model (Atelier, fp32)")

    def measure_reference(llm: Any) -> tuple[dict, measure.GreedyRun]:
        with torch.inference_mode():
            return (measure.answer_perplexity(atelier_logits(llm), requests, seq_len),
                    measure.greedy_run(llm, prompts, max_new_tokens))

    ref_ppl, ref_run = loads.run(str(folder), lambda: load_llm(folder, files=files),
                                 measure_reference)
    reference = ReportRow("F32 (reference)", folder.name, "atelier", params * 4, 32.0,
                          ref_ppl["ppl"], 0.0, 1.0, 1.0, ref_run.decode_tps, ref_run.prefill_tps,
                          note="Atelier's own engine, fp32 weights in memory"
                          + (" (the GGUF's weights dequantized)" if folder.is_file() else ""))
    report = QuantizeReport(folder.name, params, ref_ppl["tokens"], reference)

    for fmt in formats:
        out = output_path(models_dir, folder.name, fmt)
        started = time.perf_counter()
        if out.exists() and not overwrite:
            note, seconds = "existing file measured as it is (replace it to rewrite)", 0.0
            done[0] += 1
        else:
            stage(f"{fmt}: writing and quantizing {out.name}")
            _produce(folder, out, fmt, threads=threads, overwrite=overwrite, progress=say,
                     base=(done[0] - 1) / steps, span=1 / steps)
            note, seconds = "", time.perf_counter() - started
        stage(f"{fmt}: evaluating {out.name}")
        if fmt in TORCH_FORMATS:
            def use(llm: Any) -> tuple[dict, measure.GreedyRun]:
                with torch.inference_mode():
                    return (measure.answer_perplexity(atelier_logits(llm), requests, seq_len),
                            measure.greedy_run(llm, prompts, max_new_tokens))
            ppl, run = loads.run(str(out), lambda: load_llm(out), use)
            backend = "atelier"
        else:
            ppl, run = _measure_gguf(out, files, requests, prompts, seq_len, threads, max_new_tokens, loads,
                                     bool(extra_buffers))
            backend = "llama.cpp"
        size = _weights_size(out)
        agree = measure.agreement(ref_run.tokens, run.tokens)
        report.rows.append(ReportRow(fmt, out.name, backend, size, size * 8 / params, ppl["ppl"],
                                     ppl["ppl"] / ref_ppl["ppl"] - 1.0, agree["tokens"], agree["identical"],
                                     run.decode_tps, run.prefill_tps, seconds, note))
    say(1.0, "done")
    return report


def _produce(folder: Path, out: Path, fmt: str, *, threads: int, overwrite: bool, progress: Progress,
             base: float, span: float) -> None:
    """Write format *fmt* of the model in *folder* to *out*; progress moves from *base* over *span*."""
    if fmt in TORCH_FORMATS:
        import tempfile

        from modules.llm.loader import load_llm
        from modules.quantize.torch_weights import quantize_model, save_quantized_folder
        llm = load_llm(folder)
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            if folder.is_file():          # a GGUF: its tokenizer as Hugging Face files, for the new folder
                from modules.quantize.gguf_import import gguf_tokenizer_files
                gguf_tokenizer_files(folder, tokenizer_dir)
            save_quantized_folder(quantize_model(llm.model, fmt), out, fmt,
                                  tokenizer_dir=tokenizer_dir if folder.is_file() else folder,
                                  generation_config=llm.generation_config or None, overwrite=overwrite)
        return
    from modules.quantize.gguf_export import export_model

    def stage(name: str, fraction: float) -> None:   # export_model's progress: ("writing" | "quantizing", 0..1)
        progress(base + span * (0.5 * fraction if name == "writing" else 0.5 + 0.5 * fraction), f"{fmt}: {name}")

    export_model(folder, out, fmt, overwrite=overwrite, threads=threads, progress=stage)


def _measure_gguf(path: Path, files: Any, requests: Sequence[tuple[list[int], list[int]]], prompts: list[list[int]],
                  seq_len: int,
                  threads: int, max_new_tokens: int, loads: _Loads,
                  extra_buffers: bool) -> tuple[dict, measure.GreedyRun]:
    """Perplexity through a logits-for-every-position llama.cpp context, speed and greedy tokens through the
    backend Chat uses (:class:`modules.llm.llamacpp_backend.LlamaCppLLM`)."""
    from modules.llm.llamacpp_backend import load_llamacpp
    scorer = measure.LlamaCppLogits(str(path), n_ctx=seq_len, threads=threads, extra_buffers=extra_buffers)
    try:
        ppl = measure.answer_perplexity(scorer, requests, seq_len)
    finally:
        scorer.close()
    run = loads.run(str(path), lambda: load_llamacpp(path, files, threads=threads, extra_buffers=extra_buffers),
                    lambda llm: measure.greedy_run(llm, prompts, max_new_tokens))
    return ppl, run

"""Export a Llama-architecture model as a GGUF file that llama.cpp loads: F32/F16/BF16, or quantized.

:func:`write_gguf` writes F32, F16 or BF16 with the ``gguf`` package's ``GGUFWriter``, following llama.cpp's
``convert_hf_to_gguf.py``: the ``llama.*`` hyper-parameters, the full tokenizer
(:class:`~modules.quantize.tokenizer_to_gguf.GGUFTokenizer`), tensors renamed and q/k rows re-ordered for
llama.cpp's RoPE (:mod:`modules.quantize.gguf_names`), 1-D tensors (norms, biases) always F32, and no
``output.weight`` for tied embeddings (llama.cpp reuses ``token_embd``).

:func:`export_model` exports an HF model folder to any type of :data:`~modules.quantize.gguf_types.GGUF_TYPES`.
Quantized types are made by llama.cpp's own quantizer (:mod:`modules.quantize.llama_quantize`) from a
temporary GGUF written next to the output in the checkpoint's own precision (F32, F16 or BF16, so the
quantizer starts from exactly the trained weights), which is removed afterwards. Rows that are not a whole
number of quantization blocks (k-quants need multiples of 256, the others of 32) are handled by
llama.cpp per tensor: Q4_K falls back to Q5_0, Q6_K to Q8_0, and a row that not even 32 divides (the
176-wide ``ffn_down`` of the test fixture) stays F16. Small models come out bigger than the nominal
bits per weight for this reason; the file's real figure is measured by :mod:`modules.quantize.gguf_info`.

Importance matrix: passed to llama.cpp when given (:func:`modules.quantize.imatrix.compute_imatrix` makes
one from calibration text); the types marked ``needs_imatrix`` are refused without one, before any work.

Files are written to ``<out>.partial`` and renamed when complete, so a crash or a full disk never leaves a
half file under the real name; an existing output is never replaced unless ``overwrite=True``. A disk that
fills up removes the partial and temporary files and says how many bytes were needed.

Tensors are streamed: one is read (memory-mapped from safetensors), converted and written at its offset
in the file, then dropped, so an export never holds the model twice.
"""
from __future__ import annotations

import errno
import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Callable, Iterable

import numpy as np
import torch

from modules.llm.config import LlamaConfig
from modules.quantize.errors import DiskFullError, GGUFExportError
from modules.quantize.gguf_names import PlannedTensor, permute_qk, tensor_plan
from modules.quantize.tokenizer_to_gguf import GGUFTokenizer
from modules.quantize.gguf_types import UNQUANTIZED, GGUFType, gguf_type
from modules.quantize.imatrix import ImportanceMatrix

log = logging.getLogger(__name__)

#: progress(stage, fraction): stage is "writing" or "quantizing", fraction 0..1. It may raise to cancel;
#: the partial files are then removed (llama.cpp's quantizer cannot be interrupted: a cancel there takes
#: effect when it returns).
Progress = Callable[[str, float], None]
#: how often the quantizer's output file is looked at for progress
_POLL_SECONDS = 0.25
_BYTES_PER_ELEMENT = {"F32": 4, "F16": 2, "BF16": 2}


# ------------------------------------------------------------------------------------------ checks
def check_llama_cpp_support(config: LlamaConfig, tokenizer: GGUFTokenizer | None = None) -> None:
    """Raise GGUFExportError when llama.cpp's ``llama`` architecture cannot run this model as Atelier does."""
    problems = []
    if config.rope_scaling is not None and config.rope_scaling.get("type") != "linear":
        problems.append(f"rope_scaling {config.rope_scaling['type']!r}: llama.cpp implements linear RoPE scaling "
                        "(and YaRN) but not dynamic NTK scaling, so the GGUF would compute different positions")
    if config.head_dim % 2:
        problems.append(f"head_dim {config.head_dim} is odd; RoPE needs an even head size")
    if tokenizer is not None and tokenizer.vocab_size != config.vocab_size:
        problems.append(f"the tokenizer has {tokenizer.vocab_size} tokens but the model has {config.vocab_size} "
                        "embedding rows; llama.cpp needs one token per row")
    if problems:
        raise GGUFExportError("Cannot export this model to GGUF:\n  - " + "\n  - ".join(problems))


def partial_path(out_path: Path) -> Path:
    """Where a file is written until it is complete."""
    return out_path.with_name(out_path.name + ".partial")


def _check_target(out_path: Path, overwrite: bool) -> None:
    if out_path.exists() and not overwrite:
        raise GGUFExportError(f"{out_path} already exists; choose another output file, delete it, or pass "
                              "overwrite=True (--overwrite) to replace it")
    if out_path.is_dir():
        raise GGUFExportError(f"{out_path} is a folder; give a file name ending in .gguf")
    if not out_path.parent.is_dir():
        raise GGUFExportError(f"the output folder {out_path.parent} does not exist; create it first")


def _check_imatrix(kind: GGUFType, imatrix: ImportanceMatrix | None) -> None:
    if kind.needs_imatrix and imatrix is None:
        raise GGUFExportError(f"{kind.name} needs an importance matrix: llama.cpp refuses to make it without one "
                              "(the model would break). Give calibration text (--imatrix-text FILE) to compute one, "
                              "or choose a type that does not need it, e.g. Q2_K, Q3_K_S or IQ3_S.")
    if imatrix is not None and not kind.written_by_llama_cpp:
        raise GGUFExportError(f"an importance matrix only applies to quantized types, not {kind.name}")


def _check_free_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise DiskFullError(_disk_full_message(folder, needed, free), needed)


def _disk_full_message(folder: Path, needed: int, free: int | None = None) -> str:
    if free is None:
        free = shutil.disk_usage(folder).free
    return (f"The disk holding {folder} is full: the export needs about {needed:,} bytes ({needed / 2**20:.1f} MiB) "
            f"and {free:,} bytes ({free / 2**20:.1f} MiB) are free. No partial file was left behind; free some "
            "space or choose an output on another disk, then export again.")


def _remove(*paths: Path) -> None:
    for path in paths:
        try:
            path.unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:          # never hide the error that brought us here behind this one
            log.warning("Could not remove %s (%s); delete it by hand", path, exc)


# ---------------------------------------------------------------------------- F32 / F16 / BF16 writing
class _TensorData:
    """The tensor-data region of an open GGUF file; tensors are written at their planned offsets.

    Offsets are fixed by the header, so tensors may arrive in any order (safetensors files are sorted by
    name, not in llama.cpp's order).
    """

    def __init__(self, fp, start: int):
        self.fp = fp
        self.start = start

    def write_at(self, offset: int, array: np.ndarray) -> None:
        self.fp.seek(self.start + offset)
        self.fp.write(memoryview(np.ascontiguousarray(array).reshape(-1).view(np.uint8)))


def _ggml_type(entry: PlannedTensor, out_type: str) -> str:
    return "F32" if len(entry.shape) == 1 else out_type       # norms and biases stay F32, as in llama.cpp


def _to_array(tensor: torch.Tensor, ggml_type: str, name: str) -> np.ndarray:
    t = tensor.detach().to("cpu")
    if ggml_type == "F32":
        return t.to(torch.float32).contiguous().numpy()
    if ggml_type == "F16":
        half = t.to(torch.float16)
        if not bool(torch.isfinite(half).all()) and bool(torch.isfinite(t).all()):
            raise GGUFExportError(f"{name} has values outside float16's range (|x| > 65504); export BF16 or F32")
        return half.contiguous().numpy()
    if ggml_type == "BF16":
        return t.to(torch.bfloat16).contiguous().view(torch.int16).numpy()
    raise GGUFExportError(f"internal: no conversion to {ggml_type}")


def _add_metadata(writer, config: LlamaConfig, kind: GGUFType, name: str) -> None:
    """``general.*`` and ``llama.*`` keys as llama.cpp's converter writes them for a Llama model."""
    from gguf import RopeScalingType
    from gguf.utility import size_label

    writer.add_type("model")
    writer.add_name(name)
    writer.add_size_label(size_label(config.num_parameters(), 0, 0, 0))
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_freq_base(float(config.rope_theta))
    writer.add_layer_norm_rms_eps(float(config.rms_norm_eps))
    writer.add_file_type(kind.ftype)
    writer.add_vocab_size(config.vocab_size)
    writer.add_rope_dimension_count(config.head_dim)
    if config.head_dim != config.hidden_size // config.num_attention_heads:
        writer.add_key_length(config.head_dim)       # llama.cpp assumes hidden_size / heads otherwise
        writer.add_value_length(config.head_dim)
    if config.rope_scaling is not None:
        writer.add_rope_scaling_type(RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(float(config.rope_scaling["factor"]))


def write_gguf(config: LlamaConfig, tensors: Iterable[tuple[str, torch.Tensor]], tokenizer: GGUFTokenizer,
               out_path: str | Path, out_type: str = "F32", *, name: str, progress: Progress | None = None,
               overwrite: bool = False) -> Path:
    """Write an F32/F16/BF16 llama.cpp GGUF of *config*'s model; returns the path written.

    tensors: (HF state-dict name, tensor) pairs, e.g. ``model.layers.0.self_attn.q_proj.weight``, in any
    order, each read once (a generator streams them); a tied ``lm_head.weight`` is skipped. name:
    ``general.name``. overwrite: replace an existing *out_path* (otherwise GGUFExportError).
    """
    from gguf import GGML_QUANT_VERSION, GGMLQuantizationType, GGUFWriter

    # 1. Check inputs
    out_path = Path(out_path)
    kind = gguf_type(out_type)
    if kind.name not in UNQUANTIZED:
        raise GGUFExportError(f"write_gguf writes {'/'.join(UNQUANTIZED)}; {kind.name} is made by llama.cpp's "
                              "quantizer: use export_model or export_tensors")
    check_llama_cpp_support(config, tokenizer)
    _check_target(out_path, overwrite)

    # 2. Plan the file: every tensor's GGUF name, type, size and offset
    plan = {entry.hf_name: entry for entry in tensor_plan(config)}
    types = {hf: _ggml_type(entry, kind.name) for hf, entry in plan.items()}
    nbytes = {hf: entry.numel * _BYTES_PER_ELEMENT[types[hf]] for hf, entry in plan.items()}
    writer = GGUFWriter(None, "llama")
    _add_metadata(writer, config, kind, name)
    tokenizer.add_to_writer(writer)
    writer.add_quantization_version(GGML_QUANT_VERSION)
    offsets, position = {}, 0
    for hf, entry in plan.items():
        dtype = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}[types[hf]]
        writer.add_tensor_info(entry.gguf_name, entry.shape, np.dtype(dtype), nbytes[hf],
                               raw_dtype=GGMLQuantizationType[types[hf]])
        offsets[hf] = position
        position += GGUFWriter.ggml_pad(nbytes[hf], writer.data_alignment)
    data_bytes = position
    needed = data_bytes + 64 * len(plan) + sum(len(t) + 16 for t in tokenizer.tokens) + 4096   # header estimate
    _check_free_space(out_path.parent, needed)

    # 3. Write the header, then each tensor at its offset, to <out>.partial
    partial = partial_path(out_path)
    written: set[str] = set()
    try:
        writer.write_header_to_file(partial)
        writer.write_kv_data_to_file()
        writer.write_ti_data_to_file()
        fp = writer.fout[0]
        start = GGUFWriter.ggml_pad(fp.tell(), writer.data_alignment)
        needed = start + data_bytes
        data = _TensorData(fp, start)
        done = 0
        for hf, tensor in tensors:
            if hf.endswith("rotary_emb.inv_freq") or (hf == "lm_head.weight" and config.tie_word_embeddings):
                continue
            entry = plan.get(hf)
            if entry is None:
                raise GGUFExportError(f"tensor {hf} has no place in a llama.cpp llama GGUF (is this a Llama model "
                                      "with the config's attention_bias / mlp_bias?)")
            if hf in written:
                raise GGUFExportError(f"tensor {hf} was given twice")
            if tuple(tensor.shape) != entry.shape:
                raise GGUFExportError(f"tensor {hf} has shape {list(tensor.shape)}; "
                                      f"the config implies {list(entry.shape)}")
            if entry.permute_heads is not None:
                tensor = permute_qk(tensor, entry.permute_heads)
            data.write_at(offsets[hf], _to_array(tensor, types[hf], hf))
            del tensor
            written.add(hf)
            done += nbytes[hf]
            if progress is not None:
                progress("writing", done / max(data_bytes, 1))
        missing = [hf for hf in plan if hf not in written]
        if missing:
            raise GGUFExportError(f"{len(missing)} tensor(s) were not given: {', '.join(missing[:8])}"
                                  + (" ..." if len(missing) > 8 else ""))
        fp.truncate(start + data_bytes)                       # the zero padding after the last tensor
        fp.flush()
        os.fsync(fp.fileno())
        writer.close()
        os.replace(partial, out_path)
    except OSError as exc:
        writer.close()
        _remove(partial)
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(_disk_full_message(out_path.parent, needed), needed) from None
        raise GGUFExportError(f"Cannot write {out_path}: {exc.strerror or exc}; check the folder's permissions "
                              "and free space") from None
    except BaseException:
        writer.close()
        _remove(partial)
        raise
    log.info("Wrote %s (%s, %.1f MiB)", out_path, kind.name, out_path.stat().st_size / 2**20)
    return out_path


# ------------------------------------------------------------------------------------ whole models
def export_model(source: str | Path, out_path: str | Path, out_type: str, *, overwrite: bool = False,
                 imatrix: ImportanceMatrix | None = None, threads: int = 0, progress: Progress | None = None,
                 allow_unsafe_pickle: bool = False) -> Path:
    """Export the HF Llama folder *source* as a GGUF of type *out_type* (a :data:`GGUF_TYPES` name) at *out_path*.

    imatrix: an :class:`~modules.quantize.imatrix.ImportanceMatrix` for llama.cpp's quantizer (required by the
    ``needs_imatrix`` types). threads: quantizer threads (0: all). allow_unsafe_pickle: accept
    ``pytorch_model.bin`` weights (``--allow-unsafe-pickle``). Every check runs before anything is written.
    """
    # 1. Check inputs
    kind = gguf_type(out_type)
    folder = Path(source).expanduser()
    out_path = Path(out_path).expanduser()
    if folder.is_file() and folder.suffix.lower() == ".gguf":
        return _export_gguf(folder, out_path, kind, overwrite=overwrite, imatrix=imatrix, threads=threads,
                            progress=progress)
    if not (folder / "config.json").is_file():
        raise GGUFExportError(f"{folder} is not a model folder (no config.json); give a Hugging Face Llama folder, "
                              "e.g. models/LLM/<name>")
    try:
        config = LlamaConfig.from_json_file(folder / "config.json")
    except ValueError as exc:
        raise GGUFExportError(f"{folder} is not a Llama-architecture model Atelier can export:\n{exc}") from None
    _check_target(out_path, overwrite)
    _check_imatrix(kind, imatrix)
    if kind.written_by_llama_cpp:
        from modules.quantize.llama_quantize import llama_cpp_module
        llama_cpp_module()                                   # fail now, not after writing gigabytes
    tokenizer = GGUFTokenizer.from_hf_folder(folder, vocab_size=config.vocab_size)
    check_llama_cpp_support(config, tokenizer)
    reader, wanted, source_type = _open_weights(folder, config, allow_unsafe_pickle)

    # 2. Write: one pass for F32/F16/BF16; through a temporary file and llama.cpp's quantizer otherwise
    return export_tensors(config, reader.tensors(wanted), tokenizer, out_path, kind.name, name=folder.name,
                          source_type=source_type, overwrite=overwrite, imatrix=imatrix, threads=threads,
                          progress=progress)


def _export_gguf(path: Path, out_path: Path, kind: GGUFType, *, overwrite: bool, imatrix: ImportanceMatrix | None,
                 threads: int, progress: Progress | None) -> Path:
    """Re-export a GGUF (another type of the same model): its weights dequantized to float32 by
    :func:`~modules.quantize.gguf_import.gguf_state_dict`, its tokenizer fields copied verbatim."""
    from modules.quantize.gguf_import import GGUFImportError, gguf_config, gguf_state_dict
    if out_path.resolve() == path.resolve():
        raise GGUFExportError(f"{out_path} is the source file itself; write the re-export elsewhere")
    try:
        config = gguf_config(path)
    except GGUFImportError as exc:
        raise GGUFExportError(f"{path.name} cannot be re-exported: {exc}") from None
    _check_target(out_path, overwrite)
    _check_imatrix(kind, imatrix)
    tokenizer = GGUFTokenizer.from_gguf(path)
    check_llama_cpp_support(config, tokenizer)
    state = gguf_state_dict(path, dtype=torch.float32)
    name = path.name[:-len(".gguf")]
    return export_tensors(config, state.items(), tokenizer, out_path, kind.name, name=name, source_type="F32",
                          overwrite=overwrite, imatrix=imatrix, threads=threads, progress=progress)


def export_tensors(config: LlamaConfig, tensors: Iterable[tuple[str, torch.Tensor]], tokenizer: GGUFTokenizer,
                   out_path: str | Path, out_type: str, *, name: str, source_type: str = "F32",
                   overwrite: bool = False, imatrix: ImportanceMatrix | None = None, threads: int = 0,
                   progress: Progress | None = None) -> Path:
    """Write any :data:`GGUF_TYPES` type from (HF name, tensor) pairs: what :func:`export_model` does for a
    folder, for models that are not one (a GGUF imported into Atelier's model, re-exported with
    ``GGUFTokenizer.from_gguf``'s tokenizer).

    source_type: F32/F16/BF16 precision of the temporary file a quantized type is made from (pick the
    tensors' own, so nothing is rounded twice).
    """
    kind = gguf_type(out_type)
    out_path = Path(out_path)
    _check_imatrix(kind, imatrix)
    if not kind.written_by_llama_cpp:
        return write_gguf(config, tensors, tokenizer, out_path, kind.name, name=name, progress=progress,
                          overwrite=overwrite)
    if source_type not in UNQUANTIZED:
        raise GGUFExportError(f"source_type must be one of {', '.join(UNQUANTIZED)}, got {source_type!r}")
    _check_target(out_path, overwrite)
    temp = out_path.with_name(f"{out_path.name}.{source_type}.tmp")
    partial = partial_path(out_path)
    temp_bytes = sum(e.numel * (4 if len(e.shape) == 1 else _BYTES_PER_ELEMENT[source_type])
                     for e in tensor_plan(config))
    final_bytes = estimated_bytes(config, kind)
    needed = temp_bytes + final_bytes
    _check_free_space(out_path.parent, needed)
    try:
        write_gguf(config, tensors, tokenizer, temp, source_type, name=name, progress=progress, overwrite=True)
        _quantize_with_progress(temp, partial, kind, threads=threads, imatrix=imatrix, progress=progress,
                                expected_bytes=final_bytes)
        os.replace(partial, out_path)
    except DiskFullError:          # the message counts the temporary file and the output together
        raise DiskFullError(_disk_full_message(out_path.parent, needed), needed) from None
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            raise DiskFullError(_disk_full_message(out_path.parent, needed), needed) from None
        raise GGUFExportError(f"Cannot write {out_path}: {exc.strerror or exc}") from None
    finally:
        _remove(temp, partial)
    log.info("Exported %s as %s: %s (%.1f MiB)", name, kind.name, out_path, out_path.stat().st_size / 2**20)
    return out_path


def estimated_bytes(config: LlamaConfig, kind: GGUFType) -> int:
    """Roughly the size of the tensors of a *kind* file: the main type's bits for matrices, F32 for 1-D tensors."""
    return int(sum(e.numel * (32 if len(e.shape) == 1 else kind.nominal_bits) / 8 for e in tensor_plan(config)))


def _open_weights(folder: Path, config: LlamaConfig, allow_unsafe_pickle: bool):
    """The checkpoint reader (keys and shapes checked), the names to read, and the precision to keep."""
    # The reader is checkpoint.py's own: the same files, key checks and memory-mapped, one-at-a-time reads
    # that load_model uses, without building the model.
    from modules.llm.checkpoint import (CheckpointError, CheckpointReader, check_keys_and_shapes, expected_shapes,
                                        weight_files)
    from modules.llm.model import Llama

    try:
        files = weight_files(folder, allow_unsafe_pickle)
        reader = CheckpointReader(files)
        with torch.device("meta"):
            expected = expected_shapes(Llama(config))
        check_keys_and_shapes(expected, reader.shapes(), config, folder)
    except CheckpointError as exc:
        raise GGUFExportError(str(exc)) from None
    return reader, set(expected), _source_type(reader)


def _source_type(reader) -> str:
    """F32, F16 or BF16: the precision of the checkpoint's embedding, kept exactly in the temporary file."""
    from modules.safetensors_header import read_header

    path = reader.location.get("model.embed_tokens.weight")
    if path is None or path.suffix != ".safetensors":
        return "F32"
    dtype = read_header(path).tensors["model.embed_tokens.weight"].dtype
    return dtype if dtype in ("F16", "BF16") else "F32"


def _quantize_with_progress(src: Path, dst: Path, kind: GGUFType, *, threads: int, imatrix: ImportanceMatrix | None,
                            progress: Progress | None, expected_bytes: int) -> None:
    """Run llama.cpp's quantizer in a thread; report progress from the size of the file it writes."""
    from modules.quantize.llama_quantize import quantize_gguf

    values = imatrix.values if imatrix is not None else None
    failure: list[BaseException] = []

    def work() -> None:
        try:
            quantize_gguf(src, dst, kind.ftype, threads=threads, imatrix=values)
        except BaseException as exc:   # handed to the caller's thread
            failure.append(exc)

    worker = threading.Thread(target=work, name="gguf-quantize", daemon=True)
    worker.start()
    cancelled: BaseException | None = None
    while worker.is_alive():
        try:
            worker.join(_POLL_SECONDS)
            if progress is not None and cancelled is None:
                size = dst.stat().st_size if dst.exists() else 0
                progress("quantizing", min(size / max(expected_bytes, 1), 0.99))
        except BaseException as exc:   # a cancel from progress, or Ctrl-C: llama.cpp cannot be stopped,
            if cancelled is None:      # so let it finish its file, then the caller removes it
                cancelled = exc
                log.info("Cancelled: waiting for llama.cpp's quantizer to finish, then removing its files")
    if cancelled is not None:
        raise cancelled
    if failure:
        exc = failure[0]
        free = shutil.disk_usage(dst.parent).free
        if isinstance(exc, GGUFExportError) and free < expected_bytes:
            raise DiskFullError(_disk_full_message(dst.parent, expected_bytes, free), expected_bytes) from None
        raise exc
    if progress is not None:
        progress("quantizing", 1.0)

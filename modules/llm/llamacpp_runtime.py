"""llama.cpp's forward pass through llama-cpp-python's C API: a model, a context, ``eval(ids)`` -> logits.

Why the C API and not ``llama_cpp.Llama``: ``Llama`` loads every model with llama.cpp's *extra buffer
types* on (AMX tiles, repacked Q4_0/Q4_K layouts) and offers no switch. On a CPU that reports AMX inside a
VM that does not grant it (the dev machine: a Sapphire Rapids guest), decoding any quantized file then
dies with SIGSEGV in the AMX kernels, taking the whole server with it. Here ``use_extra_bufts`` is a
parameter, and :func:`extra_buffers_work` decides it once per process by loading a tiny quantized model
in a child process first: where that child crashes, models load with plain CPU buffers (the reference
kernels: the same numbers, slower 4-bit decode), and the log says so.

Atelier needs only the forward pass from llama.cpp (prompt, sampling and detokenization stay Atelier's,
see :mod:`modules.llm.llamacpp_backend`), so this is small: load, evaluate a chunk of tokens at given
positions, read the last (or every) position's logits, and cut the KV cache back to a prefix.
"""
from __future__ import annotations

import logging
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

import numpy as np

log = logging.getLogger(__name__)


class LlamaCppUnavailable(RuntimeError):
    """llama-cpp-python is not installed or its library does not load; the message says how to fix it."""


def llama_cpp_module() -> Any:
    """The imported ``llama_cpp`` package, or LlamaCppUnavailable saying how to install it."""
    try:
        import llama_cpp
    except (ImportError, OSError) as exc:
        raise LlamaCppUnavailable(
            f"llama-cpp-python is not available ({type(exc).__name__}: {exc}). It is in requirements.txt: run "
            "`python launch.py` once to install it (it compiles llama.cpp, about 5-8 minutes), or choose the "
            "'atelier' GGUF backend in Settings to run GGUF files on Atelier's own engine.") from None
    return llama_cpp


def cpu_has_amx() -> bool:
    """True when the CPU advertises AMX (the extra buffer type that can crash inside VMs)."""
    try:
        return "amx_int8" in Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
    except OSError:
        return False


_PROBE = r"""
import sys, tempfile, os, numpy as np, gguf
from gguf.quants import quantize
d, ff, v = 64, 128, 300
rng = np.random.default_rng(0)
path = os.path.join(tempfile.mkdtemp(), "probe.gguf")
w = gguf.GGUFWriter(path, "llama")
for name, value in (("context_length", 32), ("embedding_length", d), ("block_count", 1), ("feed_forward_length", ff),
                    ("head_count", 2), ("head_count_kv", 1)):
    getattr(w, "add_" + name)(value)
w.add_rope_dimension_count(d // 2); w.add_layer_norm_rms_eps(1e-5); w.add_file_type(7)
tokens = [b"<unk>", b"<s>", b"</s>"] + [("<0x%02X>" % i).encode() for i in range(256)]
tokens += [("\u2581t%d" % i).encode() for i in range(v - len(tokens))]
w.add_tokenizer_model("llama"); w.add_token_list(tokens); w.add_token_scores([0.0] * v)
w.add_token_types([2, 3, 3] + [6] * 256 + [1] * (v - 259))
def q8(name, shape):
    a = (rng.standard_normal(shape) * 0.02).astype(np.float32)
    w.add_tensor(name, quantize(a, gguf.GGMLQuantizationType.Q8_0), raw_dtype=gguf.GGMLQuantizationType.Q8_0)
w.add_tensor("token_embd.weight", (rng.standard_normal((v, d)) * 0.02).astype(np.float32))
for n in ("attn_norm", "ffn_norm"):
    w.add_tensor(f"blk.0.{n}.weight", np.ones(d, np.float32))
q8("blk.0.attn_q.weight", (d, d)); q8("blk.0.attn_k.weight", (d // 2, d)); q8("blk.0.attn_v.weight", (d // 2, d))
q8("blk.0.attn_output.weight", (d, d)); q8("blk.0.ffn_gate.weight", (ff, d)); q8("blk.0.ffn_up.weight", (ff, d))
q8("blk.0.ffn_down.weight", (d, ff)); w.add_tensor("output_norm.weight", np.ones(d, np.float32))
q8("output.weight", (v, d))
w.write_header_to_file(); w.write_kv_data_to_file(); w.write_tensors_to_file(); w.close()
sys.path.insert(0, sys.argv[1])
from modules.llm.llamacpp_runtime import LlamaCppContext, LlamaCppModel
model = LlamaCppModel(path, extra_buffers=True)
ctx = LlamaCppContext(model, n_ctx=32, threads=1)
ctx.eval([1, 300 - 1, 280, 270])
ctx.eval([5])
print("ok")
"""


def extra_buffers_work(timeout: float = 120.0) -> bool:
    """Whether llama.cpp's extra buffer types (AMX, repacked weights) run on this machine.

    Only a CPU with AMX needs the check; it loads and runs a tiny Q8_0 model with them in a child process
    (about a second), so a crash there costs nothing but the answer False.
    """
    if not cpu_has_amx():
        return True
    repo = str(Path(__file__).resolve().parent.parent.parent)
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE, repo], capture_output=True, text=True, timeout=timeout)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log.warning("llama.cpp buffer probe did not finish (%s); using plain CPU buffers", exc)
        return False
    works = done.returncode == 0 and done.stdout.strip().endswith("ok")
    if not works:
        log.warning("llama.cpp's AMX / repacked weight buffers crash on this machine (probe exit code %s: a VM that "
                    "does not grant AMX tiles?); GGUF models load with plain CPU buffers: the same results, slower "
                    "4-bit decoding", done.returncode)
    return works


class LlamaCppModel:
    """The weights of one GGUF file in llama.cpp (memory-mapped)."""

    def __init__(self, path: str | Path, *, extra_buffers: bool):
        lib = llama_cpp_module()
        self.lib = lib
        self.path = Path(path)
        quiet = logging.getLogger("llama-cpp-python")     # llama.cpp's own log goes through this logger; unless
        if quiet.level == logging.NOTSET:                  # someone chose a level, only its errors are printed
            quiet.setLevel(logging.ERROR)
        lib.llama_backend_init()
        params = lib.llama_model_default_params()
        params.use_extra_bufts = bool(extra_buffers)
        params.use_mmap = True
        self.model = lib.llama_model_load_from_file(str(self.path).encode("utf-8"), params)
        if not self.model:
            raise ValueError(f"llama.cpp could not load {self.path.name}: it is not a complete GGUF file, or it uses "
                             "an architecture or quantization type this llama.cpp build does not know (its log, "
                             "with --loglevel DEBUG, names which)")
        self.vocab = lib.llama_model_get_vocab(self.model)
        self.n_vocab = int(lib.llama_vocab_n_tokens(self.vocab))

    def tokenize(self, text: str, *, add_special: bool = False, parse_special: bool = True) -> list[int]:
        """llama.cpp's own tokenization (for checks; Atelier tokenizes prompts itself)."""
        data = text.encode("utf-8")
        buf = (self.lib.llama_token * (len(data) + 8))()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, len(buf), add_special, parse_special)
        if n < 0:
            raise ValueError(f"llama_tokenize needs {-n} slots")
        return list(buf[:n])

    def close(self) -> None:
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass


class LlamaCppContext:
    """One sequence's KV cache over a :class:`LlamaCppModel`; ``eval`` appends tokens and returns logits."""

    def __init__(self, model: LlamaCppModel, *, n_ctx: int, threads: int, n_batch: int = 512):
        lib = self.lib = model.lib
        self.model = model
        self.n_ctx, self.n_batch = int(n_ctx), int(min(n_batch, n_ctx))
        params = lib.llama_context_default_params()
        params.n_ctx = self.n_ctx
        params.n_batch = params.n_ubatch = self.n_batch
        params.n_threads = params.n_threads_batch = max(1, int(threads))
        params.n_seq_max = 1
        self.ctx = lib.llama_init_from_model(model.model, params)
        if not self.ctx:
            raise ValueError(f"llama.cpp could not create a context of {n_ctx} tokens for {model.path.name} "
                             "(out of memory?)")
        self.memory = lib.llama_get_memory(self.ctx)
        self.batch = lib.llama_batch_init(self.n_batch, 0, 1)
        self.n_past = 0

    def eval(self, ids: Sequence[int], *, all_logits: bool = False) -> np.ndarray:
        """Append *ids* at positions n_past.. and return the logits: [V] for the last token, or [len(ids), V]."""
        if not ids:
            raise ValueError("eval needs at least one token")
        if self.n_past + len(ids) > self.n_ctx:
            raise ValueError(f"{self.n_past} cached + {len(ids)} new tokens exceed the context of {self.n_ctx}")
        lib, batch, n_vocab = self.lib, self.batch, self.model.n_vocab
        rows = []
        for start in range(0, len(ids), self.n_batch):
            chunk = ids[start:start + self.n_batch]
            last_chunk = start + self.n_batch >= len(ids)
            batch.n_tokens = len(chunk)
            for i, token in enumerate(chunk):
                batch.token[i] = int(token)
                batch.pos[i] = self.n_past + i
                batch.n_seq_id[i] = 1
                batch.seq_id[i][0] = 0
                batch.logits[i] = all_logits or (last_chunk and i == len(chunk) - 1)
            code = lib.llama_decode(self.ctx, batch)
            if code != 0:
                raise RuntimeError(f"llama_decode returned {code} (KV cache full or the batch was refused)")
            self.n_past += len(chunk)
            if all_logits:
                pointer = lib.llama_get_logits(self.ctx)
                rows.append(np.ctypeslib.as_array(pointer, shape=(len(chunk), n_vocab)).copy())
        if all_logits:
            return np.concatenate(rows)
        return np.ctypeslib.as_array(lib.llama_get_logits_ith(self.ctx, -1), shape=(n_vocab,)).copy()

    def truncate(self, n: int) -> None:
        """Forget every cached position from *n* on (keep the first *n* tokens)."""
        if n < self.n_past:
            self.lib.llama_memory_seq_rm(self.memory, 0, n, -1)
            self.n_past = n

    def clear(self) -> None:
        self.lib.llama_memory_clear(self.memory, True)
        self.n_past = 0

    def close(self) -> None:
        if self.ctx:
            self.lib.llama_batch_free(self.batch)
            self.lib.llama_free(self.ctx)
            self.ctx = None

    def __del__(self):
        try:
            self.close()
        except Exception:  # noqa: BLE001 - interpreter shutdown
            pass

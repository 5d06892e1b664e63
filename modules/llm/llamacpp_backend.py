"""Serve a GGUF file through llama.cpp (llama-cpp-python) behind the engine's usual interface.

Why a second backend: llama.cpp's quantized CPU kernels are what laptop users run GGUF files with (the
1.1B shape decodes at ~33 tok/s in Q4_0 against ~9 in F32 on the 2-core dev machine), and what users
download from the Hub is GGUF. Atelier's own engine can load a GGUF too (dequantized), but only
llama.cpp runs the K-quants at their own speed.

What Atelier keeps for itself, so that a reply is the same whichever backend produces it:

* the prompt: rendered by Atelier's Jinja chat template and tokenized by Atelier's tokenizer, then given
  to llama.cpp as token ids (never llama.cpp's own template heuristic, which classifies TinyLlama's
  template as another format and drops its ``</s>``);
* sampling: :func:`modules.llm.sampling.sample_next` on llama.cpp's logits, so temperature, top-k/p,
  min-p, penalties and seeds mean exactly what they mean for the native engine;
* streaming, stop strings, token counts, finish reasons and timings: the engine's own row logic
  (:class:`modules.llm.engine._Row`).

llama.cpp does only the forward pass (``eval(tokens)`` -> logits, through
:mod:`modules.llm.llamacpp_runtime`, which also says why not ``llama_cpp.Llama``). One context holds one
sequence, so requests for a model run one after another on the device queue; the KV cache keeps the
longest common prefix with the previous request (as llama-cpp-python's own ``generate`` does), so a chat
that grows turn by turn is not prefilled again from the start. The object is loaded, leased and evicted
by the shared model manager like every other model; its thread count is the device setting's.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modules.jobs import Job
from modules.llm.engine import (GenerationRequest, GenerationResult, LLMEngine, Sink, _Row, check_request,
                                context_length, eos_token_ids)
from modules.llm.llamacpp_runtime import LlamaCppContext, LlamaCppModel, LlamaCppUnavailable, llama_cpp_module
from modules.llm.sampling import sample_next

log = logging.getLogger(__name__)

BACKEND = "llama.cpp"


def llama_cpp_report() -> str:
    """llama-cpp-python's version and the CPU features its llama.cpp build uses (for the diagnostics)."""
    try:
        llama_cpp = llama_cpp_module()
    except LlamaCppUnavailable as exc:
        return f"not available: {exc}"
    info = llama_cpp.llama_print_system_info()
    info = info.decode("utf-8", "replace") if isinstance(info, bytes) else str(info)
    info = info.split(":", 1)[1] if info.startswith("CPU :") else info     # "CPU : SSE3 = 1 | AVX = 1 | ..."
    features = [part.split("=")[0].strip() for part in info.split("|") if part.strip().endswith("= 1")]
    return f"llama-cpp-python {llama_cpp.__version__}; CPU features: {', '.join(features) or info.strip()}"


@dataclass
class LlamaCppLLM:
    """A GGUF model loaded in llama.cpp, with Atelier's tokenizer, template and config for the same file.

    Quacks like :class:`modules.llm.loader.LoadedLLM` where the service, the engine's row logic and the
    model manager look (``config``, ``tokenizer``, ``template``, ``generation_config``, ``device``,
    ``memory_bytes``), without a torch model.
    """
    name: str
    path: Path
    config: Any
    tokenizer: Any
    template: Any
    weights: LlamaCppModel
    context: LlamaCppContext
    threads: int
    extra_buffers: bool
    generation_config: dict[str, Any] = field(default_factory=dict)
    backend: str = BACKEND
    #: the tokens whose keys and values are in llama.cpp's cache, in order (prefix reuse across requests)
    cached: list[int] = field(default_factory=list)

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    @property
    def dtype(self) -> torch.dtype:
        return torch.float32

    @property
    def n_ctx(self) -> int:
        return self.context.n_ctx

    @property
    def context_length(self) -> int:
        return self.n_ctx

    def memory_bytes(self) -> int:
        """The weights (the file is memory-mapped and read whole) plus the f16 KV cache for the context."""
        cfg = self.config
        kv = 2 * cfg.num_hidden_layers * self.n_ctx * cfg.num_key_value_heads * cfg.head_dim * 2
        return int(self.path.stat().st_size) + kv

    def to(self, device: Any) -> "LlamaCppLLM":
        """The model manager parks idle models with ``to("cpu")``; llama.cpp models live on the CPU already."""
        return self

    def close(self) -> None:
        self.context.close()
        self.weights.close()

    # -- the forward pass ------------------------------------------------------------------------------------
    def prefill(self, ids: list[int]) -> torch.Tensor:
        """Feed the prompt (reusing the cached common prefix); return the next-token logits [V]."""
        common = 0
        limit = min(len(ids) - 1, len(self.cached))       # the last prompt token is always evaluated for its logits
        while common < limit and self.cached[common] == ids[common]:
            common += 1
        self.context.truncate(common)
        self.cached = self.cached[:common]
        return self._eval(ids[common:])

    def step(self, token: int) -> torch.Tensor:
        """Feed one sampled token; return the next-token logits [V]."""
        return self._eval([token])

    def _eval(self, ids: list[int]) -> torch.Tensor:
        try:
            logits = self.context.eval(ids)
        except BaseException:   # the cache now holds an unknown part of *ids*: start the next request afresh
            self.reset()
            raise
        self.cached.extend(ids)
        return torch.from_numpy(logits)

    def reset(self) -> None:
        self.context.clear()
        self.cached = []


def load_llamacpp(path: str | Path, files: Any, *, threads: int, extra_buffers: bool = False,
                  n_ctx: int | None = None) -> LlamaCppLLM:
    """Open the GGUF at *path* in llama.cpp. *files* are its :class:`~modules.llm.loader.LLMFiles` (Atelier's
    tokenizer, template and config for the same file). *extra_buffers*: llama.cpp's AMX / repacked weight
    buffers, only where :func:`~modules.llm.llamacpp_runtime.extra_buffers_work` said they run. Raises
    ValueError when llama.cpp refuses the file."""
    path = Path(path)
    n_ctx = int(n_ctx or files.config.max_position_embeddings)
    threads = max(1, int(threads))
    started = time.perf_counter()
    weights = LlamaCppModel(path, extra_buffers=extra_buffers)
    if weights.n_vocab != files.config.vocab_size:
        weights.close()
        raise ValueError(f"{path.name}: llama.cpp reads {weights.n_vocab} tokens but the file's metadata says "
                         f"{files.config.vocab_size}; the file is inconsistent")
    context = LlamaCppContext(weights, n_ctx=n_ctx, threads=threads)
    log.info("Loaded %s in llama.cpp (%d threads, context %d, %s buffers) in %.1f s", path.name, threads, n_ctx,
             "extra" if extra_buffers else "plain CPU", time.perf_counter() - started)
    return LlamaCppLLM(name=files.name, path=path, config=files.config, tokenizer=files.tokenizer,
                       template=files.template, weights=weights, context=context, threads=threads,
                       extra_buffers=extra_buffers, generation_config=dict(files.generation_config or {}))


@torch.inference_mode()
def generate_llamacpp(llm: LlamaCppLLM, request: GenerationRequest, sink: Sink) -> GenerationResult:
    """One request on llama.cpp with Atelier's sampling, stop strings and streaming (see module docstring)."""
    from modules.llm.tokenizer import StreamDecoder
    ctx_len = context_length(llm)
    check_request(request, ctx_len)
    row = _Row(llm, request, sink, ctx_len, eos_token_ids(llm), StreamDecoder)
    logits = llm.prefill(list(request.prompt_ids))
    row.prefilled_at = time.perf_counter()
    while True:
        if sink.interrupted:
            row.interrupt()
            break
        row.accept(sample_next(logits[None], [row.state])[0])
        if row.finish_reason is not None:
            break
        logits = llm.step(row.tokens[-1])
    result = row.result()
    log.info("%s: %d prompt + %d new tokens in %.2f s (%.1f tokens/s, llama.cpp), finish: %s", request.label,
             result.prompt_tokens, result.completion_tokens, result.seconds, result.tokens_per_second,
             result.finish_reason)
    return result


class LlamaCppEngine(LLMEngine):
    """:class:`~modules.llm.engine.LLMEngine` for a GGUF served by llama.cpp: the same ``submit`` ->
    ``GenerationHandle`` contract; requests of one batch run one after another (batch 1)."""

    def _run_batch(self, jobs: list[Job]) -> list[GenerationResult | None]:
        lease = self._acquire()
        last: tuple[Job, GenerationResult] | None = None
        try:
            llm = lease.model
            for job in jobs:
                if last is not None:
                    last[0].finish(result=last[1])
                    last = None
                if job.interrupted:
                    job.finish(result=GenerationResult("", [], "interrupted", len(job.payload.prompt_ids), 0,
                                                       seed=job.payload.params.seed))
                    continue
                try:
                    last = (job, generate_llamacpp(llm, job.payload, job))
                except ValueError as exc:  # a bad request fails alone; the others run
                    job.finish(error=exc)
            return [None] * len(jobs)
        finally:
            # the last reply is delivered after the lease is released, so a caller that unloads the model
            # right after its reply does not find it still in use (as LLMEngine does)
            lease.release()
            if last is not None:
                last[0].finish(result=last[1])

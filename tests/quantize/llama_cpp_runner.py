"""Greedy decoding and tokenization through llama.cpp's C API, to compare GGUF exports with Atelier's model.

Why not ``llama_cpp.Llama`` for quantized files: this machine's CPU reports AMX, so llama.cpp places Q4_0,
Q8_0 and k-quant weights in its AMX buffer type, and decoding then dies with SIGSEGV inside this VM (an
F32 file, which AMX does not take, runs). ``Llama`` has no switch for it; the C API's
``llama_model_params.use_extra_bufts = False`` keeps weights in plain CPU buffers (no AMX, no repacking),
which computes the same numbers by the reference kernels.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np


class LlamaCppModel:
    """A GGUF loaded with plain CPU buffers; ``greedy(ids, n)`` and ``tokenize(text)``. Use as a context manager."""

    def __init__(self, path: str | Path, threads: int = 1):
        import llama_cpp
        self.lib = llama_cpp
        llama_cpp.llama_backend_init()
        params = llama_cpp.llama_model_default_params()
        params.use_extra_bufts = False
        self.model = llama_cpp.llama_model_load_from_file(str(path).encode(), params)
        if not self.model:
            raise RuntimeError(f"llama.cpp could not load {path}")
        self.vocab = llama_cpp.llama_model_get_vocab(self.model)
        self.n_vocab = llama_cpp.llama_vocab_n_tokens(self.vocab)
        self.threads = threads

    def __enter__(self) -> "LlamaCppModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        if self.model:
            self.lib.llama_model_free(self.model)
            self.model = None

    def tokenize(self, text: str, add_bos: bool = False, special: bool = False) -> list[int]:
        data = text.encode("utf-8")
        buf = (self.lib.llama_token * (len(data) + 8))()
        n = self.lib.llama_tokenize(self.vocab, data, len(data), buf, len(buf), add_bos, special)
        if n < 0:
            raise RuntimeError(f"llama_tokenize needs {-n} slots")
        return list(buf[:n])

    def greedy(self, ids: list[int], n_new: int, stop: int | None = None) -> list[int]:
        """The *n_new* argmax continuations of *ids* (fewer if *stop* comes out)."""
        lib = self.lib
        cparams = lib.llama_context_default_params()
        cparams.n_ctx = len(ids) + n_new + 8
        cparams.n_batch = cparams.n_ubatch = max(len(ids), 8)
        cparams.n_threads = cparams.n_threads_batch = self.threads
        ctx = lib.llama_init_from_model(self.model, cparams)
        if not ctx:
            raise RuntimeError("llama.cpp could not create a context")
        out: list[int] = []
        try:
            feed = list(ids)
            for _ in range(n_new):
                tokens = (lib.llama_token * len(feed))(*feed)
                if lib.llama_decode(ctx, lib.llama_batch_get_one(tokens, len(feed))) != 0:
                    raise RuntimeError("llama_decode failed")
                logits = np.ctypeslib.as_array(lib.llama_get_logits_ith(ctx, -1), shape=(self.n_vocab,))
                token = int(logits.argmax())
                out.append(token)
                if token == stop:
                    break
                feed = [token]
        finally:
            lib.llama_free(ctx)
        return out


def atelier_greedy(model, ids: list[int], n_new: int, stop: int | None = None) -> list[int]:
    """The same greedy continuation with Atelier's own model (fp32, with its KV cache, as its engine decodes)."""
    import torch

    cache = model.new_kv_cache(1, len(ids) + n_new)
    out: list[int] = []
    feed = list(ids)
    with torch.inference_mode():
        for _ in range(n_new):
            token = int(model(torch.tensor([feed]), cache=cache, last_only=True)[0, -1].argmax())
            out.append(token)
            if token == stop:
                break
            feed = [token]
    return out

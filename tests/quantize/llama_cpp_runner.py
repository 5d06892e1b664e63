"""Greedy decoding and tokenization through llama.cpp, to compare GGUF exports with Atelier's model.

A thin test-side layer over :mod:`modules.llm.llamacpp_runtime` (the app's own C-API wrapper) with plain CPU
buffers: this machine's CPU reports AMX, and llama.cpp's AMX buffer type makes quantized decoding die with SIGSEGV
inside this VM; ``use_extra_bufts = False`` computes the same numbers with the reference kernels.
"""
from __future__ import annotations

from pathlib import Path

from modules.llm.llamacpp_runtime import LlamaCppContext
from modules.llm.llamacpp_runtime import LlamaCppModel as _RuntimeModel


class LlamaCppModel:
    """A GGUF loaded with plain CPU buffers; ``greedy(ids, n)`` and ``tokenize(text)``. Use as a context manager."""

    def __init__(self, path: str | Path, threads: int = 1):
        self.runtime = _RuntimeModel(path, extra_buffers=False)
        self.n_vocab = self.runtime.n_vocab
        self.threads = threads

    def __enter__(self) -> "LlamaCppModel":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self.runtime.close()

    def tokenize(self, text: str | bytes, add_bos: bool = False, special: bool = False) -> list[int]:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        return self.runtime.tokenize(text, add_special=add_bos, parse_special=special)

    def greedy(self, ids: list[int], n_new: int, stop: int | None = None) -> list[int]:
        """The *n_new* argmax continuations of *ids* (fewer if *stop* comes out)."""
        ctx = LlamaCppContext(self.runtime, n_ctx=len(ids) + n_new + 8, threads=self.threads,
                              n_batch=max(len(ids), 8))
        out: list[int] = []
        try:
            feed = list(ids)
            for _ in range(n_new):
                token = int(ctx.eval(feed).argmax())
                out.append(token)
                if token == stop:
                    break
                feed = [token]
        finally:
            ctx.close()
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

"""llama.cpp's own quantizer (``llama_model_quantize``) called through llama-cpp-python's ctypes binding.

Q4_0, the k-quants and the i-quants exist only in C++ (the ``gguf`` package can dequantize them but not make
them), so quantized GGUF files are made the way llama.cpp's ``llama-quantize`` tool makes them: from an
F32/F16/BF16 GGUF, with the same per-tensor type choices and fallbacks.

Importance matrix: in llama-cpp-python 0.3.36 ``llama_model_quantize_params.imatrix`` is a C array of
``llama_model_imatrix_data {name, data, size}`` ended by a NULL name (llama.h), so one can be passed
from Python: :func:`quantize_gguf` builds that array from a ``{tensor name: float32 vector}`` mapping and
keeps the buffers alive for the call. The matrix itself is computed by :mod:`modules.quantize.imatrix`
(llama-cpp-python does not expose ``llama-imatrix``).

llama.cpp logs each tensor (and the reason for a failure) to stderr through llama-cpp-python's log
callback; this module leaves that global callback alone, so a failure here says where to look.
"""
from __future__ import annotations

import ctypes
from pathlib import Path
from typing import Mapping

import numpy as np

from modules.quantize.errors import GGUFExportError


def llama_cpp_module():
    """``llama_cpp``, or a GGUFExportError saying how to install it."""
    try:
        import llama_cpp
    except ImportError as exc:
        raise GGUFExportError(f"Quantized GGUF types need llama-cpp-python, which is not importable here ({exc}). "
                              "Install it with `pip install llama-cpp-python` (it compiles llama.cpp, a few "
                              "minutes) or export F32/F16/BF16, which need only the gguf package.") from None
    return llama_cpp


def quantize_gguf(src: str | Path, dst: str | Path, ftype: int, *, threads: int = 0,
                  imatrix: Mapping[str, np.ndarray] | None = None) -> None:
    """Quantize the GGUF *src* into *dst* as llama.cpp file type *ftype* (``LLAMA_FTYPE_*``).

    threads: worker threads (0: llama.cpp uses every hardware thread). imatrix: GGUF tensor name ->
    mean squared input activation per input column (float32, length = the tensor's row width).
    """
    llama_cpp = llama_cpp_module()
    llama_cpp.llama_backend_init()
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = int(ftype)
    params.nthread = int(threads)
    keep_alive: list[object] = []
    if imatrix:
        entries = (llama_cpp.llama_model_imatrix_data * (len(imatrix) + 1))()   # zeroed: the last is the NULL end
        for entry, (name, values) in zip(entries, imatrix.items()):
            data = np.ascontiguousarray(values, dtype=np.float32)
            if data.ndim != 1 or not np.isfinite(data).all():
                raise GGUFExportError(f"importance matrix entry {name!r} must be a finite 1-D float vector")
            encoded = name.encode("utf-8")
            keep_alive += [data, encoded]
            entry.name = encoded
            entry.data = data.ctypes.data_as(ctypes.POINTER(ctypes.c_float))
            entry.size = data.size
        keep_alive.append(entries)
        params.imatrix = ctypes.cast(entries, ctypes.POINTER(llama_cpp.llama_model_imatrix_data))
    rc = llama_cpp.llama_model_quantize(str(src).encode("utf-8"), str(dst).encode("utf-8"), ctypes.byref(params))
    del keep_alive
    if rc != 0:
        raise GGUFExportError(f"llama.cpp could not quantize {Path(src).name} (llama_model_quantize returned {rc}); "
                              "its log on stderr above names the tensor and the reason")

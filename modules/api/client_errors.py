"""Which exceptions are the client's doing, and the 4xx each is answered with (never a 500).

Shared by the A1111 routes and the options route, so a refused pickle, a decompression bomb or a broken model
file gets the same status and a message with the fix wherever it surfaces.
"""
from __future__ import annotations

import pickle


def classify(exc: BaseException) -> tuple[int, str, str]:
    """(status, error kind, detail) for *exc*; 500 only for what is not a client or model-file problem."""
    from PIL import Image

    from modules.diffusion.loading import UnsafeCheckpoint
    from modules.jobs import JobInterrupted
    name = type(exc).__name__
    if isinstance(exc, UnsafeCheckpoint):
        return 403, name, (f"{exc} (the server refuses pickled files unless started with "
                           "--allow-unsafe-pickle; a .safetensors copy needs no flag).")
    if isinstance(exc, pickle.UnpicklingError):
        return 422, name, (f"the model file holds Python objects that safe loading (weights_only) refuses: {exc}. "
                           "Convert it to .safetensors, or use a file that holds tensors only.")
    if isinstance(exc, Image.DecompressionBombError):
        return 413, name, f"{exc} Send a smaller image."
    if isinstance(exc, JobInterrupted):
        return 409, "Interrupted", str(exc)
    if isinstance(exc, (ValueError, LookupError)):
        return 422, name, str(exc)
    return 500, name, str(exc)

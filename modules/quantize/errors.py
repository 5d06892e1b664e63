"""The error every GGUF export step raises, so callers (CLI, Quantize tab, API) catch one type."""
from __future__ import annotations


class GGUFExportError(ValueError):
    """A model that cannot be written as GGUF, or an export that failed; the message says why and what to do."""


class DiskFullError(GGUFExportError):
    """The disk filled up while writing; ``needed`` is about how many bytes the export needs in all."""

    def __init__(self, message: str, needed: int):
        super().__init__(message)
        self.needed = needed

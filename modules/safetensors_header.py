"""The one safetensors header reader for every model kind (checkpoints, LoRA, VAE, embeddings, LLM).

Why: a model folder is user-controlled input. Random bytes, an interrupted download or a crafted
header must make *that file* unusable with a reason a person can act on, never an unchecked 8-byte
length that asks for exabytes (``MemoryError``), an ``IndexError`` from ``data_offsets: [0]``, or a
library error type the API turns into a 500. So every listing and every loader first reads the header
here. The checks are the ones the safetensors library itself applies when it opens a file (header
length cap, JSON object, known dtypes, shapes, offsets that tile the data buffer exactly), so a file
accepted here is one ``safe_open``/``load_file`` can open; only the tensor *values* are not read.
"""
from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

#: The header size the safetensors library refuses beyond (``MAX_HEADER_SIZE``); no real model comes close.
MAX_HEADER_BYTES = 100_000_000
#: Bits per element of each safetensors dtype (safetensors 0.8 ``Dtype``).
DTYPE_BITS = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8,
    "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "C64": 64, "F64": 64,
    "I64": 64, "U64": 64,
}


class BrokenModelFile(ValueError):
    """A model file that cannot be read; ``reason`` says what is wrong, ``str()`` names the file too."""

    def __init__(self, path: str | os.PathLike, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{self.path.name}: {reason}")


@dataclass(frozen=True)
class TensorEntry:
    dtype: str
    shape: tuple[int, ...]
    begin: int  # offsets relative to the start of the data buffer (after the header)
    end: int


@dataclass(frozen=True)
class SafetensorsHeader:
    """A checked header: the tensor table, the ``__metadata__`` strings, and where the data starts."""
    path: Path
    header_len: int
    tensors: dict[str, TensorEntry]
    metadata: dict[str, str] = field(default_factory=dict)

    @property
    def data_start(self) -> int:
        return 8 + self.header_len

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {name: t.shape for name, t in self.tensors.items()}

    def data_bytes(self) -> int:
        return max((t.end for t in self.tensors.values()), default=0)


def _shape(path: Path, name: str, value) -> tuple[int, ...]:
    if not isinstance(value, list) or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                              for d in value):
        raise BrokenModelFile(path, f"tensor {name!r} has shape {value!r}; a shape is a list of non-negative "
                                    "integers. The file is damaged; download it again")
    return tuple(value)


def _entry(path: Path, name: str, raw) -> TensorEntry:
    if not isinstance(raw, dict):
        raise BrokenModelFile(path, f"tensor {name!r} is described by {type(raw).__name__}, not an object "
                                    "{dtype, shape, data_offsets}; the file is damaged")
    dtype = raw.get("dtype")
    if dtype not in DTYPE_BITS:
        raise BrokenModelFile(path, f"tensor {name!r} has unknown dtype {dtype!r} (known: "
                                    f"{', '.join(DTYPE_BITS)}); the file is damaged or from a newer format")
    shape = _shape(path, name, raw.get("shape"))
    offsets = raw.get("data_offsets")
    if (not isinstance(offsets, list) or len(offsets) != 2
            or not all(isinstance(o, int) and not isinstance(o, bool) and o >= 0 for o in offsets)):
        raise BrokenModelFile(path, f"tensor {name!r} has data_offsets {offsets!r}; expected two non-negative "
                                    "integers [begin, end]. The file is damaged; download it again")
    begin, end = offsets
    if begin > end:
        raise BrokenModelFile(path, f"tensor {name!r} ends (byte {end}) before it begins (byte {begin}); "
                                    "the file is damaged")
    bits = math.prod(shape) * DTYPE_BITS[dtype]
    if bits % 8 or end - begin != bits // 8:
        raise BrokenModelFile(path, f"tensor {name!r} ({dtype}, shape {list(shape)}) needs {bits / 8:g} bytes "
                                    f"but its data_offsets span {end - begin}; the file is damaged")
    return TensorEntry(dtype, shape, begin, end)


def _check_layout(path: Path, tensors: dict[str, TensorEntry], data_len: int) -> None:
    """The tensors must tile the data buffer: no gap, no overlap, ending exactly at the end of the file."""
    position = 0
    for name, t in sorted(tensors.items(), key=lambda item: (item[1].begin, item[1].end)):
        if t.end > data_len:
            raise BrokenModelFile(path, f"truncated: tensor {name!r} ends at data byte {t.end}, but the file holds "
                                        f"only {data_len} bytes of data; download it again")
        if t.begin != position:
            what = "overlaps the previous tensor" if t.begin < position else f"leaves a gap of {t.begin - position} bytes"
            raise BrokenModelFile(path, f"tensor {name!r} starts at data byte {t.begin} and {what}; the file is "
                                        "damaged")
        position = t.end
    if position != data_len:
        raise BrokenModelFile(path, f"{data_len - position} unexpected bytes after the last tensor; the file is "
                                    "damaged or two files were joined")


def read_header(path: str | os.PathLike) -> SafetensorsHeader:
    """Read and check the header of the safetensors file at *path*; raise :class:`BrokenModelFile` if it is
    not one. Reads at most ``8 + header length`` bytes, whatever the file claims."""
    path = Path(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise BrokenModelFile(path, f"the file is {size} bytes, too short for a safetensors header; "
                                            "download it again")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > min(size - 8, MAX_HEADER_BYTES):
                limit = "the file's size" if header_len > size - 8 else f"the {MAX_HEADER_BYTES}-byte limit"
                raise BrokenModelFile(path, f"the header claims {header_len} bytes, beyond {limit} ({size}-byte "
                                            "file); this is not an intact safetensors file")
            raw = fh.read(header_len)
    except OSError as exc:
        raise BrokenModelFile(path, f"cannot be read ({exc.strerror or exc})") from None
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise BrokenModelFile(path, f"the header is not valid JSON ({exc}); this is not an intact safetensors "
                                    "file") from None
    if not isinstance(header, dict):
        raise BrokenModelFile(path, f"the header is a JSON {type(header).__name__}, not an object; this is not "
                                    "an intact safetensors file")
    metadata = header.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(k, str) and isinstance(v, str)
                                                 for k, v in metadata.items()):
        raise BrokenModelFile(path, "__metadata__ must be an object of strings; the file is damaged")
    tensors = {name: _entry(path, name, raw_entry) for name, raw_entry in header.items()}
    _check_layout(path, tensors, size - 8 - header_len)
    return SafetensorsHeader(path, header_len, tensors, dict(metadata))


def check_file(path: str | os.PathLike) -> None:
    """Raise :class:`BrokenModelFile` unless *path* is an intact safetensors file (header and layout)."""
    read_header(path)

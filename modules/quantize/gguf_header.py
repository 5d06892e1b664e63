"""GGUF header reader: the metadata and the tensor table of a ``.gguf`` file, never its tensor data.

Why not ``gguf.GGUFReader``: it builds a numpy view for every element of every metadata array, so opening
SmolLM2-135M (49,152 tokens and 48,900 merges) takes about two seconds on this CPU - too slow for a model
list that is read on every request. This reader walks the same layout with ``struct`` over a memory map and
skips string arrays it is not asked for (keeping only their length), so listing costs milliseconds. The
constants (type ids, block sizes) are the ``gguf`` package's, so the two cannot disagree on the format.

Layout (GGUF v2/v3, little-endian): magic ``GGUF``, version u32, tensor count u64, metadata count u64, the
metadata key/values, the tensor table (name, dims in ggml order, ggml type u32, offset u64), padding to
``general.alignment`` (default 32), then the tensor data. Every offset and size is checked against the
file's length, so a truncated download is reported as such instead of failing somewhere later.
"""
from __future__ import annotations

import mmap
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

GGUF_MAGIC = b"GGUF"
SUPPORTED_VERSIONS = (2, 3)
DEFAULT_ALIGNMENT = 32

#: metadata value types with a fixed width: struct format
_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q",
                   12: "<d"}
_STRING, _ARRAY = 8, 9


class GGUFImportError(ValueError):
    """A GGUF file Atelier cannot read or run; the message names the file, what is wrong and what to do."""


@dataclass(frozen=True)
class SkippedArray:
    """A metadata string array that was not read (only its length is known): see ``read_gguf_header``."""
    count: int


@dataclass(frozen=True)
class GGUFTensorInfo:
    name: str
    #: torch order (the file stores ggml order, fastest-moving dimension first)
    shape: tuple[int, ...]
    ggml_type: int
    #: absolute byte offset of the data in the file
    offset: int
    #: bytes of data; None when the type id is not one the ``gguf`` package knows
    n_bytes: int | None

    @property
    def n_elements(self) -> int:
        count = 1
        for dim in self.shape:
            count *= dim
        return count

    @property
    def type_name(self) -> str:
        return ggml_type_name(self.ggml_type)


@dataclass
class GGUFHeader:
    path: Path
    version: int
    file_size: int
    #: key -> value: ints, floats, bools, strings, lists; string arrays not asked for are SkippedArray
    metadata: dict[str, Any]
    tensors: list[GGUFTensorInfo]
    #: where the tensor data section starts (after the aligned header)
    data_offset: int

    def get(self, key: str, default: Any = None) -> Any:
        return self.metadata.get(key, default)


def ggml_type_name(ggml_type: int) -> str:
    """``"Q4_K"`` for 12; ``"type 99"`` for an id this ``gguf`` package does not know."""
    from gguf import GGMLQuantizationType
    try:
        return GGMLQuantizationType(ggml_type).name
    except ValueError:
        return f"type {ggml_type}"


def tensor_bytes(ggml_type: int, shape: tuple[int, ...]) -> int | None:
    """Bytes a tensor of this type and (torch-order) shape takes in the file; None for an unknown type."""
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
    try:
        block, size = GGML_QUANT_SIZES[GGMLQuantizationType(ggml_type)]
    except (ValueError, KeyError):
        return None
    elements = 1
    for dim in shape:
        elements *= dim
    return elements // block * size


class _Cursor:
    """Reads little-endian values from the mapped file, turning any overrun into one clear error."""

    def __init__(self, buf: mmap.mmap, path: Path):
        self.buf, self.path, self.pos = buf, path, 0

    def _truncated(self, what: str) -> GGUFImportError:
        return GGUFImportError(f"{self.path} is truncated or damaged: reading {what} at byte {self.pos} runs past "
                               f"the end of the file ({len(self.buf)} bytes). Download the file again.")

    def unpack(self, fmt: str, what: str) -> Any:
        size = struct.calcsize(fmt)
        if self.pos + size > len(self.buf):
            raise self._truncated(what)
        value = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += size
        return value[0] if len(value) == 1 else value

    def string(self, what: str) -> str:
        length = self.unpack("<Q", what)
        if self.pos + length > len(self.buf):
            raise self._truncated(what)
        raw = self.buf[self.pos:self.pos + length]
        self.pos += length
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GGUFImportError(f"{self.path} is damaged: {what} is not valid UTF-8 ({exc})") from None

    def skip_strings(self, count: int, what: str) -> None:
        buf, pos, unpack = self.buf, self.pos, struct.unpack_from   # the hot loop of a listing: kept lean
        try:
            for _ in range(count):
                pos += 8 + unpack("<Q", buf, pos)[0]
        except struct.error:
            raise self._truncated(what) from None
        self.pos = pos
        if pos > len(buf):
            raise self._truncated(what)

    def scalars(self, fmt: str, count: int, what: str) -> list:
        size = struct.calcsize(fmt) * count
        if self.pos + size > len(self.buf):
            raise self._truncated(what)
        values = struct.unpack_from(f"<{count}{fmt[1]}", self.buf, self.pos)
        self.pos += size
        return list(values)


def read_gguf_header(path: str | Path, string_arrays: Iterable[str] = ()) -> GGUFHeader:
    """Parse the header of the GGUF at *path*. String arrays named in *string_arrays* (e.g.
    ``tokenizer.ggml.tokens``) are read in full; other string arrays become :class:`SkippedArray`.

    Raises GGUFImportError for a file that is not GGUF, of an unsupported version, or truncated (a tensor
    whose data would lie past the end of the file included).
    """
    path = Path(path)
    wanted = set(string_arrays)
    try:
        with open(path, "rb") as f:
            size = f.seek(0, 2)
            if size < 24:
                raise GGUFImportError(f"{path} is not a GGUF file: it has only {size} bytes (a GGUF header needs "
                                      "at least 24). Download the file again.")
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                return _parse(buf, path, size, wanted)
    except OSError as exc:
        raise GGUFImportError(f"cannot read {path}: {exc}") from exc


def _parse(buf: mmap.mmap, path: Path, size: int, wanted: set[str]) -> GGUFHeader:
    cur = _Cursor(buf, path)
    if buf[:4] != GGUF_MAGIC:
        raise GGUFImportError(f"{path} is not a GGUF file (it starts with {bytes(buf[:4])!r}, not b'GGUF'). "
                              "Models in models/LLM are Hugging Face folders or llama.cpp .gguf files.")
    cur.pos = 4
    version = cur.unpack("<I", "the version")
    if version not in SUPPORTED_VERSIONS:
        raise GGUFImportError(f"{path} is GGUF version {version}; Atelier reads versions "
                              f"{', '.join(map(str, SUPPORTED_VERSIONS))} (re-convert it with a current llama.cpp)")
    tensor_count, kv_count = cur.unpack("<QQ", "the counts")
    # every key/value and tensor entry takes at least 12 bytes: larger counts mean a damaged header
    if (tensor_count + kv_count) * 12 > size:
        raise GGUFImportError(f"{path} is truncated or damaged: its header lists {tensor_count} tensors and "
                              f"{kv_count} metadata entries, more than its {size} bytes can hold. Download the "
                              "file again.")
    metadata: dict[str, Any] = {}
    for _ in range(kv_count):
        key = cur.string("a metadata key")
        value_type = cur.unpack("<I", f"the type of {key}")
        metadata[key] = _read_value(cur, value_type, key, key in wanted)
    entries = []
    for _ in range(tensor_count):
        name = cur.string("a tensor name")
        n_dims = cur.unpack("<I", f"the rank of tensor {name}")
        if n_dims > 8:
            raise GGUFImportError(f"{path} is damaged: tensor {name} claims {n_dims} dimensions (ggml has at most 4)")
        dims = cur.scalars("<Q", n_dims, f"the shape of tensor {name}") if n_dims else []
        ggml_type, offset = cur.unpack("<IQ", f"the type and offset of tensor {name}")
        entries.append((name, tuple(reversed(dims)), ggml_type, offset))
    alignment = metadata.get("general.alignment", DEFAULT_ALIGNMENT)
    if not isinstance(alignment, int) or alignment <= 0 or alignment & (alignment - 1):
        raise GGUFImportError(f"{path} is damaged: general.alignment is {alignment!r}, not a power of two")
    data_offset = (cur.pos + alignment - 1) // alignment * alignment
    tensors = []
    for name, shape, ggml_type, offset in entries:
        n_bytes = tensor_bytes(ggml_type, shape)
        start = data_offset + offset
        if n_bytes is not None and start + n_bytes > size:
            raise GGUFImportError(
                f"{path} is truncated: tensor {name} ({list(shape)}, {ggml_type_name(ggml_type)}) needs bytes "
                f"{start}-{start + n_bytes} but the file has only {size} bytes. The download was cut short: "
                "download the file again.")
        tensors.append(GGUFTensorInfo(name, shape, ggml_type, start, n_bytes))
    return GGUFHeader(path=path, version=version, file_size=size, metadata=metadata, tensors=tensors,
                      data_offset=data_offset)


def _read_value(cur: _Cursor, value_type: int, key: str, keep_strings: bool) -> Any:
    if value_type in _SCALAR_FORMATS:
        return cur.unpack(_SCALAR_FORMATS[value_type], key)
    if value_type == _STRING:
        return cur.string(key)
    if value_type == _ARRAY:
        item_type, count = cur.unpack("<IQ", f"the array header of {key}")
        if item_type in _SCALAR_FORMATS:
            return cur.scalars(_SCALAR_FORMATS[item_type], count, key)
        if item_type == _STRING:
            if keep_strings:
                return [cur.string(key) for _ in range(count)]
            cur.skip_strings(count, key)
            return SkippedArray(count)
        if item_type == _ARRAY:
            return [_read_value(cur, _ARRAY, key, keep_strings) for _ in range(count)]
        raise GGUFImportError(f"{cur.path} is damaged: metadata {key} is an array of unknown type {item_type}")
    raise GGUFImportError(f"{cur.path} is damaged: metadata {key} has unknown value type {value_type}")

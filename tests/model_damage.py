"""Damaged copies of a good safetensors file, the way downloads break and attackers craft them.

Used by the broken-model-file tests of every model folder: each variant must be listed as broken with a
reason and must never disturb the good models beside it.
"""
from __future__ import annotations

import json
import random
import struct


def _split(good: bytes) -> tuple[dict, bytes]:
    (n,) = struct.unpack("<Q", good[:8])
    return json.loads(good[8:8 + n]), good[8 + n:]


def _join(header: dict | bytes, data: bytes, prefix: bytes | None = None) -> bytes:
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return (struct.pack("<Q", len(text)) if prefix is None else prefix) + text + data


def variants(good: bytes, seed: int = 0) -> dict[str, bytes]:
    """{variant name: file bytes}: random bytes, truncations (in the length prefix, the header and the data)
    and crafted headers (huge length, one data offset, end beyond the file, bad shapes, unknown dtype,
    non-JSON, JSON that is not an object)."""
    header, data = _split(good)
    (n,) = struct.unpack("<Q", good[:8])
    first = next(k for k in header if k != "__metadata__")

    def edit(**changes) -> bytes:
        h = json.loads(json.dumps(header))
        h[first].update(changes)
        return _join(h, data)
    return {
        "random-bytes": random.Random(seed).randbytes(4096),
        "cut-in-length": good[:5],
        "cut-in-header": good[:8 + n // 2],
        "cut-in-data": good[:8 + n + max(1, len(data) // 2)],
        "huge-header-length": struct.pack("<Q", 2**62) + good[8:],
        "one-data-offset": edit(data_offsets=[0]),
        "end-beyond-file": edit(data_offsets=[header[first]["data_offsets"][0], len(good) * 4]),
        "negative-shape": edit(shape=[-1, 4]),
        "string-shape": edit(shape="4x4"),
        "unknown-dtype": edit(dtype="Q7"),
        "not-json": _join(b"{not: json" + b" " * 32, data),
        "json-list": _join(b"[1, 2, 3]", data),
    }

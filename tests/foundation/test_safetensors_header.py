"""The one safetensors header reader: every damaged or crafted file is a BrokenModelFile with a reason, and
what it accepts is exactly what the safetensors library can open."""
from __future__ import annotations

import json
import random
import struct
import tracemalloc

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from modules.safetensors_header import MAX_HEADER_BYTES, BrokenModelFile, read_header


@pytest.fixture
def good(tmp_path):
    path = tmp_path / "good.safetensors"
    save_file({"a": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(4, dtype=torch.float16),
               "empty": torch.zeros(0, 5)}, str(path), metadata={"ss_output_name": "x"})
    return path


def _split(path):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def _write(path, header, data, prefix=None):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes((struct.pack("<Q", len(text)) if prefix is None else prefix) + text + data)
    return path


def _library_opens(path) -> bool:
    try:
        with safe_open(str(path), framework="pt") as f:
            for key in f.keys():
                f.get_tensor(key)
        return True
    except Exception:  # noqa: BLE001 - any refusal counts
        return False


def test_good_file(good):
    header = read_header(good)
    assert header.shapes() == {"a": (2, 3), "b": (4,), "empty": (0, 5)}
    assert header.metadata == {"ss_output_name": "x"}
    assert header.data_start == 8 + struct.unpack("<Q", good.read_bytes()[:8])[0]
    assert header.data_bytes() == good.stat().st_size - header.data_start == 24 + 8


def _crafted(good):
    """name -> (header or raw bytes, data, prefix or None, words the reason must contain)."""
    header, data = _split(good)

    def edit(name, **changes):
        h = json.loads(json.dumps(header))
        h[name].update(changes)
        return h
    return {
        "huge header length": (header, data, struct.pack("<Q", 2**63), "header claims"),
        "header length over the cap": (header, data, struct.pack("<Q", MAX_HEADER_BYTES + 1), "header claims"),
        "one data offset": (edit("a", data_offsets=[0]), data, None, "data_offsets"),
        "string offsets": (edit("a", data_offsets=["0", "24"]), data, None, "data_offsets"),
        "end beyond file": (edit("b", data_offsets=[24, 10**12]), data, None, "data_offsets span"),
        "begin after end": (edit("b", data_offsets=[32, 24]), data, None, "before it begins"),
        "negative shape": (edit("a", shape=[-2, -3]), data, None, "shape"),
        "string shape": (edit("a", shape="2x3"), data, None, "shape"),
        "float in shape": (edit("a", shape=[2, 3.0]), data, None, "shape"),
        "bool in shape": (edit("a", shape=[True, 6]), data, None, "shape"),
        "unknown dtype": (edit("a", dtype="F128"), data, None, "unknown dtype"),
        "size mismatch": (edit("a", shape=[2, 4]), data, None, "needs 32 bytes"),
        "entry not an object": ({**header, "a": [1, 2]}, data, None, "not an object"),
        "metadata not strings": ({**header, "__metadata__": {"x": 1}}, data, None, "__metadata__"),
        "not JSON": (b"{this is not json}", data, None, "not valid JSON"),
        "not UTF-8": (b"\xff\xfe{}", data, None, "not valid JSON"),
        "JSON list": (b"[1, 2, 3]", data, None, "not an object"),
        "JSON string": (b'"hello"', data, None, "not an object"),
        "gap between tensors": (edit("b", data_offsets=[26, 34]), data + b"\0\0", None, "gap"),
        "overlapping tensors": (edit("b", data_offsets=[20, 28]), data[:28], None, "overlaps"),
        "trailing bytes": (header, data + b"extra", None, "unexpected bytes"),
    }


def test_crafted_headers_are_broken_with_a_reason(good, tmp_path):
    for name, (header, data, prefix, words) in _crafted(good).items():
        path = _write(tmp_path / "crafted.safetensors", header, data, prefix)
        with pytest.raises(BrokenModelFile) as info:
            read_header(path)
        assert words in info.value.reason, (name, info.value.reason)
        assert str(info.value).startswith("crafted.safetensors: "), name
        assert not _library_opens(path), f"{name}: the library opens what we call broken"


def test_truncation_at_every_region(good, tmp_path):
    raw = good.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    cuts = [0, 1, 4, 7, 8, 9, 8 + n // 2, 8 + n - 1, 8 + n, 8 + n + 1, len(raw) - 1]
    for cut in cuts:
        path = tmp_path / "cut.safetensors"
        path.write_bytes(raw[:cut])
        with pytest.raises(BrokenModelFile) as info:
            read_header(path)
        assert info.value.reason, cut
        assert not _library_opens(path), cut
    assert "too short" in _reason(tmp_path, raw[:7]) and "header claims" in _reason(tmp_path, raw[:8 + n // 2])
    assert "truncated" in _reason(tmp_path, raw[:-1])


def _reason(tmp_path, raw: bytes) -> str:
    path = tmp_path / "r.safetensors"
    path.write_bytes(raw)
    with pytest.raises(BrokenModelFile) as info:
        read_header(path)
    return info.value.reason


def test_a_huge_claimed_header_is_never_allocated(good, tmp_path):
    header, data = _split(good)
    path = _write(tmp_path / "bomb.safetensors", header, data, struct.pack("<Q", 2**40))
    tracemalloc.start()
    with pytest.raises(BrokenModelFile):
        read_header(path)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    assert peak < 1 << 20


def test_random_mutations_agree_with_the_library(good, tmp_path):
    """Flip, cut and splice bytes at random: whatever we accept the library opens, and whatever we refuse
    (with BrokenModelFile, never another exception) it refuses too."""
    rng = random.Random(7)
    raw = good.read_bytes()
    path = tmp_path / "mutant.safetensors"
    accepted = refused = 0
    for _ in range(300):
        data = bytearray(raw)
        op = rng.choice(("flip", "cut", "splice", "random"))
        if op == "flip":
            for _ in range(rng.randint(1, 4)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        elif op == "cut":
            data = data[:rng.randrange(len(data))]
        elif op == "splice":
            at = rng.randrange(len(data))
            data[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
        else:
            data = bytearray(rng.randbytes(rng.randint(0, 400)))
        path.write_bytes(bytes(data))
        try:
            read_header(path)
            ours = True
        except BrokenModelFile:
            ours = False
        assert ours == _library_opens(path), (op, bytes(data[:80]))
        accepted += ours
        refused += not ours
    assert accepted and refused  # both sides of the property were exercised

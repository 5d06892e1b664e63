"""Packed pretraining data: build it (:func:`build_dataset`), memory-map it (:class:`PackedDataset`) and draw
deterministic, resumable, rank-disjoint batches from a weighted mixture of its sources (:class:`Mixture`).

Layout of a dataset folder (one sub-folder per source)::

    meta.json                      written last: a folder without it is an unfinished build
    <source>/train-00000.bin ...   fixed-length sequences of seq_len + 1 tokens, back to back
    <source>/val-00000.bin ...     the held-out documents, packed the same way

Each ``.bin`` is raw little-endian ``uint16`` (vocabulary <= 65535) or ``uint32``, shape
``(sequences, seq_len + 1)``; a model reads ``inputs = seq[:-1]``, ``targets = seq[1:]``.

Document boundaries: every document is tokenized as ``<s> text </s>``. TinyLlama's own data step appends
only EOS; we also put BOS first, as Llama pretraining and Atelier's inference (which always starts a prompt
with ``<s>``) do, so a model sees the same start-of-text token in training and in use. Documents are
concatenated and cut into sequences with no padding and no cross-document attention mask (TinyLlama's
choice); the tokens after the last full sequence of a split are dropped and counted in ``meta.json``.

Validation split: by document, deterministic per seed. Per source the documents are shuffled with the seed
and taken in that order until the held-out part has ``val_fraction`` of the source's tokens, and at least one
full sequence; the rest is training data.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import zlib
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

import numpy as np

if TYPE_CHECKING:
    import torch

from modules.training.llm.documents import DataError, DataSource, iter_documents, resolve_weights, source_files
from modules.training.llm.tokenizer_train import tokenizer_fingerprint

__all__ = ["DataError", "DataSource", "build_dataset", "PackedDataset", "Mixture"]

META = "meta.json"
FORMAT = "atelier-packed-v1"
SPLITS = ("train", "val")
#: default shard size: 64 MiB of tokens
SHARD_BYTES = 64 << 20


# ------------------------------------------------------------------------------------------ building
def build_dataset(sources: list[DataSource], tokenizer, seq_len: int, out_dir: str | os.PathLike, *,
                  val_fraction: float = 0.01, seed: int = 0, overwrite: bool = False,
                  shard_sequences: int | None = None, progress=None) -> Path:
    """Tokenize every source's documents, split off validation documents, pack and write them to ``out_dir``.

    Args:
        sources: the :class:`DataSource` list; names must be unique.
        tokenizer: a :class:`modules.llm.tokenizer.Tokenizer`, or the folder of one.
        seq_len: model context length; sequences hold ``seq_len + 1`` tokens.
        out_dir: dataset folder; a finished dataset there is replaced only with ``overwrite=True``.
        val_fraction: share of each source's tokens held out (whole documents); 0 for none.
        seed: decides which documents are held out.
        shard_sequences: sequences per ``.bin`` file (default: 64 MiB shards).
        progress: optional ``progress(source_name, documents_done, tokens_done)`` callback.
    Returns ``out_dir``.
    """
    from modules.llm.tokenizer import Tokenizer

    tok = tokenizer if isinstance(tokenizer, Tokenizer) else Tokenizer.from_dir(tokenizer)
    _check_build_args(sources, seq_len, val_fraction, shard_sequences)
    out = Path(out_dir)
    if (out / META).exists():
        if not overwrite:
            raise DataError(f"{out} already holds a dataset; choose another output name, or rebuild it "
                            "with overwrite (prepare-data --overwrite)")
        remove_dataset(out)
    out.mkdir(parents=True, exist_ok=True)
    dtype = np.uint16 if tok.vocab_size <= 65535 else np.uint32
    length = seq_len + 1
    per_shard = shard_sequences or max(1, SHARD_BYTES // (length * np.dtype(dtype).itemsize))
    weights = resolve_weights(sources)
    tokenizer_dir = Path(tok.source).parent
    entries = []
    for source, weight in zip(sources, weights):
        files = source_files(source)
        documents = _tokenize(source, files, tok, dtype, progress)
        train, val = _split(documents, source, length, val_fraction, seed)
        entry = {"name": source.name, "weight": weight, "paths": source.paths, "exclude": source.exclude,
                 "text_field": source.text_field, "files": len(files)}
        for split, docs in (("train", train), ("val", val)):
            written = _write_split(out / source.name, split, docs, length, dtype, per_shard)
            entry.setdefault("documents", {})[split] = len(docs)
            entry.setdefault("tokens", {})[split] = written["tokens"]
            entry.setdefault("sequences", {})[split] = written["sequences"]
            entry.setdefault("dropped_tokens", {})[split] = written["dropped"]
            entry.setdefault("shards", {})[split] = written["shards"]
        entries.append(entry)
    meta = {
        "format": FORMAT, "dtype": np.dtype(dtype).name, "seq_len": seq_len, "sequence_tokens": length,
        "vocab_size": tok.vocab_size, "bos_id": tok.bos_id, "eos_id": tok.eos_id,
        "document_format": "<s> text </s>", "val_fraction": val_fraction, "seed": seed,
        "tokenizer": {"path": _relative(tokenizer_dir, out), "sha256": tokenizer_fingerprint(tokenizer_dir)},
        "sources": entries,
    }
    _atomic_write(out / META, json.dumps(meta, indent=2) + "\n")
    return out


def _check_build_args(sources, seq_len, val_fraction, shard_sequences) -> None:
    problems = []
    if not sources:
        problems.append("no data sources: give at least one source with paths")
    names = [s.name for s in sources]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append(f"source names must be unique; repeated: {', '.join(duplicates)}")
    if isinstance(seq_len, bool) or not isinstance(seq_len, int) or seq_len < 1:
        problems.append(f"seq_len={seq_len!r} must be a positive whole number of tokens (TinyLlama: 2048)")
    if isinstance(val_fraction, bool) or not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
        problems.append(f"val_fraction={val_fraction!r} must be at least 0 and below 1 (e.g. 0.01)")
    if shard_sequences is not None and (not isinstance(shard_sequences, int) or shard_sequences < 1):
        problems.append(f"shard_sequences={shard_sequences!r} must be a positive whole number")
    if problems:
        raise DataError("; ".join(problems))


def _tokenize(source: DataSource, files: list[Path], tok, dtype, progress) -> list[tuple[str, np.ndarray]]:
    """``(key, [bos, ..., eos])`` per document of ``source``, in its fixed document order."""
    documents = []
    tokens = 0
    for key, text in iter_documents(source, files):
        ids = tok.encode(text, add_bos=False)
        row = np.empty(len(ids) + 2, dtype=dtype)
        row[0], row[1:-1], row[-1] = tok.bos_id, ids, tok.eos_id
        documents.append((key, row))
        tokens += len(row)
        if progress is not None:
            progress(source.name, len(documents), tokens)
    if not documents:
        raise DataError(f"source {source.name!r}: every document in {', '.join(source.paths)} is empty; "
                        "point it at files with text")
    return documents


def _split(documents, source: DataSource, length: int, val_fraction: float, seed: int):
    """(train documents, val documents), each in the source's document order (see the module docstring)."""
    total = sum(len(ids) for _, ids in documents)
    if total < length + (length if val_fraction > 0 else 0):
        need = length * (2 if val_fraction > 0 else 1)
        raise DataError(f"source {source.name!r} has {total} tokens, fewer than "
                        f"{'one training and one validation sequence' if val_fraction > 0 else 'one sequence'} "
                        f"({need} tokens at seq_len={length - 1}); add text, or lower seq_len"
                        + (" or set val_fraction=0" if val_fraction > 0 else ""))
    if val_fraction == 0:
        return documents, []
    if len(documents) < 2:
        raise DataError(f"source {source.name!r} has a single document, but the validation split holds out whole "
                        "documents; add documents (or split the file), or set val_fraction=0")
    target = max(math.ceil(val_fraction * total), length)
    order = np.random.default_rng([seed, _name_key(source.name)]).permutation(len(documents))
    held, held_tokens = set(), 0
    for index in order:
        if held_tokens >= target:
            break
        held.add(int(index))
        held_tokens += len(documents[index][1])
    train = [doc for i, doc in enumerate(documents) if i not in held]
    train_tokens = total - held_tokens
    if train_tokens < length:
        raise DataError(f"source {source.name!r}: after holding out {len(held)} of {len(documents)} documents for "
                        f"validation only {train_tokens} training tokens are left, fewer than one sequence "
                        f"({length}); add documents, lower seq_len or val_fraction")
    return train, [doc for i, doc in enumerate(documents) if i in held]


def _write_split(folder: Path, split: str, documents, length: int, dtype, per_shard: int) -> dict:
    folder.mkdir(parents=True, exist_ok=True)
    if not documents:
        return {"tokens": 0, "sequences": 0, "dropped": 0, "shards": []}
    stream = np.concatenate([ids for _, ids in documents])
    count = len(stream) // length
    sequences = stream[:count * length].reshape(count, length)
    shards = []
    for number, start in enumerate(range(0, count, per_shard)):
        name = f"{split}-{number:05d}.bin"
        tmp = folder / (name + ".tmp")
        sequences[start:start + per_shard].astype(dtype, copy=False).tofile(tmp)
        os.replace(tmp, folder / name)
        shards.append({"file": name, "sequences": int(min(per_shard, count - start))})
    return {"tokens": int(len(stream)), "sequences": int(count), "dropped": int(len(stream) - count * length),
            "shards": shards}


def remove_dataset(out: Path) -> None:
    """Delete a finished dataset's meta and shards (only files this module writes), before a rebuild."""
    meta = json.loads((out / META).read_text(encoding="utf-8"))
    (out / META).unlink()
    for source in meta.get("sources", []):
        folder = out / str(source.get("name", ""))
        for pattern in ("train-*.bin", "val-*.bin", "*.bin.tmp"):
            for path in folder.glob(pattern):
                path.unlink()


def _relative(path: Path, base: Path) -> str:
    try:
        return path.resolve().relative_to(base.resolve()).as_posix()
    except ValueError:
        return str(path.resolve())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def _name_key(name: str) -> int:
    return zlib.crc32(name.encode("utf-8"))


# ------------------------------------------------------------------------------------------- reading
class PackedDataset:
    """A built dataset, memory-mapped: ``sequences(source, split, indices) -> (k, seq_len + 1)`` array."""

    def __init__(self, out_dir: str | os.PathLike):
        self.path = Path(out_dir)
        meta_path = self.path / META
        if not meta_path.is_file():
            raise DataError(f"{self.path} is not a finished dataset (no {META}); build it with "
                            "`python -m modules.training prepare-data --config FILE`")
        try:
            self.meta = json.loads(meta_path.read_text(encoding="utf-8"))
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise DataError(f"{meta_path} is damaged ({exc}); rebuild the dataset with prepare-data --overwrite") from exc
        if self.meta.get("format") != FORMAT:
            raise DataError(f"{meta_path} has format {self.meta.get('format')!r}, not {FORMAT!r}; rebuild the dataset")
        self.seq_len = int(self.meta["seq_len"])
        self.dtype = np.dtype(self.meta["dtype"])
        self.vocab_size = int(self.meta["vocab_size"])
        self.sources = [s["name"] for s in self.meta["sources"]]
        self.weights = [float(s["weight"]) for s in self.meta["sources"]]
        self._shards: dict[tuple[str, str], list[np.memmap]] = {}
        self._offsets: dict[tuple[str, str], np.ndarray] = {}
        for source in self.meta["sources"]:
            for split in SPLITS:
                maps = [self._map(source["name"], shard) for shard in source["shards"][split]]
                self._shards[source["name"], split] = maps
                self._offsets[source["name"], split] = np.cumsum([0] + [len(m) for m in maps])

    def _map(self, source: str, shard: dict) -> np.memmap:
        file = self.path / source / shard["file"]
        length = self.seq_len + 1
        expected = int(shard["sequences"]) * length * self.dtype.itemsize
        if not file.is_file() or file.stat().st_size != expected:
            found = file.stat().st_size if file.is_file() else "missing"
            raise DataError(f"{file} should hold {expected} bytes but is {found}; the dataset is damaged, rebuild "
                            "it with prepare-data --overwrite")
        return np.memmap(file, dtype=self.dtype, mode="r", shape=(int(shard["sequences"]), length))

    @property
    def tokenizer_dir(self) -> Path:
        """The tokenizer the dataset was built with (``final/`` of a run copies it)."""
        return self.path / self.meta["tokenizer"]["path"]

    @property
    def fingerprint(self) -> str:
        """Identifies the content (sources, sizes, tokenizer, split seed): resume refuses a different one."""
        summary = {"seq_len": self.seq_len, "tokenizer": self.meta["tokenizer"]["sha256"], "seed": self.meta["seed"],
                   "sources": [[s["name"], s["sequences"]] for s in self.meta["sources"]]}
        return hashlib.sha256(json.dumps(summary, sort_keys=True).encode()).hexdigest()[:16]

    def num_sequences(self, source: str, split: str = "train") -> int:
        return int(self._offsets[self._key(source, split)][-1])

    def sequences(self, source: str, split: str, indices) -> np.ndarray:
        """Rows ``indices`` (any order) of ``source``'s ``split``, as an ``(k, seq_len + 1)`` array."""
        key = self._key(source, split)
        indices = np.asarray(indices, dtype=np.int64)
        offsets, shards = self._offsets[key], self._shards[key]
        out = np.empty((len(indices), self.seq_len + 1), dtype=self.dtype)
        shard_of = np.searchsorted(offsets, indices, side="right") - 1
        for shard in np.unique(shard_of):
            rows = shard_of == shard
            out[rows] = shards[shard][indices[rows] - offsets[shard]]
        return out

    def _key(self, source: str, split: str) -> tuple[str, str]:
        if source not in self.sources:
            raise DataError(f"dataset {self.path} has no source {source!r}; it has {', '.join(self.sources)}")
        if split not in SPLITS:
            raise DataError(f"split {split!r} must be one of {', '.join(SPLITS)}")
        return source, split


# ------------------------------------------------------------------------------------------- mixture
class Mixture:
    """Batches from a weighted mixture of a dataset's sources, the same for a seed on any number of ranks.

    One global sample stream, independent of the number of processes: sample ``i`` comes from the source
    that a seeded weighted draw picks for position ``i`` (TinyLlama's ``random.choices``, made
    position-addressable), and is the next sequence of that source's seeded per-epoch permutation, so within
    an epoch a source repeats nothing. A global batch is ``batch_size * world_size`` consecutive samples;
    rank ``r`` takes its ``r``-th slice. So ranks see disjoint sequences, together they see exactly the
    single-process batch (the DDP loss equals the 1-process loss with the same global batch), and the read
    position is one number (plus per-source counts) that a checkpoint saves for an exact resume.
    """

    _BLOCK = 8192   # source draws are made in blocks of this many positions, each block seeded by its index

    def __init__(self, dataset: PackedDataset, *, seed: int, rank: int = 0, world_size: int = 1,
                 split: str = "train", weights: dict[str, float] | None = None):
        problems = []
        if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
            problems.append(f"world_size={world_size!r} must be a positive whole number")
        elif isinstance(rank, bool) or not isinstance(rank, int) or not 0 <= rank < world_size:
            problems.append(f"rank={rank!r} must be in 0..{world_size - 1}")
        if split not in SPLITS:
            problems.append(f"split {split!r} must be one of {', '.join(SPLITS)}")
        if problems:
            raise DataError("; ".join(problems))
        self.dataset, self.seed, self.rank, self.world_size, self.split = dataset, int(seed), rank, world_size, split
        self.weights = self._weights(dataset, weights)
        self.sizes = np.array([dataset.num_sequences(s, split) for s in dataset.sources], dtype=np.int64)
        empty = [s for s, n, w in zip(dataset.sources, self.sizes, self.weights) if n == 0 and w > 0]
        if empty:
            raise DataError(f"sources {', '.join(empty)} have no {split} sequences"
                            + (" (the dataset was built with val_fraction=0)" if split == "val" else "")
                            + "; rebuild with more data, or give them weight 0")
        self.position = 0
        self.counts = np.zeros(len(dataset.sources), dtype=np.int64)
        self._block_cache: dict[int, np.ndarray] = {}
        self._perm_cache: dict[tuple[int, int], np.ndarray] = {}

    @staticmethod
    def _weights(dataset: PackedDataset, weights: dict[str, float] | None) -> np.ndarray:
        """The dataset's build-time weights, or ``weights`` (name -> weight >= 0; unnamed sources get 0)."""
        if weights is None:
            return np.array(dataset.weights) / sum(dataset.weights)
        unknown = sorted(set(weights) - set(dataset.sources))
        bad = sorted(n for n, w in weights.items() if isinstance(w, bool) or not isinstance(w, (int, float))
                     or not 0 <= w < float("inf"))
        if unknown or bad or not sum(weights.get(n, 0) for n in dataset.sources if n not in bad) > 0:
            raise DataError(f"mixture weights {weights} must give the dataset's sources ({', '.join(dataset.sources)}) "
                            "numbers >= 0, at least one above 0"
                            + (f"; unknown: {', '.join(unknown)}" if unknown else "")
                            + (f"; not a valid weight: {', '.join(bad)}" if bad else ""))
        given = np.array([float(weights.get(n, 0.0)) for n in dataset.sources])
        return given / given.sum()

    # ---------------------------------------------------------------------------------- the stream
    def next_batch(self, batch_size: int) -> "torch.LongTensor":
        """This rank's next ``(batch_size, seq_len + 1)`` token batch; advances by one global batch."""
        import torch

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size={batch_size!r} must be a positive whole number")
        width = batch_size * self.world_size
        choices = self._choices(self.position, self.position + width)
        ordinals = np.empty(width, dtype=np.int64)
        for s in range(len(self.sizes)):
            mask = choices == s
            ordinals[mask] = self.counts[s] + np.arange(int(mask.sum()))
        mine = slice(self.rank * batch_size, (self.rank + 1) * batch_size)
        rows = self._rows(choices[mine], ordinals[mine])
        self.counts += np.bincount(choices, minlength=len(self.sizes))
        self.position += width
        return torch.from_numpy(rows.astype(np.int64))

    def _rows(self, choices: np.ndarray, ordinals: np.ndarray) -> np.ndarray:
        out = np.empty((len(choices), self.dataset.seq_len + 1), dtype=self.dataset.dtype)
        for s in np.unique(choices):
            picked = np.flatnonzero(choices == s)
            size = int(self.sizes[s])
            indices = np.array([self._permutation(int(s), int(o) // size)[int(o) % size] for o in ordinals[picked]])
            out[picked] = self.dataset.sequences(self.dataset.sources[s], self.split, indices)
        return out

    def _choices(self, start: int, stop: int) -> np.ndarray:
        parts = []
        for block in range(start // self._BLOCK, (stop - 1) // self._BLOCK + 1):
            draws = self._block(block)
            lo = max(start - block * self._BLOCK, 0)
            hi = min(stop - block * self._BLOCK, self._BLOCK)
            parts.append(draws[lo:hi])
        return np.concatenate(parts)

    def _block(self, block: int) -> np.ndarray:
        if block not in self._block_cache:
            if len(self._block_cache) > 4:
                self._block_cache.clear()
            rng = np.random.default_rng([self.seed, 1, SPLITS.index(self.split), block])
            self._block_cache[block] = rng.choice(len(self.sizes), size=self._BLOCK, p=self.weights)
        return self._block_cache[block]

    def _permutation(self, source: int, epoch: int) -> np.ndarray:
        key = (source, epoch)
        if key not in self._perm_cache:
            for old in [k for k in self._perm_cache if k[0] == source and k[1] < epoch - 1]:
                del self._perm_cache[old]
            name = self.dataset.sources[source]
            rng = np.random.default_rng([self.seed, 2, SPLITS.index(self.split), _name_key(name), epoch])
            self._perm_cache[key] = rng.permutation(int(self.sizes[source]))
        return self._perm_cache[key]

    # ------------------------------------------------------------------------------- validation
    def val_batches(self, batch_size: int) -> Iterator["torch.LongTensor"]:
        """This rank's part of every held-out sequence, source by source, in stored order.

        Global batches of ``batch_size * world_size`` sequences, rank ``r`` taking the ``r``-th slice; the
        last, shorter global batch is cut to a multiple of ``world_size`` so that every rank runs the same
        number of batches (up to ``world_size - 1`` sequences are left out with several processes).
        """
        import torch

        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise DataError(f"batch_size={batch_size!r} must be a positive whole number")
        sizes = [self.dataset.num_sequences(s, "val") for s in self.dataset.sources]
        if sum(sizes) == 0:
            raise DataError(f"dataset {self.dataset.path} has no validation sequences (built with val_fraction=0); "
                            "rebuild it with val_fraction > 0, or turn validation off")
        refs = [(s, i) for s, n in zip(self.dataset.sources, sizes) for i in range(n)]
        width = batch_size * self.world_size
        for start in range(0, len(refs), width):
            chunk = refs[start:start + width]
            per_rank = len(chunk) // self.world_size
            if per_rank == 0:
                return
            mine = chunk[self.rank * per_rank:(self.rank + 1) * per_rank]
            rows = [self.dataset.sequences(s, "val", [i])[0] for s, i in mine]
            yield torch.from_numpy(np.stack(rows).astype(np.int64))

    # ------------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """The read position (global, so the same on every rank), with what it is valid for."""
        return {"format": "atelier-mixture-v1", "seed": self.seed, "split": self.split,
                "position": int(self.position), "counts": {n: int(c) for n, c in zip(self.dataset.sources, self.counts)},
                "weights": [float(w) for w in self.weights], "dataset": self.dataset.fingerprint}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; an error naming what differs when it belongs to other data or settings."""
        problems = []
        for key, mine in (("format", "atelier-mixture-v1"), ("seed", self.seed), ("split", self.split),
                          ("dataset", self.dataset.fingerprint)):
            if state.get(key) != mine:
                problems.append(f"{key} is {state.get(key)!r} in the saved state but {mine!r} now")
        if not np.allclose(state.get("weights", []) if len(state.get("weights", [])) == len(self.weights)
                           else np.full(len(self.weights), np.nan), self.weights):
            problems.append(f"weights are {state.get('weights')} in the saved state but {self.weights.tolist()} now")
        counts = state.get("counts") or {}
        if sorted(counts) != sorted(self.dataset.sources) or sum(counts.values()) != state.get("position"):
            problems.append("the saved per-source counts do not match the dataset's sources and position")
        if problems:
            raise DataError("cannot resume the data mixture: " + "; ".join(problems)
                            + ". Resume with the dataset and data settings the run started with.")
        self.position = int(state["position"])
        self.counts = np.array([int(counts[n]) for n in self.dataset.sources], dtype=np.int64)

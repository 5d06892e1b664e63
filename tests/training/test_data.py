"""Packed datasets and the training mixture: exact packing of <s> doc </s>, the by-document validation split,
memory-mapped shards, a weighted mixture that is deterministic per seed, disjoint across ranks (together the
single-process batch), exactly resumable, and clear errors for bad data."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from training_corpus import write_corpus

from modules.llm.tokenizer import Tokenizer
from modules.training.llm.data import DataError, DataSource, Mixture, PackedDataset, build_dataset
from modules.training.llm.documents import iter_documents, resolve_weights
from modules.training.llm.tokenizer_train import train_tokenizer

SEQ = 16


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> dict[str, Path]:
    return write_corpus(tmp_path_factory.mktemp("corpus"))


@pytest.fixture(scope="module")
def tok_dir(corpus, tmp_path_factory) -> Path:
    files = sorted(corpus["text"].rglob("*.txt")) + sorted(corpus["code"].glob("*.py"))
    return train_tokenizer(files, 400, tmp_path_factory.mktemp("tok") / "tokenizer")


@pytest.fixture(scope="module")
def tok(tok_dir) -> Tokenizer:
    return Tokenizer.from_dir(tok_dir)


def sources(corpus) -> list[DataSource]:
    return [DataSource("text", [str(corpus["text"])]), DataSource("code", [str(corpus["code"] / "*.py")])]


@pytest.fixture(scope="module")
def dataset(corpus, tok, tmp_path_factory) -> PackedDataset:
    out = build_dataset(sources(corpus), tok, SEQ, tmp_path_factory.mktemp("ds") / "ds", val_fraction=0.2,
                        seed=0, shard_sequences=7)
    return PackedDataset(out)


def expected_rows(docs, tok) -> np.ndarray:
    stream = [t for _, text in docs for t in [tok.bos_id, *tok.encode(text, add_bos=False), tok.eos_id]]
    count = len(stream) // (SEQ + 1)
    return np.array(stream[:count * (SEQ + 1)]).reshape(count, SEQ + 1)


def all_rows(dataset, source, split) -> np.ndarray:
    return dataset.sequences(source, split, np.arange(dataset.num_sequences(source, split)))


# ------------------------------------------------------------------------------------------- build
def test_documents_are_packed_as_bos_text_eos_and_split_by_document(dataset, corpus, tok):
    meta = dataset.meta
    assert meta["dtype"] == "uint16" and meta["seq_len"] == SEQ
    assert [s["weight"] for s in meta["sources"]] == pytest.approx([0.7, 0.3])   # TinyLlama's text:code default
    for source in sources(corpus):
        docs = list(iter_documents(source))
        entry = next(s for s in meta["sources"] if s["name"] == source.name)
        assert entry["documents"]["train"] + entry["documents"]["val"] == len(docs) and entry["documents"]["val"] >= 1
        # Every document lands whole in one split; each split is its documents' stream, cut into rows.
        per_split = {"train": [], "val": []}
        val_keys = set()
        for split in ("train", "val"):
            rows = all_rows(dataset, source.name, split)
            assert rows.dtype == np.uint16 and rows.shape[1] == SEQ + 1
            stream = rows.reshape(-1).tolist()
            # greedily match documents in order: the split is a subsequence of the source's documents
            position = 0
            for key, text in docs:
                ids = [tok.bos_id, *tok.encode(text, add_bos=False), tok.eos_id]
                if stream[position:position + len(ids)] == ids or (
                        position < len(stream) and stream[position:] == ids[:len(stream) - position]):
                    per_split[split].append((key, text))
                    position += len(ids)
                    if split == "val":
                        val_keys.add(key)
            assert position >= len(stream)
            np.testing.assert_array_equal(rows, expected_rows(per_split[split], tok))
        train_keys = {k for k, _ in per_split["train"]}
        assert not train_keys & val_keys
        assert (source.name, len(train_keys | val_keys)) == (source.name, entry["documents"]["train"] + entry["documents"]["val"])
    assert not list(Path(dataset.path).rglob("*.png")) and (dataset.path / "text" / "train-00000.bin").is_file()
    assert len(meta["sources"][0]["shards"]["train"]) > 1          # 7 sequences per shard: several shards


def test_build_is_deterministic_per_seed(corpus, tok, tmp_path):
    a = build_dataset(sources(corpus), tok, SEQ, tmp_path / "a", val_fraction=0.2, seed=0)
    b = build_dataset(sources(corpus), tok, SEQ, tmp_path / "b", val_fraction=0.2, seed=0)
    c = build_dataset(sources(corpus), tok, SEQ, tmp_path / "c", val_fraction=0.2, seed=5)
    read = lambda d: {p.relative_to(d).as_posix(): p.read_bytes() for p in sorted(d.rglob("*.bin"))}
    assert read(a) == read(b)
    assert read(a) != read(c)          # another seed holds out other documents


def test_uint32_shards_when_the_vocabulary_exceeds_uint16(tok_dir, tmp_path):
    big = tmp_path / "big-tok"
    shutil.copytree(tok_dir, big)
    config = json.loads((big / "tokenizer_config.json").read_text())
    config["added_tokens_decoder"]["70000"] = {"content": "<big>", "special": True}
    (big / "tokenizer_config.json").write_text(json.dumps(config))
    docs = tmp_path / "docs"
    docs.mkdir()
    for i in range(4):
        (docs / f"{i}.txt").write_text(f"the quick brown fox <big> jumps over the lazy dog {i} " * 5)
    out = build_dataset([DataSource("text", [str(docs)])], big, SEQ, tmp_path / "ds", val_fraction=0)
    ds = PackedDataset(out)
    assert ds.meta["dtype"] == "uint32" and ds.vocab_size == 70001
    rows = all_rows(ds, "text", "train")
    assert rows.dtype == np.uint32 and 70000 in rows


def test_jsonl_documents_use_the_text_field(corpus, tok, tmp_path):
    docs = list(iter_documents(DataSource("chat", [str(corpus["jsonl"])], text_field="body")))
    assert len(docs) == 10 and docs[0][0].endswith("chat.jsonl:1")
    out = build_dataset([DataSource("chat", [str(corpus["jsonl"])], text_field="body")], tok, SEQ, tmp_path / "d")
    assert PackedDataset(out).num_sequences("chat") > 0


# ------------------------------------------------------------------------------------ bad input
def test_bad_data_paths_and_files_are_named(corpus, tok, tmp_path):
    def build(*srcs, seq=SEQ, **kw):
        return build_dataset(list(srcs), tok, seq, tmp_path / "out", **kw)

    with pytest.raises(DataError, match=r"nowhere\.txt does not exist"):
        build(DataSource("text", [str(tmp_path / "nowhere.txt")]))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"matched no \.txt/\.md/\.rst/\.py/\.jsonl files"):
        build(DataSource("text", [str(tmp_path / "empty")]))
    with pytest.raises(DataError, match="no paths"):
        DataSource("text", [])
    with pytest.raises(DataError, match=r"picture\.png is a \.png file"):
        build(DataSource("text", [str(corpus["text"] / "picture.png")]))
    (tmp_path / "blank.txt").write_text("  \n\n")
    with pytest.raises(DataError, match="every document .* is empty"):
        build(DataSource("text", [str(tmp_path / "blank.txt")]))
    with pytest.raises(DataError, match="fewer than one training and one validation sequence"):
        build(DataSource("text", [str(corpus["text"])]), seq=4000)
    with pytest.raises(DataError, match="single document"):
        build(DataSource("code", [str(corpus["code"] / "mod00.py")]), seq=8)
    with pytest.raises(DataError, match="unique; repeated: text"):
        build(DataSource("text", [str(corpus["text"])]), DataSource("text", [str(corpus["code"])]))
    assert resolve_weights([DataSource("a", ["x"]), DataSource("b", ["y"])]) == [0.5, 0.5]
    assert resolve_weights([DataSource("code", ["x"]), DataSource("text", ["y"])]) == pytest.approx([0.3, 0.7])
    with pytest.raises(DataError, match="every source a weight, or none"):
        resolve_weights([DataSource("a", ["x"], weight=2.0), DataSource("b", ["y"])])
    assert not (tmp_path / "out" / "meta.json").exists()


def test_jsonl_errors_name_the_file_and_line(tok, tmp_path):
    path = tmp_path / "data.jsonl"
    path.write_text('{"text": "fine"}\n\n{"content": "no text field"}\n')
    with pytest.raises(DataError, match=r"data\.jsonl:3 has no 'text' field \(it has: content\).*text_field"):
        list(iter_documents(DataSource("chat", [str(path)])))
    path.write_text('{"text": "fine"}\nnot json\n')
    with pytest.raises(DataError, match=r"data\.jsonl:2 is not valid JSON"):
        list(iter_documents(DataSource("chat", [str(path)])))


def test_an_existing_dataset_is_not_overwritten_silently(corpus, tok, tmp_path):
    out = build_dataset(sources(corpus), tok, SEQ, tmp_path / "ds", val_fraction=0.2)
    before = (out / "text" / "train-00000.bin").read_bytes()
    with pytest.raises(DataError, match="already holds a dataset.*overwrite"):
        build_dataset(sources(corpus), tok, SEQ + 1, out)
    assert (out / "text" / "train-00000.bin").read_bytes() == before
    build_dataset(sources(corpus)[:1], tok, SEQ + 1, out, overwrite=True)
    assert PackedDataset(out).sources == ["text"] and not list((out / "code").glob("*.bin"))


def test_a_damaged_or_unfinished_dataset_is_refused(dataset, tmp_path):
    copy = tmp_path / "copy"
    shutil.copytree(dataset.path, copy)
    shard = copy / "code" / "train-00000.bin"
    shard.write_bytes(shard.read_bytes()[:-3])
    with pytest.raises(DataError, match=r"train-00000\.bin should hold .* bytes .* rebuild"):
        PackedDataset(copy)
    (copy / "meta.json").unlink()
    with pytest.raises(DataError, match="not a finished dataset .* prepare-data"):
        PackedDataset(copy)


# -------------------------------------------------------------------------------------- mixture
def stored(dataset) -> set[tuple]:
    return {tuple(r) for s in dataset.sources for r in all_rows(dataset, s, "train").tolist()}


def test_batches_are_stored_sequences_deterministic_per_seed(dataset):
    a, b, c = (Mixture(dataset, seed=s) for s in (3, 3, 4))
    batches = [a.next_batch(4) for _ in range(5)]
    assert all(x.dtype == torch.long and x.shape == (4, SEQ + 1) for x in batches)
    assert all(torch.equal(x, b.next_batch(4)) for x in batches)
    assert not all(torch.equal(x, c.next_batch(4)) for x in batches)
    rows = stored(dataset)
    assert all(tuple(r) in rows for x in batches for r in x.tolist())


def test_sources_are_drawn_by_weight_and_each_epoch_repeats_nothing(dataset):
    mixture = Mixture(dataset, seed=0)
    for _ in range(250):
        mixture.next_batch(8)
    counts = mixture.state_dict()["counts"]
    assert counts["text"] / 2000 == pytest.approx(0.7, abs=0.03)
    only_code = Mixture(dataset, seed=0, weights={"code": 1.0})
    n = dataset.num_sequences("code")
    seen = torch.cat([only_code.next_batch(1) for _ in range(n)])
    assert len({tuple(r) for r in seen.tolist()}) == len({tuple(r) for r in all_rows(dataset, "code", "train").tolist()})
    equal = Mixture(dataset, seed=0, weights={"text": 1, "code": 1})
    for _ in range(100):
        equal.next_batch(8)
    assert equal.state_dict()["counts"]["text"] / 800 == pytest.approx(0.5, abs=0.05)


def test_ranks_are_disjoint_and_together_make_the_single_process_batch(dataset):
    single = Mixture(dataset, seed=7)
    ranks = [Mixture(dataset, seed=7, rank=r, world_size=2) for r in range(2)]
    for _ in range(6):
        full = single.next_batch(6)
        parts = [m.next_batch(3) for m in ranks]
        assert torch.equal(torch.cat(parts), full)
        assert not {tuple(r) for r in parts[0].tolist()} & {tuple(r) for r in parts[1].tolist()}
    assert ranks[0].state_dict() == ranks[1].state_dict() == single.state_dict()


def test_a_resumed_mixture_yields_exactly_the_uninterrupted_batches(dataset):
    uninterrupted = Mixture(dataset, seed=11)
    expected = [uninterrupted.next_batch(5) for _ in range(40)]
    first = Mixture(dataset, seed=11)
    for _ in range(17):
        first.next_batch(5)
    state = json.loads(json.dumps(first.state_dict()))              # as a checkpoint stores it
    resumed = Mixture(dataset, seed=11)
    resumed.load_state_dict(state)
    assert all(torch.equal(resumed.next_batch(5), x) for x in expected[17:])
    other = Mixture(dataset, seed=12)
    with pytest.raises(DataError, match="seed is 11 in the saved state but 12 now"):
        other.load_state_dict(state)


def test_resume_across_a_draw_block_boundary(dataset):
    a = Mixture(dataset, seed=1)
    for _ in range(2):
        a.next_batch(4000)                 # position 8000, just before the first block ends at 8192
    state = a.state_dict()
    expected = [a.next_batch(150) for _ in range(3)]
    b = Mixture(dataset, seed=1)
    b.load_state_dict(state)
    assert all(torch.equal(b.next_batch(150), x) for x in expected)


def test_val_batches_cover_the_held_out_split_once_and_split_over_ranks(dataset):
    total = sum(dataset.num_sequences(s, "val") for s in dataset.sources)
    held_out = {tuple(r) for s in dataset.sources for r in all_rows(dataset, s, "val").tolist()}
    single = list(Mixture(dataset, seed=0).val_batches(3))
    assert sum(len(b) for b in single) == total
    assert {tuple(r) for b in single for r in b.tolist()} == held_out
    assert all(torch.equal(x, y) for x, y in zip(single, Mixture(dataset, seed=9).val_batches(3)))
    per_rank = [list(Mixture(dataset, seed=0, rank=r, world_size=2).val_batches(3)) for r in range(2)]
    assert len(per_rank[0]) == len(per_rank[1])
    seen = [tuple(r) for batches in per_rank for b in batches for r in b.tolist()]
    assert len(seen) == len(set(seen)) >= total - 1


def test_mixture_arguments_are_checked(dataset):
    with pytest.raises(DataError, match="rank=2 must be in 0..1"):
        Mixture(dataset, seed=0, rank=2, world_size=2)
    with pytest.raises(DataError, match="unknown: prose"):
        Mixture(dataset, seed=0, weights={"prose": 1.0})
    with pytest.raises(DataError, match="batch_size=0"):
        Mixture(dataset, seed=0).next_batch(0)

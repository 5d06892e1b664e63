"""The bucket batch sampler: every batch from one bucket, every image `repeats` times per epoch, orders
fixed by seed and epoch, rank slices that together make the single-process batch, and a saved position
from which a new sampler continues with exactly the same batches (and captions)."""
from __future__ import annotations

import json
from collections import Counter

import pytest
from image_files import write_image

from modules.training.images.buckets import BucketSpec
from modules.training.images.captions import CaptionOptions
from modules.training.images.dataset import DatasetError, ImageDataset
from modules.training.images.sampler import BucketBatchSampler

SPEC = BucketSpec(128)
OPTIONS = CaptionOptions(shuffle=True, keep_tokens=1, dropout_rate=0.2)


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("sampler-data")
    sizes = {"3_sks dog": [(64, 64)] * 5 + [(256, 64)] * 3, "1_dog": [(64, 64)] * 4 + [(64, 256)] * 2 + [(192, 64)]}
    for number, (folder, shapes) in enumerate(sizes.items()):
        for n, size in enumerate(shapes):
            write_image(root / folder / f"{n:02d}.png", size, seed=100 * number + n)
            (root / folder / f"{n:02d}.txt").write_text(f"{folder.split('_', 1)[1]}, tag{n}, extra, more")
    return root


@pytest.fixture(scope="module")
def dataset(dataset_dir):
    return ImageDataset(dataset_dir, buckets=SPEC, captions=OPTIONS)


def keys(batch):
    return [(s.index, s.epoch, s.slot) for s in batch]


def test_batches_come_from_one_bucket_and_cover_every_repeat(dataset):
    sampler = BucketBatchSampler(dataset, batch_size=4, seed=7)
    per_bucket = {b: sum(dataset.records[i].repeats for i in idx) for b, idx in dataset.buckets.items()}
    assert per_bucket == {(128, 128): 19, (256, 64): 9, (64, 256): 2, (192, 64): 1}
    assert sampler.batches_per_epoch == 5 + 3 + 1 + 1
    for epoch in range(2):
        batches = [sampler.next_batch() for _ in range(sampler.batches_per_epoch)]
        seen = Counter()
        for batch in batches:
            assert len(batch) == 4
            assert len({dataset.records[s.index].bucket for s in batch}) == 1
            assert {s.epoch for s in batch} == {epoch}
            seen.update(s.index for s in batch)
        for index, record in enumerate(dataset.records):
            assert seen[index] >= record.repeats                       # every repeat of every image
        padding = sum(seen.values()) - dataset.images_per_epoch
        assert padding == sum(-(-n // 4) * 4 - n for n in per_bucket.values())   # only last batches filled up
        slots = [s.slot for batch in batches for s in batch]
        assert slots == list(range(len(slots)))
    assert (sampler.epoch, sampler.step_in_epoch) == (2, 0)


def test_order_is_fixed_by_seed_and_epoch(dataset):
    def stream(seed, steps=25):
        sampler = BucketBatchSampler(dataset, batch_size=4, seed=seed)
        return [keys(sampler.next_batch()) for _ in range(steps)]

    first = stream(7)
    assert first == stream(7)
    assert first != stream(8)
    epoch0, epoch1 = first[:10], first[10:20]
    assert [[(i, s) for i, _, s in b] for b in epoch0] != [[(i, s) for i, _, s in b] for b in epoch1]


def test_resume_continues_exactly(dataset):
    reference = BucketBatchSampler(dataset, batch_size=4, seed=3)
    expected = [reference.next_batch() for _ in range(35)]
    for stop in (0, 1, 9, 10, 17):        # start, mid-epoch, last batch of an epoch, epoch boundary
        first = BucketBatchSampler(dataset, batch_size=4, seed=3)
        for _ in range(stop):
            first.next_batch()
        state = json.loads(json.dumps(first.state_dict()))            # as a checkpoint stores it
        resumed = BucketBatchSampler(dataset, batch_size=4, seed=3)
        resumed.load_state_dict(state)
        assert resumed.steps_done == stop
        got = [resumed.next_batch() for _ in range(35 - stop)]
        assert [keys(b) for b in got] == [keys(b) for b in expected[stop:]]
        assert [[dataset.caption(s) for s in b] for b in got] == [[dataset.caption(s) for s in b]
                                                                  for b in expected[stop:]]


def test_ranks_split_the_global_batch(dataset):
    single = BucketBatchSampler(dataset, batch_size=4, seed=5)
    ranks = [BucketBatchSampler(dataset, batch_size=4, seed=5, rank=r, world_size=2) for r in range(2)]
    for _ in range(23):
        whole = single.next_batch()
        parts = [r.next_batch() for r in ranks]
        assert [len(p) for p in parts] == [2, 2]
        assert keys(parts[0]) + keys(parts[1]) == keys(whole)
    # a position saved with 2 processes resumes with 1 (the position is global)
    alone = BucketBatchSampler(dataset, batch_size=4, seed=5)
    alone.load_state_dict(ranks[1].state_dict())
    assert keys(alone.next_batch()) == keys(single.next_batch())


def test_captions_vary_per_repeat_and_epoch(dataset):
    sampler = BucketBatchSampler(dataset, batch_size=4, seed=1)
    captions = {}
    for _ in range(sampler.batches_per_epoch * 3):
        for sample in sampler.next_batch():
            captions.setdefault(sample.index, []).append(dataset.caption(sample))
    repeated = [c for i, c in captions.items() if dataset.records[i].repeats == 3]
    assert all(len(set(c)) > 1 for c in repeated)
    for index, texts in captions.items():
        first_tag = dataset.records[index].caption_lines[0].split(",")[0]
        assert all(t == "" or t.startswith(first_tag + ",") for t in texts)   # keep_tokens=1


def test_resume_refuses_other_settings_or_data(dataset, dataset_dir, tmp_path):
    state = BucketBatchSampler(dataset, batch_size=4, seed=3).state_dict()
    with pytest.raises(DatasetError, match="seed is 3 in the saved state but 4 now"):
        BucketBatchSampler(dataset, batch_size=4, seed=4).load_state_dict(state)
    with pytest.raises(DatasetError, match="batch_size is 4 in the saved state but 2 now"):
        BucketBatchSampler(dataset, batch_size=2, seed=3).load_state_dict(state)
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(dataset_dir, copy)
    write_image(copy / "1_dog" / "new.png", (64, 64), seed=123)
    grown = ImageDataset(copy, buckets=SPEC, captions=OPTIONS)
    with pytest.raises(DatasetError, match="images were added, removed or renamed"):
        BucketBatchSampler(grown, batch_size=4, seed=3).load_state_dict(state)
    with pytest.raises(DatasetError, match="not valid"):
        BucketBatchSampler(dataset, batch_size=4, seed=3).load_state_dict({**state, "step_in_epoch": 99})


def test_bad_sampler_arguments(dataset):
    with pytest.raises(DatasetError, match="must split evenly over 3 processes"):
        BucketBatchSampler(dataset, batch_size=4, seed=0, world_size=3)
    with pytest.raises(DatasetError, match="rank=2 must be in 0..1"):
        BucketBatchSampler(dataset, batch_size=4, seed=0, rank=2, world_size=2)
    with pytest.raises(DatasetError, match="batch_size=0"):
        BucketBatchSampler(dataset, batch_size=0, seed=0)

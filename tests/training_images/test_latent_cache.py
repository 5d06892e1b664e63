"""Latent caching through a real (tiny) diffusers VAE: hits encode nothing and return what a fresh encode
gives; a changed image, a changed VAE or a changed bucket is a miss; the disk cache survives a new process
object, repairs damaged files and prunes only its own stale files; a broken encoder is named."""
from __future__ import annotations

import pytest
import torch
from image_files import write_image

from modules.fixtures.diffusion import _vae
from modules.training.images.buckets import BucketSpec
from modules.training.images.dataset import ImageDataset, Sample
from modules.training.images.latent_cache import LatentCache, LatentCacheError, dataset_cache_dir, vae_fingerprint

SPEC = BucketSpec(128)


class CountingEncoder:
    """``encode`` for the cache: the VAE's latent mean, scaled as SD does; counts the images it encodes."""

    def __init__(self, vae):
        self.vae, self.images, self.calls = vae, 0, 0

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        self.images += pixels.shape[0]
        self.calls += 1
        return self.vae.encode(pixels).latent_dist.mean * self.vae.config.scaling_factor


@pytest.fixture(scope="module")
def vae():
    return _vae(seed=0, scaling_factor=0.18215)


@pytest.fixture
def dataset_dir(tmp_path):
    for n in range(3):
        write_image(tmp_path / "data" / "2_x" / f"sq{n}.png", (64, 64), seed=n)
    write_image(tmp_path / "data" / "2_x" / "wide.png", (256, 64), seed=10)
    return tmp_path / "data"


def square(dataset):
    return dataset.buckets[(128, 128)]


def test_memory_cache_hits_after_the_first_encode(vae, dataset_dir):
    dataset = ImageDataset(dataset_dir, buckets=SPEC)
    encoder = CountingEncoder(vae)
    cache = LatentCache(encoder, vae_fingerprint(vae), encode_batch=2)
    indices = square(dataset)
    first = cache.latents(dataset, indices)
    assert first.shape == (3, 4, 16, 16)
    assert (encoder.images, encoder.calls, cache.misses, cache.hits) == (3, 2, 3, 0)   # chunks of 2
    again = cache.latents(dataset, [indices[2], indices[0], indices[2]])
    assert encoder.images == 3 and cache.hits == 3
    assert torch.equal(again[0], first[2]) and torch.equal(again[1], first[0]) and torch.equal(again[2], first[2])
    with torch.no_grad():   # a hit is exactly what encoding the image now gives
        fresh = encoder(dataset.pixels([indices[1]]))
    assert torch.allclose(first[1], fresh[0], atol=1e-6)


def test_disk_cache_is_reused_by_a_new_cache_object(vae, dataset_dir, tmp_path):
    dataset = ImageDataset(dataset_dir, buckets=SPEC)
    folder = dataset_cache_dir(dataset_dir)
    first = CountingEncoder(vae)
    assert LatentCache(first, vae_fingerprint(vae), directory=folder).prepare(dataset) == 4
    assert first.images == 4 and len(list(folder.glob("*.safetensors"))) == 4
    assert not list(folder.glob("*.tmp"))
    assert ImageDataset(dataset_dir, buckets=SPEC).records == dataset.records   # the hidden cache folder is not data
    second = CountingEncoder(vae)
    cache = LatentCache(second, vae_fingerprint(vae), directory=folder)
    assert cache.prepare(dataset) == 0
    wide = dataset.buckets[(256, 64)]
    latents = cache.latents(dataset, wide)
    assert second.images == 0 and cache.hits == 1 and latents.shape == (1, 4, 8, 32)
    batch = dataset.batch([Sample(i, 0, n, 0) for n, i in enumerate(square(dataset))], cache=cache)
    assert batch.pixels is None and batch.latents.shape == (3, 4, 16, 16) and second.images == 0


def test_changed_image_is_a_miss_for_that_image_only(vae, dataset_dir):
    encoder = CountingEncoder(vae)
    cache = LatentCache(encoder, vae_fingerprint(vae), directory=dataset_cache_dir(dataset_dir))
    dataset = ImageDataset(dataset_dir, buckets=SPEC)
    before = cache.latents(dataset, square(dataset))
    write_image(dataset_dir / "2_x" / "sq1.png", (64, 64), seed=99)   # edited in place, same name and size
    rescanned = ImageDataset(dataset_dir, buckets=SPEC)
    encoder.images = 0
    after = cache.latents(rescanned, square(rescanned))
    assert encoder.images == 1
    assert torch.equal(after[0], before[0]) and torch.equal(after[2], before[2])
    assert not torch.allclose(after[1], before[1])


def test_changed_vae_misses_everything(vae, dataset_dir):
    dataset = ImageDataset(dataset_dir, buckets=SPEC)
    folder = dataset_cache_dir(dataset_dir)
    LatentCache(CountingEncoder(vae), vae_fingerprint(vae), directory=folder).prepare(dataset)
    other = _vae(seed=1, scaling_factor=0.18215)
    encoder = CountingEncoder(other)
    cache = LatentCache(encoder, vae_fingerprint(other), directory=folder)
    assert cache.prepare(dataset) == 4 and encoder.images == 4
    assert len(list(folder.glob("*.safetensors"))) == 8


def test_vae_fingerprint_follows_weights_and_config_not_the_folder(vae):
    same = _vae(seed=0, scaling_factor=0.18215)
    assert vae_fingerprint(same) == vae_fingerprint(vae)
    same.register_to_config(_name_or_path="/somewhere/else")
    assert vae_fingerprint(same) == vae_fingerprint(vae)
    assert vae_fingerprint(same, extra="sample") != vae_fingerprint(vae)
    assert vae_fingerprint(_vae(seed=0, scaling_factor=0.13025)) != vae_fingerprint(vae)   # config
    with torch.no_grad():
        next(same.parameters()).view(-1)[0] += 1e-3
    assert vae_fingerprint(same) != vae_fingerprint(vae)                                   # one weight
    assert vae_fingerprint(_vae(seed=0, scaling_factor=0.18215).half()) != vae_fingerprint(vae)   # dtype


def test_vae_fingerprint_ignores_decode_only_weights_which_cannot_change_a_latent(vae):
    other = _vae(seed=0, scaling_factor=0.18215)
    with torch.no_grad():
        other.decoder.conv_in.weight.add_(1.0)
        other.post_quant_conv.weight.add_(1.0)
    assert vae_fingerprint(other) == vae_fingerprint(vae)
    pixels = torch.rand(1, 3, 32, 32) * 2 - 1
    with torch.no_grad():
        assert torch.equal(other.encode(pixels).latent_dist.mean, vae.encode(pixels).latent_dist.mean)
        other.quant_conv.weight.add_(1e-3)
    assert vae_fingerprint(other) != vae_fingerprint(vae)


def test_changed_bucket_is_a_miss(vae, dataset_dir):
    encoder = CountingEncoder(vae)
    cache = LatentCache(encoder, vae_fingerprint(vae))
    cache.prepare(ImageDataset(dataset_dir, buckets=SPEC))
    encoder.images = 0
    bigger = ImageDataset(dataset_dir, buckets=BucketSpec(256))
    latents = cache.latents(bigger, bigger.buckets[(256, 256)])
    assert encoder.images == 3 and latents.shape == (3, 4, 32, 32)


def test_damaged_file_is_encoded_again(vae, dataset_dir):
    dataset = ImageDataset(dataset_dir, buckets=SPEC)
    folder = dataset_cache_dir(dataset_dir)
    cache = LatentCache(CountingEncoder(vae), vae_fingerprint(vae), directory=folder)
    good = cache.latents(dataset, square(dataset))
    damaged = folder / f"{cache.key(dataset.records[square(dataset)[0]])}.safetensors"
    damaged.write_bytes(damaged.read_bytes()[:40])
    encoder = CountingEncoder(vae)
    fresh = LatentCache(encoder, vae_fingerprint(vae), directory=folder)
    again = fresh.latents(dataset, square(dataset))
    assert (encoder.images, fresh.repaired) == (1, 1)
    assert torch.allclose(again, good, atol=1e-6)
    assert LatentCache(CountingEncoder(vae), vae_fingerprint(vae), directory=folder).latents(
        dataset, square(dataset)).shape == good.shape


def test_prune_removes_only_stale_cache_files(vae, dataset_dir):
    folder = dataset_cache_dir(dataset_dir)
    dataset = ImageDataset(dataset_dir, buckets=SPEC)
    cache = LatentCache(CountingEncoder(vae), vae_fingerprint(vae), directory=folder)
    cache.prepare(dataset)
    memory = LatentCache(CountingEncoder(vae), vae_fingerprint(vae))
    memory.prepare(dataset)
    (folder / "README.txt").write_text("user notes")
    (dataset_dir / "2_x" / "sq0.png").unlink()
    smaller = ImageDataset(dataset_dir, buckets=SPEC)
    removed = cache.prune(smaller)
    assert [p.name for p in removed] == [f"{cache.key(r)}.safetensors" for r in dataset.records
                                         if r.relative == "2_x/sq0.png"]
    assert (folder / "README.txt").exists() and len(list(folder.glob("*.safetensors"))) == 3
    memory.prune(smaller)
    assert memory.prepare(smaller) == 0


def test_broken_encoders_are_named(vae, dataset_dir):
    dataset = ImageDataset(dataset_dir, buckets=SPEC)
    with pytest.raises(LatentCacheError, match=r"returned \(4, 16, 16\) for 1 images"):
        LatentCache(lambda x: torch.zeros(4, 16, 16), "fp").latents(dataset, [0])
    with pytest.raises(LatentCacheError, match="NaN"):
        LatentCache(lambda x: torch.full((x.shape[0], 4, 16, 16), float("nan")), "fp").latents(dataset, [0])
    with pytest.raises(LatentCacheError, match="fingerprint"):
        LatentCache(lambda x: x, "")
    with pytest.raises(LatentCacheError, match="encode_batch"):
        LatentCache(lambda x: x, "fp", encode_batch=0)


def test_ranks_share_the_encoding_of_a_disk_cache(vae, dataset_dir):
    dataset = ImageDataset(dataset_dir, buckets=SPEC)
    folder = dataset_cache_dir(dataset_dir)
    encoders = [CountingEncoder(vae) for _ in range(2)]
    done = [LatentCache(e, vae_fingerprint(vae), directory=folder).prepare(dataset, rank=r, world_size=2)
            for r, e in enumerate(encoders)]
    assert done == [2, 2] and [e.images for e in encoders] == [2, 2]
    after = CountingEncoder(vae)
    assert LatentCache(after, vae_fingerprint(vae), directory=folder).prepare(dataset) == 0

"""Checkpoint listing, A1111 hashes and titles, type detection, broken files."""
from __future__ import annotations

import hashlib
import os
import shutil
import struct
from pathlib import Path

import pytest

from modules.diffusion import checkpoints as ck


@pytest.fixture()
def sd_dir(fixture_data_dir, tmp_path) -> Path:
    """A private copy of the fixture checkpoint folder (tests here add and break files)."""
    dst = tmp_path / "Stable-diffusion"
    shutil.copytree(fixture_data_dir / "models" / "Stable-diffusion", dst)
    return dst


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_lists_folders_and_single_files_with_a1111_titles(sd_dir, tmp_path):
    infos = ck.list_checkpoints(sd_dir, tmp_path / "cache")
    by_name = {i.name: i for i in infos}
    assert set(by_name) == {"tiny-sd15-diffusers", "tiny-sdxl-diffusers", "tiny-sd15.safetensors",
                            "tiny-sdxl.safetensors", "tiny-sd15-inpainting.safetensors",
                            "tiny-sd2.safetensors"}  # no sidecars listed
    single = by_name["tiny-sd15.safetensors"]
    assert single.sha256 == _sha(sd_dir / "tiny-sd15.safetensors")
    assert single.shorthash == single.sha256[:10]
    assert single.title == f"tiny-sd15.safetensors [{single.shorthash}]"
    assert single.model_name == "tiny-sd15"
    assert (single.kind, single.is_inpaint, single.format, single.error) == ("sd1", False, "single-file", None)
    assert (by_name["tiny-sdxl.safetensors"].kind, by_name["tiny-sdxl-diffusers"].kind) == ("sdxl", "sdxl")
    assert by_name["tiny-sd15-diffusers"].format == "diffusers"
    assert by_name["tiny-sd2.safetensors"].kind == "sd2"
    assert by_name["tiny-sd15-inpainting.safetensors"].is_inpaint is True


def test_hash_cache_by_size_and_mtime(sd_dir, tmp_path, monkeypatch):
    cache = tmp_path / "cache"
    path = sd_dir / "tiny-sd15.safetensors"
    first = ck.model_hash(path, cache)
    assert (cache / ck.HASH_CACHE_FILE).is_file()

    def refuse(_path):
        raise AssertionError("hash recomputed although size and mtime are unchanged")
    monkeypatch.setattr(ck, "_sha256", refuse)
    assert ck.model_hash(path, cache) == first
    monkeypatch.undo()
    data = bytearray(path.read_bytes())
    data[-1] ^= 0xFF  # same size, new content and mtime
    path.write_bytes(bytes(data))
    os.utime(path, ns=(1, 1))
    assert ck.model_hash(path, cache) == _sha(path) != first


def test_fast_listing_uses_only_cached_hashes(sd_dir, tmp_path):
    infos = ck.list_checkpoints(sd_dir, tmp_path / "cache", compute_hashes=False)
    info = ck.find_checkpoint(infos, "tiny-sd15")
    assert info.shorthash is None and info.title == "tiny-sd15.safetensors"
    hashed = ck.with_hash(info, tmp_path / "cache")
    assert hashed.shorthash == _sha(sd_dir / "tiny-sd15.safetensors")[:10]
    again = ck.find_checkpoint(ck.list_checkpoints(sd_dir, tmp_path / "cache", compute_hashes=False), "tiny-sd15")
    assert again.title == hashed.title


def test_corrupt_and_truncated_files_are_listed_as_broken(sd_dir, tmp_path):
    (sd_dir / "garbage.safetensors").write_bytes(b"this is not a safetensors file at all")
    good = (sd_dir / "tiny-sd15.safetensors").read_bytes()
    (sd_dir / "truncated.safetensors").write_bytes(good[: len(good) // 2])
    header_len = struct.unpack("<Q", good[:8])[0]
    (sd_dir / "badjson.safetensors").write_bytes(good[:8] + b"{" * header_len + good[8 + header_len:])
    (sd_dir / "empty.safetensors").write_bytes(b"")
    infos = {i.name: i for i in ck.list_checkpoints(sd_dir, tmp_path / "cache")}
    for name in ("garbage.safetensors", "truncated.safetensors", "badjson.safetensors", "empty.safetensors"):
        assert infos[name].error, name
        assert infos[name].shorthash is None
    assert "truncated" in infos["truncated.safetensors"].error
    assert infos["tiny-sd15.safetensors"].error is None


def test_pickle_checkpoint_is_listed(sd_dir, tmp_path):
    (sd_dir / "old.ckpt").write_bytes(b"\x80\x02pickled")
    info = ck.find_checkpoint(ck.list_checkpoints(sd_dir, tmp_path / "cache"), "old")
    assert info.name == "old.ckpt" and info.is_pickle and info.error is None


def test_nested_folders_and_shared_tokenizer_dirs(sd_dir, tmp_path):
    (sd_dir / "sub").mkdir()
    shutil.copy(sd_dir / "tiny-sd15.safetensors", sd_dir / "sub" / "copy.safetensors")
    shutil.copytree(sd_dir / "tiny-sd15" / "tokenizer", sd_dir / "tokenizer")
    (sd_dir / "linked").symlink_to(sd_dir / "sub", target_is_directory=True)
    (sd_dir / "sub" / "loop").symlink_to(sd_dir, target_is_directory=True)  # must not walk forever
    names = [i.name for i in ck.list_checkpoints(sd_dir, tmp_path / "cache")]
    assert "sub/copy.safetensors" in names and "linked/copy.safetensors" in names
    assert "tokenizer" not in names
    assert not any(n.startswith("sub/loop") for n in names)


@pytest.mark.parametrize("keys,expected", [
    ({"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
      "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, ("sd1", False)),
    ({"cond_stage_model.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
      "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, ("sd1", True)),
    ({"cond_stage_model.model.token_embedding.weight": (49408, 1024),
      "model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, ("sd2", False)),
    ({"conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": (49408, 768),
      "conditioner.embedders.1.model.ln_final.weight": (1280,),
      "model.diffusion_model.input_blocks.0.0.weight": (320, 9, 3, 3)}, ("sdxl", True)),
    ({"model.diffusion_model.input_blocks.0.0.weight": (320, 4, 3, 3)}, (None, False)),
])
def test_detect_kind(keys, expected):
    assert ck.detect_kind(keys) == expected
    assert ck.detect_kind(list(keys))[0] == expected[0]


def test_find_checkpoint_by_title_name_and_hash(sd_dir, tmp_path):
    infos = ck.list_checkpoints(sd_dir, tmp_path / "cache")
    info = next(i for i in infos if i.name == "tiny-sdxl.safetensors")
    for query in (info.title, info.name, "tiny-sdxl", info.shorthash, info.sha256, info.sha256[:8],
                  f"[{info.shorthash}]", "tiny-sdxl.safetensors [0000000000]"):
        assert ck.find_checkpoint(infos, query) == info, query
    assert ck.find_checkpoint(infos, "no-such-model") is None
    assert ck.find_checkpoint(infos, "") is None


def test_list_vaes(fixture_data_dir, tmp_path):
    vae_dir = tmp_path / "VAE"
    shutil.copytree(fixture_data_dir / "models" / "VAE", vae_dir)
    (vae_dir / "broken.safetensors").write_bytes(b"\x00" * 4)
    vaes = {v.name: v for v in ck.list_vaes(vae_dir, tmp_path / "cache")}
    good = vaes["tiny-vae.safetensors"]
    assert good.error is None and good.shorthash == _sha(vae_dir / "tiny-vae.safetensors")[:10]
    assert vaes["broken.safetensors"].error
    assert ck.find_vae(vaes.values(), "tiny-vae") == good
    assert ck.find_vae(vaes.values(), "Automatic") is None


def test_fixtures_are_byte_identical_across_runs(fixture_data_dir, tmp_path):
    from modules.fixtures import diffusion
    fresh = diffusion.write(tmp_path)

    def digests(root: Path, paths) -> dict:
        out = {}
        for p in paths:
            files = [p] if p.is_file() else sorted(f for f in p.rglob("*") if f.is_file())
            for f in files:
                out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
        return out
    ours = digests(tmp_path, fresh)
    assert len(ours) > 20
    theirs = digests(fixture_data_dir, [fixture_data_dir / Path(p).relative_to(tmp_path) for p in fresh])
    assert ours == theirs


def test_hash_cache_survives_concurrent_writers(tmp_path):
    """Regression (issue 7 probe): parallel requests hashing different files in one process all renamed the same
    ``model_hashes.<pid>.tmp``; the losers failed with FileNotFoundError (a 500 on txt2img)."""
    import json
    import threading

    from modules.diffusion.checkpoints import HASH_CACHE_FILE, cached_digest
    files = []
    for i in range(16):
        f = tmp_path / f"m{i}.bin"
        f.write_bytes(bytes([i]) * 1024)
        files.append(f)
    errors, start = [], threading.Barrier(16)

    def hash_one(f):
        start.wait()
        try:
            for _ in range(5):
                cached_digest(f, tmp_path / "cache", lambda p: p.name, tag=str(_))
        except Exception as exc:  # noqa: BLE001 - collected for the assertion
            errors.append(exc)

    threads = [threading.Thread(target=hash_one, args=(f,)) for f in files]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    json.loads((tmp_path / "cache" / HASH_CACHE_FILE).read_text())  # whole, valid JSON
    assert not list((tmp_path / "cache").glob("*.tmp"))

"""Broken model files in every models/ folder never break anything else (issue 7, point 2).

One real server (``launch.py --api``, web UI built too) gets damaged copies of the tiny fixtures in
Stable-diffusion, Lora, VAE, embeddings and LLM: random bytes, truncation in the length prefix, the header
and the data, and crafted headers. Every listing and refresh answers 200 without them and names each one with
its reason; the good models keep generating; a broken model is never the default; a failed checkpoint
switch keeps the previous model and setting. A second server starts with a broken checkpoint named in
settings.yaml and still answers ``GET /sdapi/v1/options``.
"""
from __future__ import annotations

import json
import shutil
import uuid

import httpx
import pytest
import torch
import yaml

from model_damage import variants
from server_utils import start_server

GOOD = {"Stable-diffusion": "tiny-sd15.safetensors", "Lora": "tiny-sd15-kohya.safetensors",
        "VAE": "tiny-vae.safetensors", "embeddings": "tiny-emb.safetensors"}
LLM_DAMAGE = ("random-bytes", "cut-in-data", "one-data-offset", "huge-header-length")
LLM = "tiny-llama-gqa"


def _damage(models) -> dict[str, list[str]]:
    """Write the damaged files beside the good ones (named to sort first); return {folder: [names]}."""
    written: dict[str, list[str]] = {}
    for folder, good in GOOD.items():
        for name, raw in variants((models / folder / good).read_bytes()).items():
            (models / folder / f"aaa-{name}.safetensors").write_bytes(raw)
            written.setdefault(folder, []).append(f"aaa-{name}")
    broken_diffusers = models / "Stable-diffusion" / "aaa-diffusers-cut"
    shutil.copytree(models / "Stable-diffusion" / "tiny-sd15-diffusers", broken_diffusers)
    unet = broken_diffusers / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:-100])
    written["Stable-diffusion"].append("aaa-diffusers-cut")
    torch.save({"state_dict": {"w": torch.zeros(1)}}, models / "Stable-diffusion" / "zzz-old.ckpt")
    for name in LLM_DAMAGE:
        folder = models / "LLM" / f"aaa-{name}"
        shutil.copytree(models / "LLM" / LLM, folder)
        (folder / "model.safetensors").write_bytes(variants((models / "LLM" / LLM / "model.safetensors")
                                                            .read_bytes())[name])
        written.setdefault("LLM", []).append(folder.name)
    return written


@pytest.fixture(scope="module")
def damaged(fixture_data_dir, tmp_path_factory):
    data = tmp_path_factory.mktemp("broken-files")
    shutil.copytree(fixture_data_dir / "models", data / "models")
    written = _damage(data / "models")
    server = start_server(data, "--api", timeout=180)
    yield server, data, written
    server.stop()


def _get(server, path):
    r = httpx.get(server.url + path, timeout=60)
    assert r.status_code == 200, (path, r.status_code, r.text[:500])
    return r.json()


def _stem(name: str) -> str:
    return name.split(" [")[0].removesuffix(".safetensors")


def test_listings_and_refreshes_answer_without_the_broken_files_and_name_each_with_its_reason(damaged):
    server, _, written = damaged
    for path in ("refresh-checkpoints", "refresh-vae", "refresh-loras"):
        r = httpx.post(f"{server.url}/sdapi/v1/{path}", timeout=60)
        assert r.status_code == 200, (path, r.text)
    models = {_stem(m["title"]) for m in _get(server, "/sdapi/v1/sd-models")}
    vaes = {_stem(v["model_name"]) for v in _get(server, "/sdapi/v1/sd-vae")}
    loras = {item["name"] for item in _get(server, "/sdapi/v1/loras")}
    embeddings = _get(server, "/sdapi/v1/embeddings")
    assert "tiny-sd15" in models and "tiny-vae" in vaes and "tiny-sd15-kohya" in loras
    assert "tiny-emb" in embeddings["loaded"]
    assert not any(n.startswith("aaa-") for n in models | vaes | loras | set(embeddings["loaded"]))
    assert "zzz-old" not in {_stem(m) for m in models}  # a pickle without --allow-unsafe-pickle is not usable
    assert set(written["embeddings"]) <= set(embeddings["skipped"])

    broken = _get(server, "/atelier/v1/broken-models")
    for folder, names in written.items():
        if folder == "LLM":
            continue
        reasons = {_stem(e["name"]): e["error"] for e in broken[folder]}
        for name in names:
            assert reasons.get(name), (folder, name, reasons)
    ckpt = {_stem(e["name"]): e["error"] for e in broken["Stable-diffusion"]}
    assert "header claims" in ckpt["aaa-huge-header-length"]
    assert "data_offsets" in ckpt["aaa-one-data-offset"]
    assert "truncated" in ckpt["aaa-cut-in-data"] and "unknown dtype" in ckpt["aaa-unknown-dtype"]
    assert "unet/diffusion_pytorch_model.safetensors" in ckpt["aaa-diffusers-cut"]
    assert "--allow-unsafe-pickle" in ckpt["zzz-old.ckpt"]
    assert _get(server, "/sdapi/v1/options")["sd_model_checkpoint"] is not None
    log = server.log()
    assert "checkpoint aaa-random-bytes.safetensors is not usable" in log and "LoRA aaa-not-json is not usable" in log


def test_the_default_checkpoint_is_the_first_usable_one(damaged):
    server, _, _ = damaged
    r = httpx.post(f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": ""}, timeout=120)
    assert r.status_code == 200, r.text
    assert _get(server, "/sdapi/v1/options")["sd_model_checkpoint"].startswith("tiny-sd15-diffusers [")


def test_generation_with_any_lora_tag_beside_broken_loras(damaged):
    server, _, _ = damaged
    payload = {"prompt": "a cat <lora:tiny-sd15-kohya:1> <lora:aaa-random-bytes:1> tiny-emb", "steps": 2,
               "width": 64, "height": 64, "seed": 3, "sampler_name": "Euler",
               "override_settings": {"sd_model_checkpoint": "tiny-sd15.safetensors"}}
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json=payload, timeout=180)
    assert r.status_code == 200, r.text
    info = json.loads(r.json()["info"])
    assert info["sd_model_name"] == "tiny-sd15"
    assert 'Lora hashes: "tiny-sd15-kohya: ' in info["infotexts"][0]  # the good LoRA was applied alone
    named = [w for w in info["warnings"] if "aaa-random-bytes" in w]
    assert named and "broken" in named[0] and "header" in named[0]
    assert not any("aaa-" in w and "aaa-random-bytes" not in w for w in info["warnings"])  # only the named one


def test_a_failed_checkpoint_switch_keeps_the_model_and_the_setting(damaged):
    server, data, _ = damaged
    ok = httpx.post(f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": "tiny-sd15.safetensors"},
                    timeout=180)
    assert ok.status_code == 200, ok.text
    before = _get(server, "/sdapi/v1/options")["sd_model_checkpoint"]
    saved = (data / "settings.yaml").read_text()
    for name, needle in (("zzz-old.ckpt", "--allow-unsafe-pickle"), ("aaa-one-data-offset.safetensors",
                                                                       "data_offsets")):
        r = httpx.post(f"{server.url}/sdapi/v1/options", json={"sd_model_checkpoint": name}, timeout=120)
        assert 400 <= r.status_code < 500 and needle in r.text, (name, r.status_code, r.text)
        assert _get(server, "/sdapi/v1/options")["sd_model_checkpoint"] == before
        assert (data / "settings.yaml").read_text() == saved
    loaded = [m["key"] for m in _get(server, "/sdapi/v1/memory")["models"]["models"]]
    assert f"sd:{before}" in loaded
    r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "a cat", "steps": 2, "width": 64,
                                                           "height": 64, "sampler_name": "Euler"}, timeout=180)
    assert r.status_code == 200 and '"sd_model_name": "tiny-sd15"' in r.json()["info"]


def test_broken_llm_folders_are_not_models_and_never_the_default(damaged):
    server, _, written = damaged
    listing = _get(server, "/v1/models")
    assert [m["id"] for m in listing["data"]] == [LLM]
    unusable = {m["id"]: m["error"] for m in listing["unusable"]}
    assert set(unusable) == set(written["LLM"]) and all(unusable.values())
    assert "header claims" in unusable["aaa-huge-header-length"]
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hello", "max_tokens": 2}, timeout=120)
    assert r.status_code == 400 and r.json()["error"]["param"] == "model", r.text  # OpenAI requires it
    r = httpx.post(f"{server.url}/v1/completions", json={"model": LLM, "prompt": "Hello", "max_tokens": 2},
                   timeout=120)
    assert r.status_code == 200 and r.json()["model"] == LLM, r.text
    r = httpx.post(f"{server.url}/v1/chat/completions", timeout=60,
                   json={"model": "aaa-one-data-offset", "messages": [{"role": "user", "content": "hi"}]})
    assert r.status_code == 400 and "data_offsets" in r.json()["error"]["message"], r.text


def test_refresh_loras_rescans_the_folder(damaged):
    server, data, _ = damaged
    name = f"new-{uuid.uuid4().hex[:8]}"
    before = {item["name"] for item in _get(server, "/sdapi/v1/loras")}
    shutil.copy(data / "models" / "Lora" / "tiny-sd15-kohya.safetensors", data / "models" / "Lora" / f"{name}.safetensors")
    (data / "models" / "Lora" / f"{name}-bad.safetensors").write_bytes(b"\x00" * 3)
    assert {item["name"] for item in _get(server, "/sdapi/v1/loras")} == before  # listed once, until refreshed
    assert httpx.post(f"{server.url}/sdapi/v1/refresh-loras", timeout=60).status_code == 200
    after = {item["name"] for item in _get(server, "/sdapi/v1/loras")}
    assert after == before | {name}
    assert f"{name}-bad" in {e["name"] for e in _get(server, "/atelier/v1/broken-models")["Lora"]}


def test_options_answer_after_a_restart_with_a_broken_checkpoint_in_settings(fixture_data_dir, tmp_path):
    data = tmp_path / "restart"
    shutil.copytree(fixture_data_dir / "models", data / "models")
    good = (data / "models" / "Stable-diffusion" / "tiny-sd15.safetensors").read_bytes()
    (data / "models" / "Stable-diffusion" / "aaa-crafted.safetensors").write_bytes(variants(good)["one-data-offset"])
    vectors = torch.ones(2, 32)
    torch.save({"string_to_param": {"*": vectors}, "name": "old-emb"}, data / "models" / "embeddings" / "old-emb.pt")
    (data / "settings.yaml").write_text(yaml.safe_dump({"sd.sd_model_checkpoint": "aaa-crafted.safetensors"}))
    server = start_server(data, "--nowebui", "--allow-unsafe-pickle", timeout=180)
    try:
        options = _get(server, "/sdapi/v1/options")
        assert "sd_model_checkpoint" in options
        assert all(not m["title"].startswith("aaa-") for m in _get(server, "/sdapi/v1/sd-models"))
        r = httpx.post(f"{server.url}/sdapi/v1/txt2img", json={"prompt": "x", "steps": 2, "width": 64,
                                                               "height": 64}, timeout=120)
        # the broken checkpoint named in settings.yaml is refused when the file loads: reported (log, banner),
        # kept in settings.yaml.bak, and generation falls back to the first usable checkpoint
        assert r.status_code == 200, r.text
        assert json.loads(r.json()["info"])["sd_model_name"] != "aaa-crafted"
        assert "aaa-crafted" in (data / "settings.yaml.bak").read_text()
        assert "aaa-crafted" in server.log()
        r = httpx.post(f"{server.url}/sdapi/v1/txt2img", timeout=180, json={
            "prompt": "x", "steps": 2, "width": 64, "height": 64, "sampler_name": "Euler",
            "override_settings": {"sd_model_checkpoint": "tiny-sd15.safetensors"}})
        assert r.status_code == 200, r.text
        embeddings = _get(server, "/sdapi/v1/embeddings")
        assert embeddings["loaded"]["old-emb"]["vectors"] == 2  # --allow-unsafe-pickle enables .pt embeddings
    finally:
        server.stop()

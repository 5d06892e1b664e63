"""POST /sdapi/v1/options: every key validated before anything is applied; raw keys and A1111 aliases share one
validation; A1111's common option names are served truthfully."""
from __future__ import annotations

import yaml


def _options(client):
    r = client.get("/sdapi/v1/options")
    assert r.status_code == 200
    return r.json()


def test_one_bad_key_applies_nothing(app_env):
    ctx, client, data = app_env
    before = _options(client)["memory.reserve_mb"]
    r = client.post("/sdapi/v1/options", json={"memory.reserve_mb": before + 7, "sd_model_checkpoint": "nope"})
    assert r.status_code == 400
    body = r.json()
    assert set(body) == {"error", "detail", "body", "errors"} and "sd_model_checkpoint" in body["errors"]
    assert _options(client)["memory.reserve_mb"] == before, "the valid half must not be applied"
    assert not (data / "settings.yaml").exists() or \
        yaml.safe_load((data / "settings.yaml").read_text()).get("memory.reserve_mb") != before + 7


def test_raw_checkpoint_key_is_validated_like_its_alias(app_env):
    ctx, client, data = app_env
    current = _options(client)["sd.sd_model_checkpoint"]
    for key in ("sd.sd_model_checkpoint", "sd_model_checkpoint"):
        r = client.post("/sdapi/v1/options", json={key: "../../etc/passwd"})
        assert r.status_code == 400, (key, r.text)
        assert "not found" in r.text and "available" in r.text
    assert _options(client)["sd.sd_model_checkpoint"] == current
    saved = (data / "settings.yaml").read_text() if (data / "settings.yaml").exists() else ""
    assert "passwd" not in saved
    assert "passwd" not in str(ctx.settings.as_dict())


def test_wrong_type_is_422_naming_the_field(app_env):
    _ctx, client, _data = app_env
    r = client.post("/sdapi/v1/options", json={"sd_model_checkpoint": 123})
    assert r.status_code == 422 and "sd_model_checkpoint" in r.json()["errors"]
    r = client.post("/sdapi/v1/options", json={"memory.reserve_mb": True})
    assert r.status_code == 422 and "memory.reserve_mb" in r.json()["errors"]


def test_a1111_aliases_are_listed_and_truthful(app_env):
    ctx, client, _data = app_env
    options = _options(client)
    for name in ("sd_model_checkpoint", "sd_vae", "CLIP_stop_at_last_layers", "send_seed", "send_size",
                 "samples_save", "samples_format", "enable_pnginfo", "sd_checkpoint_hash",
                 "eta_noise_seed_delta", "eta_ancestral"):
        assert name in options, name
    assert options["samples_format"] == "png" and options["enable_pnginfo"] is True
    assert options["eta_noise_seed_delta"] == 0
    assert len(options["sd_checkpoint_hash"]) == 64  # the selected checkpoint's sha256
    # writing back what was read is fine (A1111 clients do it); another value for a read-only option is not
    assert client.post("/sdapi/v1/options", json={"samples_format": "png"}).status_code == 200
    bad = client.post("/sdapi/v1/options", json={"samples_format": "jpg", "send_seed": False})
    assert bad.status_code == 400 and "samples_format" in bad.json()["errors"] and "read-only" in bad.text
    assert ctx.settings.get("ui.send_seed") is True, "nothing applied"
    assert client.post("/sdapi/v1/options", json={"sd_checkpoint_hash": "0" * 64}).status_code == 400
    # an alias with behaviour changes its setting (and so the PNG Info "Send to" buttons)
    try:
        r = client.post("/sdapi/v1/options", json={"send_seed": False, "CLIP_stop_at_last_layers": 2})
        assert r.status_code == 200, r.text
        assert ctx.settings.get("ui.send_seed") is False and ctx.settings.get("sd.clip_skip") == 2
        from modules.ui.tabs.pnginfo import not_sent
        assert "seed" in not_sent(ctx.settings) and "width" not in not_sent(ctx.settings)
    finally:
        ctx.settings.update({"ui.send_seed": True, "sd.clip_skip": 1})
    # an A1111 option Atelier has no behaviour for is refused by name, not silently accepted
    r = client.post("/sdapi/v1/options", json={"jpeg_quality": 80})
    assert r.status_code == 400 and "jpeg_quality" in r.json()["errors"]


def test_failed_apply_rolls_back(app_env, monkeypatch):
    """A value that validates but cannot be applied (the checkpoint fails to load) leaves every option as it was."""
    ctx, client, _data = app_env
    before = ctx.settings.as_dict()
    option = ctx.api.options["sd_model_checkpoint"]

    def failing_load(title):
        ctx.settings.set("sd.sd_model_checkpoint", title)
        from modules.diffusion.loading import UnsafeCheckpoint
        raise UnsafeCheckpoint("x.ckpt is a pickled checkpoint")

    monkeypatch.setattr(option, "set", failing_load)
    other = next(c.title for c in ctx.diffusion.usable_checkpoints() if c.title != ctx.diffusion.current_title())
    r = client.post("/sdapi/v1/options", json={"memory.reserve_mb": 333, "sd_model_checkpoint": other})
    assert r.status_code == 403 and "--allow-unsafe-pickle" in r.text and "previous options" in r.text
    assert ctx.settings.as_dict() == before

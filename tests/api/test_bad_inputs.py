"""A dozen specific bad inputs that used to be 500s or silently ignored: each is now a 4xx in the documented
error shape that names the field (A1111 ``{error, detail, body, errors}`` under /sdapi, OpenAI's under /v1)."""
from __future__ import annotations

import base64
import io
import json

import pytest
from PIL import Image

MODEL = "tiny-llama-gqa"


def _png(size=(8, 8)) -> str:
    buf = io.BytesIO()
    Image.new("RGB", size).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _bomb() -> str:
    """A tiny PNG whose header claims more pixels than PIL's decompression-bomb limit."""
    buf = io.BytesIO()
    Image.new("1", (Image.MAX_IMAGE_PIXELS // 4000 + 1, 4001)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _sd_error(r, status, field=None):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error", "detail", "body", "errors"}, body
    if field:
        assert field in body["errors"], body
        assert field in body["detail"]
    return body


def _openai_error(r, status, param=None):
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param:
        assert err["param"] and err["param"].startswith(param), err
    return err


@pytest.mark.parametrize("payload, field", [
    ({"prompt": "x", "denoising_strength": "x"}, "denoising_strength"),
    ({"prompt": "x", "steps": True}, "steps"),
    ({"prompt": "x", "cfg_scale": "7"}, "cfg_scale"),
    ({"prompt": "a \ud800 cat"}, "prompt"),
    ({"prompt": "x", "override_settings": {"sd_model_checkpoint": 123}}, "override_settings.sd_model_checkpoint"),
    ({"prompt": "x", "restore_faces": True}, "restore_faces"),  # no face restoration: not silently ignored
    ({"prompt": "x", "restore_faces": 3}, "restore_faces"),
    ({"prompt": "x", "tiling": "x"}, "tiling"),
    ({"prompt": "x", "s_noise": 0.5}, "s_noise"),
    ({"prompt": "x", "hr_prompt": "another prompt"}, "hr_prompt"),
    ({"prompt": "x", "hr_scale": -2}, "hr_scale"),  # unused without enable_hr, still never nonsense
])
def test_txt2img_type_errors_are_422_naming_the_field(app_env, payload, field):
    _ctx, client, _data = app_env
    r = client.post("/sdapi/v1/txt2img", content=json.dumps(payload), headers={"content-type": "application/json"})
    _sd_error(r, 422, field)


@pytest.mark.parametrize("path, payload, field", [
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["BOMB"]}, "init_images[0]"),
    ("/sdapi/v1/img2img", {"prompt": "x", "init_images": ["PNG"], "mask": "BOMB"}, "mask"),
    ("/sdapi/v1/png-info", {"image": "BOMB"}, "image"),
])
def test_decompression_bomb_is_413(app_env, path, payload, field):
    _ctx, client, _data = app_env
    bomb, png = _bomb(), _png()
    payload = json.loads(json.dumps(payload).replace('"BOMB"', json.dumps(bomb)).replace('"PNG"', json.dumps(png)))
    _sd_error(client.post(path, json=payload), 413, field)


def test_prompt_size_limit_is_a_setting(app_env):
    ctx, client, _data = app_env
    limit = ctx.settings.get("api.max_prompt_chars")
    body = _sd_error(client.post("/sdapi/v1/txt2img", json={"prompt": "a" * (limit + 1)}), 413, "prompt")
    assert str(limit) in body["detail"] and "api.max_prompt_chars" in body["detail"]
    err = _openai_error(client.post("/v1/chat/completions", json={
        "model": MODEL, "messages": [{"role": "user", "content": "a" * (limit + 1)}]}), 413, "messages")
    assert str(limit) in err["message"]
    _openai_error(client.post("/v1/completions", json={"model": MODEL, "prompt": "a" * (limit + 1)}), 413, "prompt")


def test_unsafe_pickle_is_a_4xx_with_the_fix(app_env):
    ctx, client, data = app_env
    import torch
    path = data / "models" / "Stable-diffusion" / "pickled.ckpt"
    torch.save({"state_dict": {"w": torch.zeros(1)}}, path)
    try:
        ctx.diffusion.refresh()
        title = next(c.title for c in ctx.diffusion.checkpoints() if c.name.startswith("pickled"))
        r = client.post("/sdapi/v1/txt2img", json={"prompt": "x", "steps": 1, "width": 64, "height": 64,
                                                   "override_settings": {"sd_model_checkpoint": title}})
        assert 400 <= r.status_code < 500 and "--allow-unsafe-pickle" in r.text, r.text
    finally:
        path.unlink()
        ctx.diffusion.refresh()


def test_unpickling_refusal_is_a_4xx():
    """torch's weights_only refusal (an UnpicklingError) is the file's fault, not the server's."""
    import pickle

    from modules.api.client_errors import classify
    status, _kind, detail = classify(pickle.UnpicklingError("Weights only load failed"))
    assert status == 422 and "safetensors" in detail


@pytest.mark.parametrize("extra, param", [
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.1}, "temperature"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"max_tokens": True}, "max_tokens"),
    ({"tools": [{"type": "function", "function": {"name": "f"}}]}, "tools"),
    ({"tool_choice": "auto"}, "tool_choice"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"response_format": {"type": "grammar"}}, "response_format"),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nope"}}}},
     "response_format"),
    ({"logit_bias": {"1": 500}}, "logit_bias"),
    ({"logit_bias": {"one": 5}}, "logit_bias"),
    ({"n": 1000}, "n"),
    ({"logprobs": True, "top_logprobs": 1000}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
])
def test_openai_rejects_what_openai_rejects_or_we_do_not_do(app_env, extra, param):
    _ctx, client, _data = app_env
    body = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2, **extra}
    _openai_error(client.post("/v1/chat/completions", json=body), 400, param)


@pytest.mark.parametrize("extra, param", [({"suffix": "!"}, "suffix"), ({"best_of": 2}, "best_of")])
def test_completions_unsupported_fields(app_env, extra, param):
    _ctx, client, _data = app_env
    _openai_error(client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "max_tokens": 2, **extra}),
                  400, param)


def test_lone_surrogate_in_a_message_is_422(app_env):
    _ctx, client, _data = app_env
    raw = '{"model": "%s", "messages": [{"role": "user", "content": "a \\ud800 b"}]}' % MODEL
    _openai_error(client.post("/v1/chat/completions", content=raw, headers={"content-type": "application/json"}),
                  422, "messages")


def test_system_fingerprint_is_the_serving_config_not_the_seed(app_env):
    _ctx, client, _data = app_env
    prints = set()
    for seed in (1, 2):
        r = client.post("/v1/chat/completions", json={"model": MODEL, "max_tokens": 2, "seed": seed,
                                                      "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 200, r.text
        prints.add(r.json()["system_fingerprint"])
    assert len(prints) == 1
    fingerprint = prints.pop()
    assert fingerprint.startswith("fp_") and "seed" not in fingerprint
    from modules.llm.openai_api import serving_fingerprint
    assert serving_fingerprint(MODEL, "float32", "cpu", "a") != serving_fingerprint(MODEL, "bfloat16", "cpu", "a")


def test_wrong_method_is_405_and_validation_errors_have_the_shape(app_env):
    _ctx, client, _data = app_env
    r = client.post("/sdapi/v1/progress")
    body = _sd_error(r, 405)
    assert "GET" in r.headers["allow"] and "GET" in body["detail"]
    r = client.get("/v1/chat/completions")
    assert _openai_error(r, 405)["type"] == "invalid_request_error"
    _sd_error(client.post("/sdapi/v1/options", json=[1, 2]), 422)
    _sd_error(client.get("/sdapi/v1/progress", params={"skip_current_image": "maybe"}), 422, "skip_current_image")
    _sd_error(client.get("/sdapi/v1/no-such-route"), 404)


def test_a1111_defaults_for_unsupported_fields_are_accepted():
    """What webuiapi sends on every call (restore_faces False, s_noise 1, hr_checkpoint_name None ...) stays valid."""
    import inspect

    import webuiapi

    from modules.diffusion.sdapi import check_unsupported_fields
    defaults = {k: v.default for k, v in inspect.signature(webuiapi.WebUIApi.txt2img).parameters.items()}
    defaults.update({k: v.default for k, v in inspect.signature(webuiapi.WebUIApi.img2img).parameters.items()})
    check_unsupported_fields({k: v for k, v in defaults.items() if v is not inspect.Parameter.empty})

"""The hardening probe of issue 7, as a script that prints a table: bad inputs, corrupt model files, concurrent
clients with an interrupt in the middle, and what a visitor sees before login.

    python benchmarks/hardening_probe.py [--clients 32]

It writes the tiny fixture models into a temporary data dir, starts the real server (``launch.py``) and talks
to it over HTTP with ``httpx`` and the ``openai`` client. Every figure it prints is counted, not assumed:

* bad inputs: each request must answer a 4xx in the documented error shape; a 5xx or a 2xx is a defect;
* corrupt files: broken files are added to every model folder, the server restarts, and listings, refreshes and
  generation with the good models must keep answering 200;
* concurrency: N clients (three quarters streaming chats, the rest txt2img) run at once and one
  ``POST /sdapi/v1/interrupt`` is sent while they run; a lost job is a request that failed, a cut chat is a
  reply shorter than its ``max_tokens`` (the interrupt must touch image generation only);
* login: with ``--gradio-auth``, no page or API answer given before login may contain a model name, an
  extension name, a chat id or the custom system prompt.
"""
from __future__ import annotations

import argparse
import base64
import io
import json
import os
import random
import shutil
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.server_utils import start_server  # noqa: E402

SECRET_PROMPT = "You are Zebulon-7731, a very particular assistant."


def png_b64(width: int = 64, height: int = 64) -> str:
    from PIL import Image
    buf = io.BytesIO()
    Image.new("RGB", (width, height), (120, 30, 200)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def bomb_b64() -> str:
    """A PNG whose header claims 30000 x 30000 pixels (a decompression bomb for PIL's default limit)."""
    from PIL import Image
    buf = io.BytesIO()
    Image.new("1", (30000, 30000)).save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def bad_inputs() -> list[tuple[str, str, object, str]]:
    """(method, path, JSON body or raw bytes, what a clear answer must mention)."""
    t2i = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64}
    chat = {"model": "tiny-llama-gqa", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 4}
    comp = {"model": "tiny-llama-gqa", "prompt": "hi", "max_tokens": 4}
    cases: list[tuple[str, str, object, str]] = []
    for field, value in [("steps", -1), ("steps", True), ("steps", "x"), ("steps", 100000), ("width", 65),
                         ("width", 0), ("width", -64), ("height", 1e9), ("cfg_scale", "x"), ("cfg_scale", -5),
                         ("seed", "abc"), ("sampler_name", "No Such Sampler"), ("scheduler", "nope"),
                         ("batch_size", 0), ("batch_size", 10000), ("n_iter", -1), ("denoising_strength", "x"),
                         ("denoising_strength", 7), ("clip_skip", 99), ("prompt", 5), ("prompt", ["a"]),
                         ("negative_prompt", {"a": 1}), ("styles", "notalist"), ("override_settings", [1]),
                         ("override_settings", {"sd_model_checkpoint": 123}),
                         ("override_settings", {"sd_model_checkpoint": "../../etc/passwd"}),
                         ("script_name", "no such script"), ("hr_scale", -2), ("enable_hr", "maybe"),
                         ("subseed_strength", "x"), ("tiling", "x"), ("restore_faces", 3)]:
        cases.append(("POST", "/sdapi/v1/txt2img", {**t2i, field: value}, field))
    cases.append(("POST", "/sdapi/v1/txt2img", {**t2i, "prompt": "<lora:no-such-lora:1> cat"}, "no-such-lora"))
    cases.append(("POST", "/sdapi/v1/txt2img", {**t2i, "prompt": "a" * (1 << 20)}, "prompt"))
    cases.append(("POST", "/sdapi/v1/txt2img", b'{"prompt": "\\ud800 cat", "steps": 2}', "prompt"))
    cases.append(("POST", "/sdapi/v1/txt2img", b"{not json", ""))
    cases.append(("POST", "/sdapi/v1/txt2img", b"[]", ""))
    i2i = {"prompt": "a cat", "steps": 2, "width": 64, "height": 64, "init_images": [png_b64()]}
    for field, value in [("init_images", []), ("init_images", ["not base64!!"]), ("init_images", [bomb_b64()]),
                         ("init_images", "x"), ("mask", "garbage"), ("mask", bomb_b64()),
                         ("denoising_strength", "x"), ("resize_mode", 9), ("inpainting_fill", 7),
                         ("mask_blur", -3), ("inpaint_full_res_padding", "x")]:
        cases.append(("POST", "/sdapi/v1/img2img", {**i2i, field: value}, field))
    for body in [{"image": "garbage"}, {"image": bomb_b64()}, {}]:
        cases.append(("POST", "/sdapi/v1/png-info", body, "image"))
    for body in [{"sd_model_checkpoint": 123}, {"sd_model_checkpoint": "../../etc/passwd"},
                 {"sd.sd_model_checkpoint": "../../etc/passwd"}, {"llm.repetition_penalty": 0}, {"llm.repetition_penalty": 11},
                 {"llm.temperature": "hot"}, {"no_such_option": 1}, {"CLIP_stop_at_last_layers": 0},
                 {"sd_vae": "../../x"}, {"llm.max_new_tokens": True}, [1, 2]]:
        key = next(iter(body)) if isinstance(body, dict) and body else ""
        cases.append(("POST", "/sdapi/v1/options", body, key))
    for field, value in [("temperature", 2.5), ("temperature", -1), ("top_p", 7), ("max_tokens", -1),
                         ("max_tokens", True), ("stop", ["a", "b", "c", "d", "e"]), ("n", 3),
                         ("tools", [{"type": "function", "function": {"name": "f"}}]),
                         ("response_format", {"type": "json_object"}), ("logit_bias", {"1": 5}),
                         ("model", "no-such-model"), ("messages", []), ("messages", "hi"),
                         ("messages", [{"role": "wizard", "content": "hi"}]), ("presence_penalty", 9),
                         ("frequency_penalty", "x"), ("seed", "x")]:
        cases.append(("POST", "/v1/chat/completions", {**chat, field: value}, field))
    cases.append(("POST", "/v1/chat/completions",
                  {**chat, "messages": [{"role": "user", "content": "a" * (1 << 20)}]}, "prompt"))
    for field, value in [("suffix", "x"), ("best_of", 3), ("echo", "x"), ("prompt", 5), ("temperature", 3),
                         ("logprobs", 5)]:
        cases.append(("POST", "/v1/completions", {**comp, field: value}, field))
    for method, path in [("GET", "/sdapi/v1/txt2img"), ("PUT", "/sdapi/v1/options"), ("DELETE", "/v1/models"),
                         ("GET", "/v1/chat/completions"), ("POST", "/sdapi/v1/sd-models")]:
        cases.append((method, path, None, ""))
    for path in ["/file=/etc/passwd", "/file=../settings.yaml", "/gradio_api/file=/etc/passwd",
                 "/file=models/LLM/tiny-llama-gqa/config.json", "/sdapi/v1/../../etc/passwd",
                 "/gradio_api/file=settings.yaml"]:
        cases.append(("GET", path, None, ""))
    return cases


def error_shape_ok(path: str, response: httpx.Response) -> bool:
    try:
        body = response.json()
    except ValueError:
        return path.startswith(("/file=", "/gradio_api/file=")) or response.status_code in (404, 405)
    if path.startswith("/v1/"):
        return isinstance(body, dict) and isinstance(body.get("error"), dict) and "message" in body["error"]
    return isinstance(body, dict) and ("error" in body or "detail" in body)


def warnings_of(response: httpx.Response) -> list[str]:
    """The ``warnings`` an A1111 image answer carries in its info JSON (empty for anything else)."""
    try:
        return [str(w) for w in json.loads(response.json().get("info", "{}")).get("warnings", [])]
    except (ValueError, AttributeError, TypeError):
        return []


def probe_bad_inputs(server, restart) -> dict:
    """Send every bad input; a dropped connection counts as a 5xx and the server is restarted if it died."""
    counts = {"tried": 0, "clear_4xx": 0, "warned": 0, "unclear_4xx": 0, "5xx": 0, "accepted": 0}
    problems = []
    for method, path, body, mention in bad_inputs():
        counts["tried"] += 1
        kwargs = {}
        if isinstance(body, (bytes, bytearray)):
            kwargs = {"content": body, "headers": {"content-type": "application/json"}}
        elif body is not None:
            kwargs = {"json": body}
        with httpx.Client(base_url=server.url, timeout=300) as client:
            try:
                response = client.request(method, path, **kwargs)
            except httpx.TransportError as exc:
                counts["5xx"] += 1
                problems.append(f"no answer ({type(exc).__name__}) {method} {path} {str(body)[:80]}")
                if server.process.poll() is not None:
                    problems.append(f"  the server died: {server.log()[-300:]}")
                    server = restart()
                continue
        status = response.status_code
        text = response.text
        if status >= 500:
            counts["5xx"] += 1
            problems.append(f"5xx {method} {path} {str(body)[:80]}: {text[:200]}")
        elif status < 400 and mention and mention in " ".join(warnings_of(response)):
            counts["warned"] += 1  # A1111's habit for an unknown <lora:...>: generate, and warn naming it
        elif status < 400:
            counts["accepted"] += 1
            problems.append(f"{status} {method} {path} {str(body)[:80]}")
        elif error_shape_ok(path, response) and (not mention or mention.lower() in text.lower()):
            counts["clear_4xx"] += 1
        else:
            counts["unclear_4xx"] += 1
            problems.append(f"unclear {status} {method} {path} {str(body)[:60]}: {text[:200]}")
    return {"counts": counts, "problems": problems, "server": server}


def break_model_folders(models: Path) -> int:
    """Add broken files of several kinds to every model folder; return how many were written."""
    rng = random.Random(7)
    good = (models / "Lora" / "tiny-sd15-kohya.safetensors").read_bytes()
    written = 0

    def crafted(header: object, tail: bytes = b"") -> bytes:
        raw = json.dumps(header).encode()
        return len(raw).to_bytes(8, "little") + raw + tail

    variants = {
        "random": bytes(rng.randrange(256) for _ in range(4096)),
        "huge-header": (1 << 60).to_bytes(8, "little") + b"{}",
        "trunc-prefix": good[:5],
        "trunc-header": good[:40],
        "trunc-data": good[: len(good) // 2],
        "offsets-short": crafted({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0]}}, b"\0" * 8),
        "offsets-beyond": crafted({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 4096]}}, b"\0" * 8),
        "bad-dtype": crafted({"w": {"dtype": "Q9", "shape": [2], "data_offsets": [0, 8]}}, b"\0" * 8),
        "bad-shape": crafted({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}}, b"\0" * 8),
        "not-json": (5).to_bytes(8, "little") + b"nope!",
        "json-list": crafted([1, 2, 3]),
    }
    for folder in ("Lora", "Stable-diffusion", "VAE", "embeddings"):
        for name, data in variants.items():
            (models / folder / f"aaa-broken-{name}.safetensors").write_bytes(data)
            written += 1
    llm_good = models / "LLM" / "tiny-llama-gqa"
    for name in ("random", "trunc-data", "offsets-short"):
        target = models / "LLM" / f"aaa-broken-{name}"
        shutil.copytree(llm_good, target)
        (target / "model.safetensors").write_bytes(variants[name])
        written += 1
    return written


def probe_corrupt_files(data_dir: Path) -> dict:
    written = break_model_folders(data_dir / "models")
    settings = data_dir / "settings.yaml"
    settings.write_text("sd:\n  sd_model_checkpoint: aaa-broken-offsets-short.safetensors\n", encoding="utf-8")
    server = start_server(data_dir, "--api")
    failures = []
    try:
        with httpx.Client(base_url=server.url, timeout=300) as client:
            checks = [("GET", "/sdapi/v1/sd-models", None), ("GET", "/sdapi/v1/loras", None),
                      ("GET", "/sdapi/v1/sd-vae", None), ("GET", "/sdapi/v1/embeddings", None),
                      ("GET", "/sdapi/v1/options", None), ("POST", "/sdapi/v1/refresh-checkpoints", None),
                      ("POST", "/sdapi/v1/refresh-loras", None), ("GET", "/v1/models", None),
                      ("POST", "/sdapi/v1/txt2img", {"prompt": "a cat <lora:tiny-sd15-kohya:0.8>", "steps": 2,
                                                      "width": 64, "height": 64,
                                                      "override_settings": {
                                                          "sd_model_checkpoint": "tiny-sd15.safetensors"}}),
                      ("POST", "/v1/chat/completions", {"model": "tiny-llama-gqa", "max_tokens": 4,
                                                        "messages": [{"role": "user", "content": "hi"}]})]
            for method, path, body in checks:
                try:
                    response = client.request(method, path, json=body)
                except httpx.TransportError as exc:
                    failures.append(f"{method} {path}: no answer ({type(exc).__name__})")
                    if server.process.poll() is not None:
                        failures.append(f"the server died: {server.log()[-300:]}")
                        return {"broken_files": written, "failures": failures}
                    continue
                if response.status_code != 200:
                    failures.append(f"{method} {path}: {response.status_code} {response.text[:200]}")
            models = client.get("/v1/models").json().get("data", [])
            if any("broken" in m.get("id", "") for m in models):
                failures.append("a broken LLM folder is listed as a usable model")
            options = client.get("/sdapi/v1/options").json()
            if "broken" in str(options.get("sd_model_checkpoint", "")):
                failures.append("a broken checkpoint is the selected checkpoint")
    finally:
        server.stop()
    return {"broken_files": written, "failures": failures}


def probe_concurrency(url: str, clients: int) -> dict:
    from openai import OpenAI

    n_chat = clients * 3 // 4
    n_image = clients - n_chat
    max_tokens = 160
    streaming = threading.Semaphore(0)  # released once per chat when its first tokens arrive
    results: dict[str, list] = {"chat": [], "image": []}
    errors: list[str] = []
    lock = threading.Lock()

    def chat(i: int) -> None:
        try:
            client = OpenAI(base_url=url + "/v1", api_key="x", timeout=600, max_retries=0)
            stream = client.chat.completions.create(
                model="tiny-llama-gqa", messages=[{"role": "user", "content": f"Tell me a story {i}"}],
                max_tokens=max_tokens, stream=True, temperature=0.8, seed=i,
                extra_body={"ignore_eos": True}, stream_options={"include_usage": True})
            finish, tokens, first = None, None, True
            for chunk in stream:
                if first and chunk.choices and chunk.choices[0].delta.content:
                    streaming.release()
                    first = False
                if chunk.choices and chunk.choices[0].finish_reason:
                    finish = chunk.choices[0].finish_reason
                if chunk.usage:
                    tokens = chunk.usage.completion_tokens
            with lock:
                results["chat"].append((finish, tokens))
        except Exception as exc:  # noqa: BLE001 - counted and reported
            with lock:
                errors.append(f"chat {i}: {type(exc).__name__}: {exc}")

    def image(i: int) -> None:
        try:
            response = httpx.post(url + "/sdapi/v1/txt2img", timeout=600,
                                  json={"prompt": f"a cat {i}", "steps": 8, "width": 64, "height": 64, "seed": i})
            with lock:
                if response.status_code != 200:
                    errors.append(f"image {i}: {response.status_code} {response.text[:200]}")
                else:
                    info = json.loads(response.json().get("info", "{}"))
                    results["image"].append(bool(info.get("interrupted")))
        except Exception as exc:  # noqa: BLE001
            with lock:
                errors.append(f"image {i}: {type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=chat, args=(i,)) for i in range(n_chat)]
    threads += [threading.Thread(target=image, args=(i,)) for i in range(n_image)]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for _ in range(n_chat):  # interrupt while every chat is streaming (and image jobs are queued or running)
        if not streaming.acquire(timeout=120):
            break
    interrupt = httpx.post(url + "/sdapi/v1/interrupt", timeout=30)
    for thread in threads:
        thread.join()
    cut = sum(1 for finish, tokens in results["chat"] if tokens != max_tokens or finish != "length")
    return {"clients": clients, "chats": n_chat, "images": n_image, "interrupt_status": interrupt.status_code,
            "lost": len(errors), "chats_cut": cut, "images_interrupted": sum(results["image"]), "seconds": round(time.monotonic() - start, 1),
            "errors": errors[:5]}


def probe_login(data_dir: Path) -> dict:
    chats = data_dir / "chats"
    chats.mkdir(exist_ok=True)
    chat_id = "chat-probe-5c1e"
    (chats / f"{chat_id}.json").write_text(json.dumps({"id": chat_id, "title": "probe", "messages": []}))
    (data_dir / "settings.yaml").write_text(f"llm:\n  system_prompt: \"{SECRET_PROMPT}\"\n", encoding="utf-8")
    server = start_server(data_dir, "--gradio-auth", "probe:secret", ready_path="/")
    secrets = ["tiny-llama-gqa", "tiny-sd15", "atelier-example", chat_id, "Zebulon-7731"]
    paths = ["/", "/config", "/info", "/gradio_api/info", "/gradio_api/config", "/theme.css", "/manifest.json",
             "/gradio_api/queue/status", "/gradio_api/startup-events", "/app_id", "/gradio_api/app_id",
             "/login_check", "/gradio_api/api_info", "/docs", "/openapi.json", "/sdapi/v1/sd-models", "/v1/models"]
    leaks = []
    try:
        with httpx.Client(base_url=server.url, timeout=60, follow_redirects=True) as client:
            for path in paths:
                response = client.get(path)
                found = [s for s in secrets if s in response.text]
                if found:
                    leaks.append(f"{path} ({response.status_code}): {', '.join(found)}")
            login = client.post("/login", data={"username": "probe", "password": "secret"})
            after = client.get("/")
            logged_in = login.status_code < 400 and "tiny-llama-gqa" in after.text
    finally:
        server.stop()
    return {"paths": len(paths), "leaks": leaks, "login_works": logged_in}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--clients", type=int, default=32)
    parser.add_argument("--only", choices=("bad", "corrupt", "concurrent", "login"), action="append",
                        help="run only these parts (repeatable; default: all)")
    args = parser.parse_args()
    parts = set(args.only or ("bad", "corrupt", "concurrent", "login"))
    from modules.fixtures import write_all

    root = Path(tempfile.mkdtemp(prefix="atelier-probe-"))
    try:
        base = root / "base"
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        write_all(str(base))
        rows, details = [], []
        if "bad" in parts:
            bad_dir = root / "bad"
            shutil.copytree(base, bad_dir)
            servers = [start_server(bad_dir, "--api")]

            def restart():
                servers.append(start_server(bad_dir, "--api"))
                return servers[-1]
            try:
                bad = probe_bad_inputs(servers[0], restart)
            finally:
                for server in servers:
                    server.stop()
            c = bad["counts"]
            rows.append(("bad inputs tried", c["tried"]))
            rows.append(("  answered with a clear 4xx", c["clear_4xx"]))
            rows.append(("  answered 200 with a warning naming it (A1111)", c["warned"]))
            rows.append(("  4xx without the field / error shape", c["unclear_4xx"]))
            rows.append(("  5xx", c["5xx"]))
            rows.append(("  accepted (2xx)", c["accepted"]))
            details += bad["problems"]
        if "corrupt" in parts:
            corrupt_dir = root / "corrupt"
            shutil.copytree(base, corrupt_dir)
            corrupt = probe_corrupt_files(corrupt_dir)
            rows.append(("broken model files written", corrupt["broken_files"]))
            rows.append(("  listing/refresh/generation failures", len(corrupt["failures"])))
            details += corrupt["failures"]
        if "concurrent" in parts:
            conc_dir = root / "concurrent"  # a fresh data dir: nothing the bad inputs did carries over
            shutil.copytree(base, conc_dir)
            server = start_server(conc_dir, "--api")
            try:
                conc = probe_concurrency(server.url, args.clients)
            finally:
                server.stop()
            rows.append((f"concurrent clients ({conc['chats']} chats, {conc['images']} txt2img)", conc["clients"]))
            rows.append(("  interrupt answered", conc["interrupt_status"]))
            rows.append(("  jobs lost", conc["lost"]))
            rows.append(("  chats cut short by the image interrupt", conc["chats_cut"]))
            rows.append(("  image jobs interrupted (A1111: the current one)", conc["images_interrupted"]))
            rows.append(("  wall seconds", conc["seconds"]))
            details += conc["errors"]
        if "login" in parts:
            login_dir = root / "login"
            shutil.copytree(base, login_dir)
            login = probe_login(login_dir)
            rows.append(("routes fetched before login", login["paths"]))
            rows.append(("  routes leaking names/prompts/ids", len(login["leaks"])))
            rows.append(("  login then app works", login["login_works"]))
            details += login["leaks"]
        width = max(len(r[0]) for r in rows)
        print(f"| {'probe'.ljust(width)} | result |")
        print(f"|{'-' * (width + 2)}|--------|")
        for name, value in rows:
            print(f"| {name.ljust(width)} | {value} |")
        if details:
            print("\nDetails:")
            for line in details:
                print(" -", line)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()

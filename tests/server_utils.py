"""Start the real server (``python launch.py``) in a subprocess for API and browser tests."""
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@dataclass
class Server:
    process: subprocess.Popen
    url: str
    log_path: Path

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(5)

    def log(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")


def start_server(data_dir: str | os.PathLike, *extra_args: str, timeout: float = 90,
                 ready_path: str = "/internal/ping", auth: tuple[str, str] | None = None) -> Server:
    """Run ``launch.py --skip-install --data-dir DATA_DIR --port FREE *extra_args`` and wait until it answers."""
    port = free_port()
    log_path = Path(data_dir) / f"server-{port}.log"
    Path(data_dir).mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    with open(log_path, "w", encoding="utf-8") as log_file:
        process = subprocess.Popen(
            [sys.executable, str(REPO / "launch.py"), "--skip-install", "--data-dir", str(data_dir),
             "--port", str(port), *extra_args],
            cwd=REPO, stdout=log_file, stderr=subprocess.STDOUT, env=env)
    server = Server(process, f"http://127.0.0.1:{port}", log_path)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server exited with {process.returncode}:\n{server.log()}")
        try:
            response = httpx.get(server.url + ready_path, timeout=2, auth=auth)
            if response.status_code < 500:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    server.stop()
    raise RuntimeError(f"server did not answer within {timeout}s:\n{server.log()}")


@contextlib.contextmanager
def open_page(url: str, *, width: int = 1400, height: int = 1000, timeout_ms: int = 120_000):
    """Debian's Chromium, headless, driven by Playwright (never ``playwright install``), on *url* once the
    page has loaded. Timeouts are generous: CI machines have two busy cores."""
    from playwright.sync_api import sync_playwright
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=chromium_path(), args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(timeout_ms)
            page.goto(url, wait_until="load", timeout=2 * timeout_ms)
            page.wait_for_selector("#tabs", timeout=2 * timeout_ms)
            yield page
        finally:
            browser.close()


def chromium_path() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if not path:
        raise RuntimeError("Debian's chromium is needed for browser tests: apt-get install -y chromium "
                           "(python launch.py --run-tests installs it when run as root)")
    return path

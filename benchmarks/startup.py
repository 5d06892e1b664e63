"""Time from `python launch.py --skip-install` to the first HTTP 200 on `/` (target: under 8 s on 2 CPU cores).

    python benchmarks/startup.py [--runs 3] [--data-dir DIR] [-- extra launch.py flags]

Prints a table of each run and the median. Models load lazily on first use, so start-up does not depend
on how many models are in the data dir.
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))
from server_utils import free_port  # noqa: E402


def one_run(data_dir: str, extra: list[str]) -> float:
    port = free_port()
    started = time.perf_counter()
    proc = subprocess.Popen([sys.executable, str(REPO / "launch.py"), "--skip-install", "--data-dir", data_dir,
                             "--port", str(port), *extra], cwd=REPO, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    try:
        while True:
            if proc.poll() is not None:
                raise SystemExit(f"launch.py exited with {proc.returncode}")
            try:
                if httpx.get(f"http://127.0.0.1:{port}/", timeout=1).status_code == 200:
                    return time.perf_counter() - started
            except httpx.HTTPError:
                pass
            time.sleep(0.02)
    finally:
        proc.terminate()
        proc.wait(10)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--data-dir", default=None, help="data dir to start with (default: a fresh temporary one)")
    args, extra = parser.parse_known_args()
    extra = [a for a in extra if a != "--"]
    data_dir = args.data_dir or tempfile.mkdtemp(prefix="atelier-startup-")
    one_run(data_dir, extra)  # warm-up: first start compiles .pyc files and fills the OS cache
    times = [one_run(data_dir, extra) for _ in range(args.runs)]
    print(f"{'run':>4} | {'seconds to first 200 on /':>26}")
    print("-" * 33)
    for i, t in enumerate(times, 1):
        print(f"{i:>4} | {t:>26.2f}")
    median = statistics.median(times)
    print(f"{'med':>4} | {median:>26.2f}   target < 8.00 s: {'PASS' if median < 8 else 'FAIL'}")


if __name__ == "__main__":
    main()

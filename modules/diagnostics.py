"""The system report shown on the Troubleshooting tab and printed by ``launch.py --diagnose``."""
from __future__ import annotations

import importlib.metadata
import importlib.util
import platform
import shutil
import sys
from typing import Any

from modules.logging_setup import log_tail
from modules.paths import MODEL_FOLDERS

KEY_PACKAGES = ("torch", "gradio", "fastapi", "uvicorn", "transformers", "diffusers", "safetensors", "peft",
                "accelerate", "tokenizers", "sentencepiece", "protobuf", "gguf", "llama-cpp-python", "xformers",
                "numpy", "pillow")

MODEL_SUFFIXES = {".safetensors", ".ckpt", ".bin", ".pt", ".gguf", ".pth"}


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _llama_cpp() -> str:
    """llama-cpp-python's version and the CPU features of its llama.cpp build (loads its library)."""
    from modules.llm.llamacpp_backend import llama_cpp_report
    return llama_cpp_report()


def _gib(n: int | float) -> str:
    return f"{n / 1024 ** 3:.1f} GiB"


def _devices() -> list[str]:
    import psutil
    import torch
    rows = [f"cpu: {platform.processor() or platform.machine()}, {psutil.cpu_count(logical=True)} threads, "
            f"RAM {_gib(psutil.virtual_memory().total)} total, {_gib(psutil.virtual_memory().available)} available"]
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            free, total = torch.cuda.mem_get_info(i)
            rows.append(f"cuda:{i}: {torch.cuda.get_device_name(i)}, {_gib(total)} total, {_gib(free)} free")
    if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
        rows.append("mps: available")
    return rows


def _model_files(paths) -> dict[str, list[str]]:
    found = {}
    for kind in MODEL_FOLDERS:
        folder = paths.model_dir(kind)
        items = []
        if folder.is_dir():
            for entry in sorted(folder.iterdir()):
                if entry.name.startswith("."):
                    continue
                if entry.is_dir() or entry.suffix.lower() in MODEL_SUFFIXES:
                    items.append(entry.name + ("/" if entry.is_dir() else ""))
        found[kind] = items
    return found


def collect(ctx: Any = None, paths: Any = None) -> dict[str, Any]:
    """Gather the report as a dict. Works with a full app context or just the paths (for --diagnose)."""
    import torch
    paths = paths or (ctx.paths if ctx is not None else None)
    report: dict[str, Any] = {
        "os": f"{platform.system()} {platform.release()} ({platform.platform()})",
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "cuda": torch.version.cuda or "none (CPU build of torch)",
        "devices": _devices(),
        "xformers": "available" if importlib.util.find_spec("xformers") else "not installed",
        "llama.cpp": _llama_cpp(),
        "packages": {name: _version(name) for name in KEY_PACKAGES},
    }
    if ctx is not None:
        report["attention backend"] = ctx.devices.attention_report()
        report["selected device"] = ctx.devices.describe()
        report["loaded models"] = ctx.models.loaded()
    if paths is not None:
        usage = shutil.disk_usage(paths.data_dir)
        report["data dir"] = str(paths.data_dir)
        report["free disk"] = f"{_gib(usage.free)} free of {_gib(usage.total)}"
        report["model files"] = _model_files(paths)
    if ctx is not None and ctx.extensions is not None:
        report["extensions"] = [
            {"name": e["name"], "state": e["state"], "errors": e["errors"]} for e in ctx.extensions.describe()]
        report["callback errors"] = [f"{e.owner}: {e.callback}: {e.message}" for e in ctx.callbacks.errors]
    if ctx is not None and ctx.settings.load_error:
        report["settings"] = ctx.settings.load_error
    report["log (last 200 lines)"] = log_tail()
    return report


def render(report: dict[str, Any]) -> str:
    """Plain text, easy to paste into a bug report."""
    lines = ["# Atelier diagnostics"]
    for key, value in report.items():
        if isinstance(value, dict):
            lines.append(f"{key}:")
            for k, v in value.items():
                lines.append(f"  {k}: {', '.join(v) if isinstance(v, list) else v}")
        elif isinstance(value, list):
            lines.append(f"{key}:" + ("" if value else " none"))
            lines.extend(f"  {item}" for item in value)
        else:
            lines.append(f"{key}: {value}")
    return "\n".join(lines)

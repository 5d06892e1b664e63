"""The A1111-compatible routes every Atelier server has, whatever capabilities are present."""
from __future__ import annotations

import base64
import io
from typing import Any

import psutil
import torch
from fastapi import APIRouter, Body, Request

from modules.api.errors import sdapi_error
from modules.api.options import plan_options
from modules.job_owner import api_owner


def _png_b64(image: Any) -> str | None:
    if image is None:
        return None
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return base64.b64encode(buf.getvalue()).decode()


def _json_safe(value: Any) -> Any:
    if isinstance(value, (str, int, float, bool)) or value is None:
        return value
    if isinstance(value, (list, tuple)):
        return [_json_safe(v) for v in value]
    return str(value)


def build_core_router(ctx) -> APIRouter:
    router = APIRouter()

    @router.get("/sdapi/v1/options", tags=["settings"])
    def get_options() -> dict[str, Any]:
        options = ctx.settings.as_dict()
        for name, option in ctx.api.options.items():
            options[name] = option.get()
        return options

    @router.post("/sdapi/v1/options", tags=["settings"])
    def set_options(req: dict[str, Any] = Body(...)) -> Any:
        """Validate every key first, then apply all of them or none (A1111 applies the valid half)."""
        plan = plan_options(ctx, req)
        if plan.errors:
            status = 422 if plan.type_errors else 400
            names = ", ".join(sorted(plan.errors))
            return sdapi_error(status, "Invalid options", "option(s) not applied, nothing changed: "
                               + "; ".join(f"{k}: {v}" for k, v in plan.errors.items())
                               + f". GET /sdapi/v1/options lists the valid names and values ({names}).",
                               errors=plan.errors)
        before = {key: ctx.settings.get(key) for key in ctx.settings.as_dict()}
        try:
            ctx.settings.update(plan.settings)
            for name, option, value in plan.options:
                if not option.read_only:  # a read-only option was only accepted because it equals its value
                    option.set(value)
        except Exception as exc:  # noqa: BLE001 - applying failed (e.g. the checkpoint does not load): undo
            ctx.settings.update({k: v for k, v in before.items() if ctx.settings.get(k) != v})
            return _apply_failure(exc)
        ctx.settings.save()
        return get_options()

    @router.get("/sdapi/v1/cmd-flags", tags=["settings"])
    def cmd_flags() -> dict[str, Any]:
        hidden = {"gradio_auth", "api_auth"}  # never echo credentials
        return {k: ("***" if k in hidden and v else _json_safe(v)) for k, v in vars(ctx.opts).items()}

    def owner(request: Request) -> str:
        return api_owner(request.headers, api_auth=bool(ctx.opts.api_auth))

    def image_jobs(request: Request) -> list:
        """The caller's unfinished image jobs, running first: A1111's progress, interrupt and skip are
        about image generation, never chats, and here never another owner's images."""
        return ctx.diffusion.jobs_of(owner(request)) if ctx.diffusion is not None else []

    @router.get("/sdapi/v1/progress", tags=["jobs"])
    def progress(request: Request, skip_current_image: bool = False) -> dict[str, Any]:
        jobs = image_jobs(request)
        job = next((j for j in jobs if j.state == "running"), None)
        waiting = len(jobs) - (job is not None)
        if job is None:
            return {"progress": 0.0, "eta_relative": 0.0, "textinfo": None, "current_image": None,
                    "state": {"skipped": False, "interrupted": False, "job": "", "job_count": waiting,
                              "job_timestamp": "0", "job_no": 0, "sampling_step": 0, "sampling_steps": 0}}
        p = job.progress
        return {
            "progress": p.fraction, "eta_relative": p.eta or 0.0, "textinfo": p.text or None,
            "current_image": None if skip_current_image else _png_b64(p.preview),
            "state": {"skipped": job.skipped, "interrupted": job.interrupted, "job": job.name,
                      "job_count": waiting + 1, "job_timestamp": str(int(job.started or 0)), "job_no": 0,
                      "sampling_step": p.step, "sampling_steps": p.total},
        }

    @router.post("/sdapi/v1/interrupt", tags=["jobs"])
    def interrupt(request: Request) -> dict[str, Any]:
        """Stop the caller's running image generation (as A1111 does; its queued requests still run)."""
        done = ctx.diffusion.interrupt(owner(request)) if ctx.diffusion is not None else False
        return {"interrupted": done}

    @router.post("/sdapi/v1/skip", tags=["jobs"])
    def skip(request: Request) -> dict[str, Any]:
        """Skip the current batch of the caller's running image generation."""
        return {"skipped": ctx.diffusion.skip(owner(request)) if ctx.diffusion is not None else False}

    @router.get("/sdapi/v1/memory", tags=["system"])
    def memory() -> dict[str, Any]:
        vm = psutil.virtual_memory()
        result: dict[str, Any] = {
            "ram": {"free": vm.available, "used": vm.total - vm.available, "total": vm.total},
            "models": ctx.models.memory_report(),
        }
        if torch.cuda.is_available():
            free, total = torch.cuda.mem_get_info()
            stats = torch.cuda.memory_stats()
            result["cuda"] = {"system": {"free": free, "used": total - free, "total": total},
                              "active": {"current": stats.get("active_bytes.all.current", 0),
                                         "peak": stats.get("active_bytes.all.peak", 0)}}
        else:
            result["cuda"] = {"error": "no CUDA device"}
        return result

    @router.get("/sdapi/v1/extensions", tags=["extensions"])
    def extensions() -> list[dict[str, Any]]:
        items = ctx.extensions.describe() if ctx.extensions is not None else []
        return [{"name": e["name"], "remote": "", "branch": "", "commit_hash": "", "version": "",
                 "commit_date": 0, "enabled": e["enabled"], "state": e["state"], "errors": e["errors"],
                 "source": e["source"]} for e in items]

    return router


def _apply_failure(exc: Exception):
    """A change that validated but could not be applied (the model file fails to load): nothing was kept."""
    from modules.api.client_errors import classify
    status, error, detail = classify(exc)
    if status >= 500:
        import logging
        logging.getLogger(__name__).exception("applying options failed")
    return sdapi_error(status, error, f"{detail} The previous options are kept.")

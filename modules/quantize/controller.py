"""The Quantize tab's logic, without Gradio: pick a model and formats, run the report on the job queue,
read its progress and table back, load a row's model in Chat.

The report (:func:`modules.quantize.report.run_report`) is device work, so it is one job on the shared
queue (kind ``"quantize"``): it waits for generations and trainings ahead of it and they wait for it.
Only one report runs at a time from this tab; its state lives in this controller (one per app), so a page
reload mid-run finds the same job again.
"""
from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, Sequence

from modules.quantize.report import (COLUMNS, DEFAULT_FORMATS, TORCH_FORMATS, QuantizeReport, known_formats,
                                     run_report)

JOB_KIND = "quantize"


class QuantizeTabError(ValueError):
    """Something the user can fix (no model chosen, a report already running); shown as the message."""


@dataclass
class QuantizeView:
    """What the tab shows: a progress line, the table, the models it made and a message."""
    running: bool
    fraction: float = 0.0
    progress_line: str = ""
    rows: list[list[Any]] = field(default_factory=list)
    loadable: list[str] = field(default_factory=list)
    markdown: str = ""
    message: str = ""


class QuantizeController:
    def __init__(self, ctx: Any):
        self.ctx = ctx
        self._lock = threading.Lock()
        self._job: Any = None
        self._last: QuantizeReport | None = None

    # -- choices -------------------------------------------------------------------------------------------
    def source_choices(self) -> list[str]:
        """The models of models/LLM that load: Hugging Face folders, and GGUF files (re-exported into other
        types and measured against their own weights dequantized)."""
        if self.ctx.llm is None:
            return []
        return self.ctx.llm.model_names()

    @staticmethod
    def format_choices() -> list[str]:
        return known_formats()

    @staticmethod
    def default_formats() -> list[str]:
        return [f for f in DEFAULT_FORMATS if f in known_formats()]

    @staticmethod
    def columns() -> list[str]:
        return list(COLUMNS)

    # -- running -------------------------------------------------------------------------------------------
    def start(self, source: str | None, formats: Sequence[str] | None, overwrite: bool = False) -> QuantizeView:
        """Queue a report for *source* in *formats*; raises QuantizeTabError for what the user can fix."""
        if self.ctx.llm is None:
            raise QuantizeTabError("The Chat capability is not loaded, so there is no models/LLM list.")
        if not source:
            raise QuantizeTabError("Choose a model to quantize.")
        if source not in self.source_choices():
            raise QuantizeTabError(f"{source!r} is not a loadable model folder in models/LLM; press Refresh.")
        formats = [f for f in (formats or [])]
        if not formats:
            raise QuantizeTabError("Tick at least one target format.")
        unknown = [f for f in formats if f not in known_formats()]
        if unknown:
            raise QuantizeTabError(f"Unknown format(s): {', '.join(unknown)}.")
        with self._lock:
            if self._job is not None and not self._job.done:
                raise QuantizeTabError("A quantize report is already running; wait for it or press Stop.")
            models_dir = self.ctx.llm.models_dir
            threads = self.ctx.devices.cpu_threads or 2

            def work(job: Any) -> QuantizeReport:
                extra = self.ctx.llm.llama_cpp_extra_buffers() if any(f not in TORCH_FORMATS for f in formats) else False
                return run_report(models_dir, source, formats, threads=threads, overwrite=bool(overwrite),
                                  extra_buffers=extra,
                                  models=self.ctx.models, check_interrupted=job.check_interrupted,
                                  progress=lambda fraction, text: job.report(int(fraction * 1000), 1000, text=text))

            self._job = self.ctx.jobs.submit(work, name=f"quantize {source}: {', '.join(formats)}", kind=JOB_KIND)
        return self.view()

    def stop(self) -> str:
        with self._lock:
            job = self._job
        if job is None or job.done:
            return "No quantize report is running."
        job.interrupt()
        return "Stopping after the current step (a file being written is finished or removed, never left half)."

    def view(self) -> QuantizeView:
        """The current job's progress, or the last finished report's table."""
        with self._lock:
            job = self._job
        if job is None:
            return self._report_view(self._last, "")
        if not job.done:
            p = job.progress
            fraction = p.step / p.total if p.total else 0.0
            line = f"{p.text or 'waiting for the device queue'} ({fraction * 100:.0f}%)"
            if job.state == "queued":
                line = "Queued: waiting for the device queue (a reply or a training ahead of it)."
            return QuantizeView(True, fraction, line, *self._table(self._last))
        if job.state == "interrupted":
            return self._report_view(self._last, "Report stopped; the formats finished before Stop are in models/LLM.")
        if job.state == "failed":
            return self._report_view(self._last, f"Report failed: {job.error}")
        self._last = job.result()
        return self._report_view(self._last, f"Done: {len(self._last.rows)} format(s) written into models/LLM.")

    def _report_view(self, report: QuantizeReport | None, message: str) -> QuantizeView:
        rows, loadable, markdown = self._table(report)
        return QuantizeView(False, 1.0 if report else 0.0, "", rows, loadable, markdown, message)

    @staticmethod
    def _table(report: QuantizeReport | None) -> tuple[list[list[Any]], list[str], str]:
        if report is None:
            return [], [], ""
        return report.table_rows(), [report.reference.model] + [r.model for r in report.rows], report.markdown()

    # -- using a row ---------------------------------------------------------------------------------------
    def load_in_chat(self, name: str | None) -> str:
        """Load model *name* (a row of the table) so the Chat tab replies with it; returns a message."""
        if not name:
            raise QuantizeTabError("Choose a row's model to load.")
        if self.ctx.llm is None:
            raise QuantizeTabError("The Chat capability is not loaded.")
        try:
            info = self.ctx.llm.load(name)
        except Exception as exc:  # noqa: BLE001 - any load failure is shown; the app keeps serving
            raise QuantizeTabError(f"Could not load {name}: {exc}") from exc
        return f"Loaded {name} in Chat ({info.get('backend', 'atelier')}, {info.get('memory_mb')} MB)."

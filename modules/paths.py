"""Every path Atelier reads or writes is resolved here.

Why one module: users point ``--data-dir`` at a disk of their choosing and
expect that nothing is written anywhere else. Code asks ``Paths`` for a folder
by purpose instead of joining strings, and ``Paths.inside_data`` is the single
check used before serving or writing a file.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

REPO_DIR = Path(__file__).resolve().parent.parent

#: Model folders A1111 users expect, plus ``LLM`` for language models.
MODEL_FOLDERS = ("Stable-diffusion", "Lora", "VAE", "embeddings", "LLM", "ESRGAN")


class DataDirError(RuntimeError):
    """The data dir cannot be created or written to."""


@dataclass
class Paths:
    data_dir: Path
    models_dir: Path
    #: per-folder overrides (``--ckpt-dir`` and friends); keys are MODEL_FOLDERS names.
    model_overrides: dict[str, Path] = field(default_factory=dict)

    @classmethod
    def from_options(cls, data_dir: str | os.PathLike | None = None, models_dir: str | None = None,
                     ckpt_dir: str | None = None, lora_dir: str | None = None, llm_dir: str | None = None,
                     vae_dir: str | None = None, embeddings_dir: str | None = None) -> "Paths":
        data = Path(data_dir).expanduser().resolve() if data_dir else REPO_DIR
        models = Path(models_dir).expanduser().resolve() if models_dir else data / "models"
        overrides = {}
        for name, value in (("Stable-diffusion", ckpt_dir), ("Lora", lora_dir), ("LLM", llm_dir),
                            ("VAE", vae_dir), ("embeddings", embeddings_dir)):
            if value:
                overrides[name] = Path(value).expanduser().resolve()
        return cls(data_dir=data, models_dir=models, model_overrides=overrides)

    # -- folders by purpose -------------------------------------------------
    def model_dir(self, kind: str) -> Path:
        """Folder for one model kind, e.g. ``model_dir("LLM")``."""
        if kind not in MODEL_FOLDERS:
            raise ValueError(f"unknown model folder {kind!r}; expected one of {', '.join(MODEL_FOLDERS)}")
        return self.model_overrides.get(kind, self.models_dir / kind)

    @property
    def outputs_dir(self) -> Path:
        return self.data_dir / "outputs"

    @property
    def user_extensions_dir(self) -> Path:
        return self.data_dir / "extensions"

    @property
    def repo_extensions_dir(self) -> Path:
        return REPO_DIR / "extensions"

    @property
    def repo_scripts_dir(self) -> Path:
        """Built-in UI scripts (X/Y/Z plot, ...), written against the public Script API."""
        return REPO_DIR / "scripts"

    @property
    def settings_file(self) -> Path:
        return self.data_dir / "settings.yaml"

    @property
    def logs_dir(self) -> Path:
        return self.data_dir / "logs"

    @property
    def chats_dir(self) -> Path:
        return self.data_dir / "chats"

    @property
    def cache_dir(self) -> Path:
        """Small caches (model hashes); safe to delete."""
        return self.data_dir / "cache"

    @property
    def tmp_dir(self) -> Path:
        """Scratch space for uploads and atomic writes (inside the data dir)."""
        return self.data_dir / "cache" / "tmp"

    # -- checks ---------------------------------------------------------------
    def inside_data(self, path: str | os.PathLike) -> bool:
        """True when *path* (after resolving links and ``..``) lies in the data dir."""
        return _is_within(Path(path), self.data_dir)

    def resolve_in_data(self, relative: str | os.PathLike) -> Path:
        """Join *relative* onto the data dir and refuse anything that escapes it."""
        candidate = (self.data_dir / relative).resolve()
        if not _is_within(candidate, self.data_dir):
            raise ValueError(f"path {str(relative)!r} leaves the data dir {self.data_dir}")
        return candidate

    def ensure(self) -> None:
        """Create the data-dir layout; raise DataDirError with a clear message when impossible."""
        try:
            for folder in [self.data_dir, self.models_dir, *(self.model_dir(k) for k in MODEL_FOLDERS),
                           self.outputs_dir, self.logs_dir, self.chats_dir, self.cache_dir, self.tmp_dir]:
                folder.mkdir(parents=True, exist_ok=True)
            probe = self.data_dir / ".atelier-write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise DataDirError(
                f"The data dir {self.data_dir} is not writable ({exc.strerror or exc}). "
                "Pick a folder you can write to with --data-dir PATH, or fix its permissions."
            ) from exc


def _is_within(path: Path, root: Path) -> bool:
    try:
        path.resolve().relative_to(root.resolve())
        return True
    except ValueError:
        return False

import os

import pytest

from modules.paths import DataDirError, Paths


def test_layout_created_inside_data_dir(tmp_path):
    p = Paths.from_options(tmp_path / "d")
    p.ensure()
    for kind in ("Stable-diffusion", "Lora", "VAE", "embeddings", "LLM"):
        assert p.model_dir(kind).is_dir() and p.inside_data(p.model_dir(kind))
    for folder in (p.outputs_dir, p.logs_dir, p.chats_dir, p.cache_dir):
        assert p.inside_data(folder)


def test_escapes_are_refused(tmp_path):
    p = Paths.from_options(tmp_path)
    with pytest.raises(ValueError, match="leaves the data dir"):
        p.resolve_in_data("../etc/passwd")
    assert not p.inside_data("/etc/passwd")
    assert p.inside_data(p.resolve_in_data("outputs/a.png"))
    link = tmp_path / "link"
    os.symlink("/etc", link)
    assert not p.inside_data(link / "passwd"), "symlinks are resolved before the check"


def test_overrides(tmp_path):
    p = Paths.from_options(tmp_path, ckpt_dir=str(tmp_path / "ck"), llm_dir=str(tmp_path / "llm"))
    assert p.model_dir("Stable-diffusion") == tmp_path / "ck" and p.model_dir("LLM") == tmp_path / "llm"
    with pytest.raises(ValueError):
        p.model_dir("nope")


def test_unwritable_data_dir(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("a file where the data dir should be")
    with pytest.raises(DataDirError, match="--data-dir"):
        Paths.from_options(blocker / "data").ensure()


def test_app_writes_only_inside_data_dir(make_ctx, tmp_path):
    data = tmp_path / "data"
    ctx = make_ctx(data_dir=data)
    ctx.settings.set("ui.theme", "dark")
    ctx.settings.save()
    import logging
    logging.getLogger("atelier").info("hello")
    assert (data / "settings.yaml").exists() and (data / "logs" / "atelier.log").exists()
    outside = [p for p in tmp_path.iterdir() if p != data]
    assert outside == []

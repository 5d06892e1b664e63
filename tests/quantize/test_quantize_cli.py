"""``python -m modules.quantize export``: default names in models/LLM, progress and figures, errors as exit 2."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from modules.fixtures.llm import _CORPUS, FIXTURE_MODELS, write_model
from modules.quantize.cli import main

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    data = tmp_path_factory.mktemp("data")
    write_model(data / "models" / "LLM" / "tiny", FIXTURE_MODELS["tiny-llama-gqa"])
    return data


def test_export_writes_models_llm_name_type_gguf_and_reports_it(data_dir, capsys):
    pytest.importorskip("llama_cpp")
    argv = ["export", "tiny", "--type", "q8_0", "--data-dir", str(data_dir), "--threads", "1"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    path = data_dir / "models" / "LLM" / "tiny.Q8_0.gguf"
    assert path.read_bytes()[:4] == b"GGUF"
    assert "writing: 100%" in out and "quantizing: 100%" in out
    assert f"Wrote {path}: " in out and "Q8_0, " in out and "bits/weight over the matrices" in out
    # the same again: refused, the file kept
    before = path.stat().st_mtime_ns
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "already exists; pass --overwrite" in err and "Traceback" not in err
    assert path.stat().st_mtime_ns == before
    assert main([*argv, "--overwrite"]) == 0
    assert sorted(p.name for p in path.parent.iterdir()) == ["tiny", "tiny.Q8_0.gguf"]


def test_out_and_a_model_given_by_path(data_dir, tmp_path, capsys):
    out = tmp_path / "mine.gguf"
    assert main(["export", str(data_dir / "models" / "LLM" / "tiny"), "--type", "F16", "--out", str(out)]) == 0
    assert out.is_file() and "F16, 16.00 bits/weight over the matrices" in capsys.readouterr().out


def test_bad_input_exits_2_with_the_message(data_dir, tmp_path, capsys):
    cases = [
        (["export", "nope", "--type", "F16"], "MODEL 'nope': no such model folder.*models there: tiny"),
        (["export", "tiny", "--type", "Q9"], "Unknown GGUF type 'Q9'; known types: F32, F16"),
        (["export", "tiny", "--type", "IQ2_XXS"], "IQ2_XXS needs an importance matrix.*--imatrix-text"),
        (["export", "tiny", "--type", "Q4_0", "--imatrix-text", str(tmp_path / "none.txt")], "no such file"),
        (["export", "tiny", "--type", "Q4_0", "--threads", "-1"], "--threads must be 0"),
    ]
    import re
    for argv, pattern in cases:
        assert main([*argv, "--data-dir", str(data_dir)]) == 2, argv
        err = capsys.readouterr().err
        assert re.search(pattern, err, re.S), (argv, err)
        assert err.startswith("export: error: ") and "Traceback" not in err
    assert sorted(p.name for p in (data_dir / "models" / "LLM").iterdir() if not p.name.startswith("tiny.")) == ["tiny"]


def test_imatrix_text_is_computed_and_used(data_dir, tmp_path, capsys):
    pytest.importorskip("llama_cpp")
    text = tmp_path / "calibration.txt"
    text.write_text(_CORPUS * 2, encoding="utf-8")
    out = tmp_path / "iq.gguf"
    assert main(["export", "tiny", "--type", "IQ2_XXS", "--imatrix-text", str(text), "--out", str(out),
                 "--data-dir", str(data_dir), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "importance matrix: " in printed and " tokens in " in printed and out.is_file()


def test_python_m_modules_quantize_runs_and_lists_the_types():
    done = subprocess.run([sys.executable, "-m", "modules.quantize", "export", "--help"], cwd=REPO,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0
    assert "Q4_K_M" in done.stdout and "IQ2_XXS" in done.stdout and "<MODEL>.<TYPE>.gguf" in done.stdout

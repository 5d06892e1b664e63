"""The quantize report (what the Quantize tab and ``python -m modules.quantize report`` show): files written
into models/LLM, measured against the fp32 model; the tab's controller on the job queue; the CLI."""
from __future__ import annotations

import shutil
import subprocess
import sys
import time

import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is a requirement; its build is broken here")

from modules.quantize.report import QuantizeError, model_stem, output_path, run_report  # noqa: E402

MODEL = "tiny-llama-gqa"


@pytest.fixture
def llm_dir(tmp_path):
    from modules.fixtures import llm as fixture
    fixture.write(tmp_path / "data")
    return tmp_path / "data" / "models" / "LLM"


def test_report_writes_each_format_and_measures_it_against_fp32(llm_dir):
    seen = []
    report = run_report(llm_dir, MODEL, ["F16", "Q8_0", "int8"], threads=2, max_new_tokens=12,
                        progress=lambda fraction, text: seen.append((fraction, text)), extra_buffers=False)
    assert [r.format for r in report.rows] == ["F16", "Q8_0", "int8"]
    f16, q8, int8 = report.rows
    assert (llm_dir / f"{MODEL}.F16.gguf").is_file() and (llm_dir / f"{MODEL}.Q8_0.gguf").is_file()
    assert (llm_dir / f"{MODEL}-int8" / "config.json").is_file()
    assert f16.backend == q8.backend == "llama.cpp" and int8.backend == "atelier"
    # F16 of a model whose weights are fp32: perplexity and greedy replies as the reference, to rounding
    assert abs(f16.ppl_change) < 0.01 and f16.agreement >= 0.9
    assert 15.5 < f16.bits_per_weight < 17 and 7.5 < q8.bits_per_weight < 12
    assert q8.size_bytes < f16.size_bytes < report.reference.size_bytes
    for row in report.rows:
        assert row.ppl > 1 and row.decode_tps > 0 and row.prefill_tps > 0 and 0 <= row.agreement <= 1
    assert report.reference.ppl_change == 0 and report.heldout_tokens > 100
    assert seen[-1] == (1.0, "done") and any("Q8_0: evaluating" in text for _, text in seen)
    assert [f for f, _ in seen] == sorted(f for f, _ in seen)
    table = report.markdown()
    assert "| Q8_0 |" in table and "perplexity" in table


def test_existing_files_are_measured_not_replaced_unless_asked(llm_dir):
    first = run_report(llm_dir, MODEL, ["Q8_0"], threads=1, max_new_tokens=4, extra_buffers=False)
    target = llm_dir / f"{MODEL}.Q8_0.gguf"
    stamp = target.stat().st_mtime_ns
    again = run_report(llm_dir, MODEL, ["Q8_0"], threads=1, max_new_tokens=4, extra_buffers=False)
    assert target.stat().st_mtime_ns == stamp and "existing file" in again.rows[0].note
    assert again.rows[0].ppl == pytest.approx(first.rows[0].ppl)
    time.sleep(0.01)
    rewritten = run_report(llm_dir, MODEL, ["Q8_0"], threads=1, max_new_tokens=4, overwrite=True,
                           extra_buffers=False)
    assert target.stat().st_mtime_ns != stamp and rewritten.rows[0].note == ""


def test_bad_requests_get_clear_errors(llm_dir):
    with pytest.raises(QuantizeError, match="unknown format.*Q9_9.*known: F32"):
        run_report(llm_dir, MODEL, ["Q9_9"])
    with pytest.raises(QuantizeError, match="choose at least one format"):
        run_report(llm_dir, MODEL, [])
    with pytest.raises(QuantizeError, match="no model 'nope'"):
        run_report(llm_dir, "nope", ["Q8_0"])


def test_output_names_follow_the_model_not_the_source_file(tmp_path):
    assert model_stem("SmolLM2-135M-Instruct.Q4_1.gguf") == "SmolLM2-135M-Instruct"
    assert model_stem("my.model.gguf") == "my.model" and model_stem("folder") == "folder"
    assert output_path(tmp_path, "SmolLM2-135M-Instruct.Q4_1.gguf", "Q8_0").name == "SmolLM2-135M-Instruct.Q8_0.gguf"
    assert output_path(tmp_path, "tiny", "int4-g64").name == "tiny-int4-g64"


def test_tab_controller_runs_the_report_on_the_job_queue_and_loads_a_row_in_chat(llm_dir, make_ctx):
    from modules.quantize.controller import QuantizeTabError
    ctx = make_ctx(data_dir=llm_dir.parent.parent)
    tab = ctx.quantize
    assert MODEL in tab.source_choices() and "Q4_K_M" in tab.format_choices() and "int8" in tab.format_choices()
    with pytest.raises(QuantizeTabError, match="Tick at least one"):
        tab.start(MODEL, [])
    with pytest.raises(QuantizeTabError, match="not a loadable model"):
        tab.start("missing", ["Q8_0"])
    view = tab.start(MODEL, ["Q4_0", "int4-g32"])
    assert view.running
    with pytest.raises(QuantizeTabError, match="already running"):
        tab.start(MODEL, ["Q8_0"])
    deadline = time.monotonic() + 120
    while tab.view().running and time.monotonic() < deadline:
        time.sleep(0.2)
    done = tab.view()
    assert not done.running and done.message.startswith("Done: 2 format(s)"), done.message
    assert [row[0] for row in done.rows] == ["F32 (reference)", "Q4_0", "int4-g32"]
    assert done.loadable == [MODEL, f"{MODEL}.Q4_0.gguf", f"{MODEL}-int4-g32"]
    assert f"{MODEL}.Q4_0.gguf" in ctx.llm.model_names() and f"{MODEL}-int4-g32" in ctx.llm.model_names()
    message = tab.load_in_chat(f"{MODEL}.Q4_0.gguf")
    assert "llama.cpp" in message and ctx.llm.current_model == f"{MODEL}.Q4_0.gguf"
    with pytest.raises(QuantizeTabError, match="Could not load"):
        tab.load_in_chat("missing")


def test_report_command_prints_the_table_and_fails_cleanly(llm_dir):
    data = llm_dir.parent.parent
    done = subprocess.run([sys.executable, "-m", "modules.quantize", "report", MODEL, "--types", "Q8_0",
                           "--max-new-tokens", "4", "--threads", "1", "--data-dir", str(data)],
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert "| Q8_0 | tiny-llama-gqa.Q8_0.gguf | llama.cpp |" in done.stdout
    bad = subprocess.run([sys.executable, "-m", "modules.quantize", "report", "nope", "--data-dir", str(data)],
                         capture_output=True, text=True, timeout=300)
    assert bad.returncode == 2 and "report: error: no model 'nope'" in bad.stderr and "Traceback" not in bad.stderr


def test_a_gguf_source_is_re_exported_and_measured_against_its_own_weights(llm_dir):
    from modules.quantize.gguf_export import export_model
    source = llm_dir / f"{MODEL}.F32.gguf"
    export_model(llm_dir / MODEL, source, "F32")
    shutil.rmtree(llm_dir / MODEL)                       # only the GGUF is left
    report = run_report(llm_dir, source.name, ["Q8_0", "int8"], threads=1, max_new_tokens=8, extra_buffers=False)
    assert (llm_dir / f"{MODEL}.Q8_0.gguf").is_file() and (llm_dir / f"{MODEL}-int8" / "tokenizer.model").is_file()
    assert "dequantized" in report.reference.note and all(abs(r.ppl_change) < 0.05 for r in report.rows)

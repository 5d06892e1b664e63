"""The line shown under a model dropdown for files that cannot be used."""
from modules.broken_models import REASON_CHARS, summary


def test_summary_names_each_file_once_with_its_reason_and_counts_the_rest():
    entries = [{"name": f"m{i}.safetensors", "error": f"m{i}.safetensors: truncated at byte {i}"} for i in range(7)]
    text = summary(entries + [{"name": "fine", "error": None}], limit=5)
    assert text.startswith("Not usable: m0.safetensors (truncated at byte 0); m1.safetensors (")
    assert "m4.safetensors" in text and "m5.safetensors" not in text and text.endswith("; and 2 more")
    assert "fine" not in text and "m0.safetensors: " not in text  # the name is not repeated inside the reason
    assert summary([]) == "" and summary([{"name": "ok", "error": None}]) == ""
    long = summary([{"name": "x", "error": "y" * 1000}])
    assert len(long) < REASON_CHARS + 40 and long.endswith("…)")

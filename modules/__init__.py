"""Atelier's logic: importable and testable without Gradio (the UI lives in ``modules.ui``)."""

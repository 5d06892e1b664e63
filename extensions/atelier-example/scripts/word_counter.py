"""Atelier's example extension: a "Word counter" tab and one setting.

It shows the three things most extensions need: a tab (``on_ui_tabs``), a setting
(``on_ui_settings``) and a command-line flag (``preload.py``). See docs/extensions.md.
"""
from modules.settings import SettingSpec, SettingsSection
from modules.tabs import TabSpec


def count_words(text: str, ignore_case: bool) -> str:
    """The extension's logic, kept apart from the UI so it is easy to test."""
    words = (text.lower() if ignore_case else text).split()
    if not words:
        return "No words."
    counts: dict[str, int] = {}
    for word in words:
        counts[word] = counts.get(word, 0) + 1
    top = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:5]
    return f"{len(words)} words, {len(counts)} distinct. Most common: " + ", ".join(f"{w} ({n})" for w, n in top)


def settings(ctx):
    return [SettingsSection("example", "Example extension", [
        SettingSpec("example.ignore_case", True, "Word counter: ignore case", bool),
    ])]


def tabs(ctx):
    def build(ctx):
        import gradio as gr
        gr.Markdown(f"{getattr(ctx.opts, 'example_greeting', 'Hello')}! Paste text to count its words.", elem_id="example_greeting")
        text = gr.Textbox(label="Text", lines=4, elem_id="example_text")
        result = gr.Markdown(elem_id="example_result")
        gr.Button("Count", elem_id="example_count").click(
            lambda t: count_words(t, ctx.settings.get("example.ignore_case")), inputs=text, outputs=result)
    return [TabSpec("example", "Word counter", build, order=500)]


def setup(ext):
    ext.on("on_ui_settings", settings)
    ext.on("on_ui_tabs", tabs)

"""Registers the foundation's own tabs and the tabs and settings extensions contribute.

Gradio-free: the ``build`` functions import Gradio only when the UI is assembled.
"""
from __future__ import annotations

from typing import Any

from modules.settings import SettingSpec, SettingsSection, number_range
from modules.tabs import TabSpec, lazy_build

def setting_component(spec: SettingSpec, value: Any) -> tuple[str, dict[str, Any]]:
    """The Gradio component (its class name in ``gradio``) and keyword arguments for one setting, built from
    its spec: a bounded number is a slider over exactly the spec's range and step, so the UI can neither
    offer nor reject a value the API would judge differently."""
    common = {"value": value, "label": spec.label, "info": spec.help or None}
    if spec.type is bool:
        return "Checkbox", common
    if spec.type in (int, float):
        limits = number_range(spec)
        precision = 0 if spec.type is int else None
        if spec.minimum is not None and spec.maximum is not None:
            return "Slider", {**common, **limits, "precision": precision}
        return "Number", {**common, **limits, "precision": precision}
    if spec.choices:
        choices = spec.choices() if callable(spec.choices) else list(spec.choices)
        return "Dropdown", {**common, "choices": choices, "allow_custom_value": False}
    return "Textbox", common



def register_core_tabs(ctx) -> None:
    ctx.tabs.add(TabSpec("settings", "Settings", lazy_build("modules.ui.tabs.settings"), order=900))
    ctx.tabs.add(TabSpec("extensions", "Extensions", lazy_build("modules.ui.tabs.extensions"), order=910))
    ctx.tabs.add(TabSpec("troubleshooting", "Troubleshooting", lazy_build("modules.ui.tabs.troubleshooting"), order=920))


def register_extension_ui(ctx) -> None:
    """Fire ``on_ui_settings`` and ``on_ui_tabs`` and add what the handlers return."""
    for owner, fn in ctx.callbacks.handlers("on_ui_settings"):
        try:
            for section in fn(ctx=ctx) or []:
                if not isinstance(section, SettingsSection):
                    raise TypeError(f"on_ui_settings must return SettingsSection objects, got {type(section).__name__}")
                ctx.settings.add_section(section)
        except Exception as exc:  # noqa: BLE001 - the hook error policy records it; the app goes on
            ctx.callbacks.hook_failed(owner, "on_ui_settings", exc)
    for owner, fn in ctx.callbacks.handlers("on_ui_tabs"):
        try:
            for item in fn(ctx=ctx) or []:
                ctx.tabs.add(_as_tab(item, owner))
        except Exception as exc:  # noqa: BLE001
            ctx.callbacks.hook_failed(owner, "on_ui_tabs", exc)


def _as_tab(item: Any, owner: str) -> TabSpec:
    if isinstance(item, TabSpec):
        item.owner = owner
        return item
    if isinstance(item, (tuple, list)) and len(item) == 3:
        build, label, tab_id = item
        if not callable(build):
            raise TypeError("on_ui_tabs tuples are (build_function, label, id); build_function(ctx) makes the components")
        return TabSpec(id=str(tab_id), label=str(label), build=build, order=500, owner=owner)
    raise TypeError(f"on_ui_tabs must return TabSpec objects or (build, label, id) tuples, got {item!r}")


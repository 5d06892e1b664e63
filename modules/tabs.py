"""Tab registry: each capability and extension adds its tab here; the UI builds them in order.

Kept free of Gradio so capabilities can register without importing it; ``build``
is only called while the UI is being assembled, inside an open ``gr.Tab``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable


@dataclass
class TabSpec:
    id: str
    label: str
    #: called as ``build(ctx)`` inside ``with gr.Tab(label)``; creates the tab's components
    build: Callable[[Any], None]
    order: int = 100
    owner: str = "atelier"


def lazy_build(module: str) -> Callable[[Any], None]:
    """A ``build`` that imports *module* (a UI module with ``build(ctx)``) only when the UI is assembled,
    so registering a tab never imports Gradio."""
    def build(ctx: Any) -> None:
        import importlib
        importlib.import_module(module).build(ctx)
    return build


class TabRegistry:
    def __init__(self) -> None:
        self._tabs: dict[str, TabSpec] = {}

    def add(self, tab: TabSpec) -> None:
        if tab.id in self._tabs:
            raise ValueError(f"tab id {tab.id!r} is already registered by {self._tabs[tab.id].owner}")
        self._tabs[tab.id] = tab

    def remove(self, tab_id: str) -> None:
        self._tabs.pop(tab_id, None)

    def ordered(self) -> list[TabSpec]:
        return sorted(self._tabs.values(), key=lambda t: (t.order, t.label))

    def __contains__(self, tab_id: str) -> bool:
        return tab_id in self._tabs

"""Where capabilities put their HTTP routes. The server mounts them all under one auth policy."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import APIRouter


@dataclass
class VirtualOption:
    """An A1111 option that is not a plain setting (e.g. ``sd_model_checkpoint``): reading it calls *get*,
    writing it through ``POST /sdapi/v1/options`` calls *set*, which raises ValueError for a bad value."""
    get: Callable[[], Any]
    set: Callable[[Any], None]


@dataclass
class ApiRegistry:
    routers: list[tuple[str, APIRouter]] = field(default_factory=list)
    options: dict[str, VirtualOption] = field(default_factory=dict)

    def include(self, router: APIRouter, owner: str = "atelier") -> None:
        self.routers.append((owner, router))

    def add_option(self, name: str, option: VirtualOption) -> None:
        self.options[name] = option

"""Where capabilities put their HTTP routes. The server mounts them all under one auth policy."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from fastapi import APIRouter


@dataclass
class VirtualOption:
    """An A1111 option name served by ``/sdapi/v1/options`` that is not itself a setting key.

    *get* reads it. *validate* checks a value without changing anything and returns the value *set* will be
    given (raising ValueError that says what is valid); *set* applies an already validated value. Keeping the
    two apart lets ``POST /sdapi/v1/options`` check the whole request before it changes anything.
    *setting* names the setting the option stores its value in (``sd.sd_model_checkpoint``): writing that raw
    key goes through this option too, so the alias and the raw key cannot be validated differently.
    ``set=None`` makes the option read-only (A1111's ``sd_checkpoint_hash``): writing it is a 400 unless the
    value equals the current one, which A1111 clients that write back what they read do.
    """
    get: Callable[[], Any]
    set: Callable[[Any], Any] | None = None
    validate: Callable[[Any], Any] | None = None
    setting: str | None = None
    help: str = ""

    @property
    def read_only(self) -> bool:
        return self.set is None

    def check(self, value: Any) -> Any:
        """The value to apply, or ValueError. Read-only: only the current value is accepted (a no-op)."""
        if self.read_only:
            current = self.get()
            if value != current or isinstance(value, bool) != isinstance(current, bool):
                raise ValueError(f"is read-only here (its value is {current!r}){': ' + self.help if self.help else ''}")
            return value
        return self.validate(value) if self.validate is not None else value


@dataclass
class ApiRegistry:
    routers: list[tuple[str, APIRouter]] = field(default_factory=list)
    options: dict[str, VirtualOption] = field(default_factory=dict)

    def include(self, router: APIRouter, owner: str = "atelier") -> None:
        self.routers.append((owner, router))

    def add_option(self, name: str, option: VirtualOption) -> None:
        self.options[name] = option

    def option_for(self, key: str) -> tuple[str, VirtualOption] | None:
        """The option written by *key*: its own name, or the raw setting key an option stores its value in."""
        if key in self.options:
            return key, self.options[key]
        for name, option in self.options.items():
            if option.setting == key:
                return name, option
        return None

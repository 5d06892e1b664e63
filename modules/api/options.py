"""Checking a ``POST /sdapi/v1/options`` request as a whole before anything in it is applied.

Every key resolves to exactly one validator: a virtual option (an A1111 name such as ``sd_model_checkpoint``,
or the raw setting key it stores its value in, such as ``sd.sd_model_checkpoint``) or a setting's spec. The
plan holds the validated values and every problem, by field; the route applies the plan only when it has no
problems, so a request is applied all or nothing.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from modules.settings import SettingTypeError


@dataclass
class OptionsPlan:
    settings: dict[str, Any] = field(default_factory=dict)
    options: list[tuple[str, Any, Any]] = field(default_factory=list)  # (name, VirtualOption, value)
    errors: dict[str, str] = field(default_factory=dict)
    type_errors: bool = False


def plan_options(ctx, request: dict[str, Any]) -> OptionsPlan:
    plan = OptionsPlan()
    known = set(ctx.settings.as_dict())
    for key, value in request.items():
        try:
            found = ctx.api.option_for(key)
            if found is not None:
                name, option = found
                plan.options.append((name, option, option.check(value)))
            elif key in known:
                plan.settings[key] = ctx.settings.spec(key).validate(value)
            else:
                plan.errors[key] = ("unknown option; GET /sdapi/v1/options lists the names Atelier has "
                                    "(A1111 options it has no behaviour for are not accepted)")
        except SettingTypeError as exc:
            plan.errors[key] = str(exc)
            plan.type_errors = True
        except (TypeError, ValueError) as exc:
            plan.errors[key] = str(exc)
            plan.type_errors = plan.type_errors or isinstance(exc, TypeError)
    return plan

"""A route's defaults applied to a request: its system prompt where the conversation has none, its sampling
options where the request set none (the request's own values always win)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from afina.gateway.inference.base import Sampling
from afina.gateway.serving.resolve import Plan


def with_route_system(plan: Plan, messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if plan.system is None or any(message.get("role") == "system" for message in messages):
        return messages
    return [{"role": "system", "content": plan.system}, *messages]


def with_route_options(plan: Plan, sampling: Sampling) -> Sampling:
    defaults = plan.defaults.model_dump(exclude_none=True)
    if "stop" in defaults:
        defaults["stop"] = tuple(defaults["stop"])
    missing = {name: value for name, value in defaults.items() if getattr(sampling, name) in (None, ())}
    return replace(sampling, **missing) if missing else sampling

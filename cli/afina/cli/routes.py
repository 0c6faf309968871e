"""``afina routes``: list, show, write and delete a tenant's routes (``/v1/routes``).

A target on the command line is ``MODEL`` or ``MODEL@WEIGHT``; one of an upstream the operator configured is
``UPSTREAM::MODEL`` (model names hold single colons, so two separate the upstream). A whole route can also
come from a YAML or JSON file in the shape ``PUT /v1/routes/{name}`` takes; the server checks it either way.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from afina.cli.datasets import CliError
from afina.cli.models import _checked, _client

UPSTREAM_SEPARATOR = "::"


def parse_target(text: str) -> dict[str, Any]:
    """``[UPSTREAM::]MODEL[@WEIGHT]`` as a route target."""
    target: dict[str, Any] = {}
    model = text
    if "@" in model:
        model, _, weight = model.rpartition("@")
        try:
            target["weight"] = float(weight)
        except ValueError:
            raise CliError(f"the weight in {text!r} is not a number (write MODEL@0.5)") from None
    if UPSTREAM_SEPARATOR in model:
        target["upstream"], _, model = model.partition(UPSTREAM_SEPARATOR)
    if not model:
        raise CliError(f"{text!r} names no model")
    return {"model": model, **target}


def parse_option(text: str) -> tuple[str, Any]:
    name, separator, value = text.partition("=")
    if not separator or not name:
        raise CliError(f"an option is NAME=VALUE, got {text!r}")
    loaded = yaml.safe_load(value)  # numbers as numbers, lists as lists (stop=["\n"])
    return name, loaded


def route_spec(targets: list[str], fallbacks: list[str], system: str | None, options: list[str],
               timeout_s: float | None, from_file: Path | None) -> dict[str, Any]:
    spec: dict[str, Any] = {}
    if from_file is not None:
        try:
            spec = yaml.safe_load(from_file.read_text(encoding="utf-8")) or {}
        except (OSError, yaml.YAMLError) as exc:
            raise CliError(f"cannot read {from_file}: {exc}") from None
        if not isinstance(spec, dict):
            raise CliError(f"{from_file} does not hold a route (a mapping with 'targets')")
    if targets:
        spec["targets"] = [parse_target(text) for text in targets]
    if fallbacks:
        spec["fallbacks"] = [parse_target(text) for text in fallbacks]
    if system is not None:
        spec["system"] = system
    if options:
        spec["options"] = {**spec.get("options", {}), **dict(parse_option(text) for text in options)}
    if timeout_s is not None:
        spec["timeout_s"] = timeout_s
    if not spec.get("targets"):
        raise CliError("a route needs at least one --target (or a file with targets)")
    return spec


def describe(route: dict[str, Any]) -> str:
    def label(target: dict[str, Any]) -> str:
        upstream = f"{target['upstream']}{UPSTREAM_SEPARATOR}" if target.get("upstream") else ""
        return f"{upstream}{target['model']}@{target.get('weight', 1):g}"

    parts = [f"{route['name']}: " + ", ".join(label(target) for target in route["targets"])]
    if route.get("fallbacks"):
        parts.append("then " + " > ".join(label(target) for target in route["fallbacks"]))
    return "  ".join(parts)


def set_route(base_url: str, api_key: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    with _client(base_url, api_key) as client:
        return _checked(client.put(f"/v1/routes/{name}", json=spec))


def get_route(base_url: str, api_key: str, name: str) -> dict[str, Any]:
    with _client(base_url, api_key) as client:
        return _checked(client.get(f"/v1/routes/{name}"))


def list_routes(base_url: str, api_key: str) -> list[dict[str, Any]]:
    with _client(base_url, api_key) as client:
        return _checked(client.get("/v1/routes"))["data"]


def delete_route(base_url: str, api_key: str, name: str) -> None:
    with _client(base_url, api_key) as client:
        _checked(client.delete(f"/v1/routes/{name}"))

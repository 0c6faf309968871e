"""Route specs as an operator writes them: what is refused (with the field named), the name rules, and the row
the registry stores read back unchanged."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from afina.core.routing import RouteOptions, RouteSpec, RouteTarget, check_route_name

FULL: dict[str, Any] = {
    "targets": [{"model": "ft:llama3.2-1b:acme::ftjob-1", "weight": 3},
                {"model": "gpt-4o-mini", "upstream": "openai", "weight": 1}],
    "fallbacks": [{"model": "llama3.2-1b-instruct"}],
    "system": "Answer in Portuguese.",
    "options": {"temperature": 0.2, "max_tokens": 256, "stop": ["\n\n"], "seed": 7},
    "timeout_s": 12.5,
}


def refusal(data: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        RouteSpec.model_validate(data)
    return str(caught.value)


def test_a_full_spec_is_accepted() -> None:
    spec = RouteSpec.model_validate(FULL)
    assert [target.label for target in spec.targets] == ["ft:llama3.2-1b:acme::ftjob-1", "openai/gpt-4o-mini"]
    assert spec.fallbacks[0].weight == 1.0 and spec.fallbacks[0].upstream is None
    assert spec.options == RouteOptions(temperature=0.2, max_tokens=256, stop=["\n\n"], seed=7)
    assert (spec.system, spec.timeout_s) == ("Answer in Portuguese.", 12.5)


def test_defaults() -> None:
    spec = RouteSpec.model_validate({"targets": [{"model": "m"}]})
    assert (spec.fallbacks, spec.system, spec.timeout_s) == ([], None, None)
    assert spec.options == RouteOptions()


def test_a_route_needs_a_target() -> None:
    assert "targets" in refusal({"targets": []})
    assert "targets" in refusal({"fallbacks": [{"model": "m"}]})


def test_some_target_needs_a_weight() -> None:
    assert "at least one target needs a weight above 0" in refusal(
        {"targets": [{"model": "a", "weight": 0}, {"model": "b", "weight": 0}]})
    # one weight above 0 is enough: a weight-0 target is listed but takes no traffic
    RouteSpec.model_validate({"targets": [{"model": "a", "weight": 0}, {"model": "b"}]})
    assert "weight" in refusal({"targets": [{"model": "a", "weight": -1}]})


def test_a_target_is_listed_once() -> None:
    assert "listed twice" in refusal({"targets": [{"model": "a"}, {"model": "a", "weight": 2}]})
    assert "listed twice" in refusal({"targets": [{"model": "m", "upstream": "openai"},
                                                  {"model": "m", "upstream": "openai"}]})
    # the same model id at an upstream and served here are two targets
    spec = RouteSpec.model_validate({"targets": [{"model": "m"}, {"model": "m", "upstream": "openai"}]})
    assert [target.label for target in spec.targets] == ["m", "openai/m"]


@pytest.mark.parametrize("data, field", [
    ({**FULL, "weights": [1, 2]}, "weights"),
    ({"targets": [{"model": "a", "provider": "x"}]}, "provider"),
    ({"targets": [{"model": "a"}], "options": {"temprature": 0.5}}, "temprature"),
    ({"targets": [{"model": "a"}], "capture": {"enabled": True}}, "capture"),
])
def test_unknown_fields_are_refused(data: dict[str, Any], field: str) -> None:
    """A typo is a 400 naming it, never an option silently not applied."""
    message = refusal(data)
    assert field in message and "Extra inputs are not permitted" in message


@pytest.mark.parametrize("data, field", [
    ({"targets": [{"model": ""}]}, "model"),
    ({"targets": [{"model": "a"}], "timeout_s": 0}, "timeout_s"),
    ({"targets": [{"model": "a"}], "options": {"temperature": 3}}, "temperature"),
    ({"targets": [{"model": "a", "weight": 2_000_000}]}, "weight"),
    ({"targets": [{"model": "a"}], "system": "x" * 32_769}, "system"),
    ({"targets": [{"model": f"m{index}"} for index in range(17)]}, "targets"),
])
def test_bounds_name_the_field(data: dict[str, Any], field: str) -> None:
    assert field in refusal(data)


@pytest.mark.parametrize("name", ["aeon-custom", "a", "support/v2", "team.bot_1:prod", "9lives", "x" * 128])
def test_good_route_names(name: str) -> None:
    assert check_route_name(name) == name


@pytest.mark.parametrize("name", [
    "", "-leading-dash", ".hidden", "/abs", "has space", "x" * 129, "ação",
    "ft:llama3.2-1b:acme::ftjob-1",  # the registry's fine-tune names: an alias never shadows one
    "ft:anything",
    "aeon\n",  # a decoded %0A in PUT /v1/routes/{name} (the path parameter takes every character)
])
def test_bad_route_names(name: str) -> None:
    with pytest.raises(ValueError, match="route name has 1 to 128"):
        check_route_name(name)


def test_row_round_trip() -> None:
    spec = RouteSpec.model_validate(FULL)
    row = spec.to_row()
    assert row["version"] == RouteSpec.SCHEMA_VERSION == 1
    assert row["targets"][1] == {"model": "gpt-4o-mini", "upstream": "openai", "weight": 1.0}
    assert RouteSpec.from_row(row) == spec
    assert RouteSpec.from_row(row).to_row() == row
    # a row is plain JSON (it goes into a JSONB column)
    assert json.loads(json.dumps(row)) == row


def test_a_row_without_a_version_still_reads() -> None:
    assert RouteSpec.from_row({"targets": [{"model": "m"}]}) == RouteSpec(targets=[RouteTarget(model="m")])

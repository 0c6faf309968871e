"""Route specs as an operator writes them: what is refused (with the field named), the name rules, the capture
settings, and the row the registry stores read back unchanged (a version 1 row too)."""

from __future__ import annotations

import json
from typing import Any

import pytest
from pydantic import ValidationError

from afina.core.routing import RouteCapture, RouteOptions, RouteSpec, RouteTarget, check_route_name

FULL: dict[str, Any] = {
    "targets": [{"model": "ft:llama3.2-1b:acme::ftjob-1", "weight": 3},
                {"model": "gpt-4o-mini", "upstream": "openai", "weight": 1}],
    "fallbacks": [{"model": "llama3.2-1b-instruct"}],
    "system": "Answer in Portuguese.",
    "options": {"temperature": 0.2, "max_tokens": 256, "stop": ["\n\n"], "seed": 7},
    "timeout_s": 12.5,
    "capture": {"redact": ["cpf", "email"], "retrain_after": 1000, "training_file": "file-abc",
                "include_feedback": "positive"},
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
    # redaction kinds keep one fixed order, whatever order they were written in
    assert spec.capture == RouteCapture(redact=["email", "cpf"], retrain_after=1000, training_file="file-abc",
                                        include_feedback="positive")
    assert spec.captures


def test_defaults() -> None:
    spec = RouteSpec.model_validate({"targets": [{"model": "m"}]})
    assert (spec.fallbacks, spec.system, spec.timeout_s, spec.capture) == ([], None, None, None)
    assert spec.options == RouteOptions()
    assert not spec.captures


def test_capture_defaults_redact_everything_and_never_retrain() -> None:
    capture = RouteSpec.model_validate({"targets": [{"model": "m"}], "capture": {}}).capture
    assert capture == RouteCapture(enabled=True, redact=["email", "phone", "cpf", "cnpj"], retrain_after=None,
                                   training_file=None, include_feedback="all")
    off = RouteSpec.model_validate({"targets": [{"model": "m"}], "capture": {"enabled": False, "redact": []}})
    assert not off.captures and off.capture is not None and off.capture.redact == []


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
    ({"targets": [{"model": "a"}], "capture": {"enabled": True, "retrain_every": 5}}, "retrain_every"),
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
    ({"targets": [{"model": "a"}], "capture": {"retrain_after": 9}}, "retrain_after"),  # ingest wants 10 examples
    ({"targets": [{"model": "a"}], "capture": {"redact": ["ssn"]}}, "redact"),
    ({"targets": [{"model": "a"}], "capture": {"include_feedback": "negative"}}, "include_feedback"),
    ({"targets": [{"model": "a"}], "capture": {"training_file": ""}}, "training_file"),
    ({"targets": [{"model": "a"}], "capture": {"training_file": "file-\x00"}}, "training_file"),
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
    # the paths under a route: GET /v1/routes/aeon/captures lists aeon's captures, never a route of that name
    "aeon/captures", "aeon/captures/content", "aeon/retrain",
])
def test_bad_route_names(name: str) -> None:
    with pytest.raises(ValueError, match="route name has 1 to 128"):
        check_route_name(name)


def test_row_round_trip() -> None:
    spec = RouteSpec.model_validate(FULL)
    row = spec.to_row()
    assert row["version"] == RouteSpec.SCHEMA_VERSION == 2
    assert row["targets"][1] == {"model": "gpt-4o-mini", "upstream": "openai", "weight": 1.0}
    assert RouteSpec.from_row(row) == spec
    assert RouteSpec.from_row(row).to_row() == row
    # a row is plain JSON (it goes into a JSONB column)
    assert json.loads(json.dumps(row)) == row


def test_a_row_without_a_version_still_reads() -> None:
    assert RouteSpec.from_row({"targets": [{"model": "m"}]}) == RouteSpec(targets=[RouteTarget(model="m")])


def test_a_version_1_row_reads_without_capture() -> None:
    """What a gateway before capture stored: the same fields, version 1, no ``capture`` key."""
    row = {"version": 1, "targets": [{"model": "m", "upstream": None, "weight": 1.0}], "fallbacks": [],
           "system": None, "options": {"temperature": 0.5}, "timeout_s": None}
    spec = RouteSpec.from_row(row)
    assert spec.capture is None and spec.options.temperature == 0.5
    assert spec.to_row()["version"] == 2 and RouteSpec.from_row(spec.to_row()) == spec


def test_a_row_from_a_newer_afina_is_refused_by_its_version() -> None:
    with pytest.raises(ValueError, match="schema version 3; this afina reads versions up to 2"):
        RouteSpec.from_row({"version": 3, "targets": [{"model": "m"}], "shadow": {"model": "x"}})

"""``afina routes set``: targets, fallbacks and options from the command line (the server checks the result)."""

from __future__ import annotations

from pathlib import Path

import pytest

from afina.cli.datasets import CliError
from afina.cli.routes import describe, parse_target, route_spec


def test_targets_with_upstreams_and_weights() -> None:
    assert parse_target("ft:smollm2:acme:aeon:ftjob-1") == {"model": "ft:smollm2:acme:aeon:ftjob-1"}
    assert parse_target("ft:a:b:c:d@0.25") == {"model": "ft:a:b:c:d", "weight": 0.25}
    assert parse_target("groq::llama-3.1-8b-instant@3") == {"model": "llama-3.1-8b-instant", "upstream": "groq",
                                                            "weight": 3.0}
    for bad in ("m@heavy", "groq::", "@1"):
        with pytest.raises(CliError):
            parse_target(bad)


def test_a_route_from_flags_and_from_a_file(tmp_path: Path) -> None:
    spec = route_spec(["groq::llama-3.1-8b-instant"], ["smollm2-135m-instruct"], "Você é o Aeon.",
                      ["temperature=0.2", 'stop=["\\n"]', "max_tokens=64"], 20.0, None)
    assert spec == {"targets": [{"model": "llama-3.1-8b-instant", "upstream": "groq"}],
                    "fallbacks": [{"model": "smollm2-135m-instruct"}], "system": "Você é o Aeon.",
                    "options": {"temperature": 0.2, "stop": ["\n"], "max_tokens": 64}, "timeout_s": 20.0}
    path = tmp_path / "route.yaml"
    path.write_text("targets:\n  - {model: a, weight: 9}\n  - {model: b, weight: 1}\noptions: {top_p: 0.9}\n")
    from_file = route_spec([], [], None, ["temperature=0"], None, path)
    assert from_file["targets"][0] == {"model": "a", "weight": 9} and from_file["options"] == {"top_p": 0.9,
                                                                                              "temperature": 0}
    assert describe({"name": "ab", **from_file}) == "ab: a@9, b@1"
    with pytest.raises(CliError):
        route_spec([], [], "system only", [], None, None)

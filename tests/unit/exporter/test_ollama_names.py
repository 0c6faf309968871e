"""The Ollama name a registered model gets: the tenant's prefix, then the requested name or ``<suffix>-<job id>``,
always a name Ollama's ``ParseName`` accepts, and never one two tenants can share."""

from __future__ import annotations

import pytest

from afina.core.settings import Settings
from afina.exporter.ollama import is_valid_ollama_name, ollama_model_name
from tests.support.ollama_server import parse_ollama_name

JOB = "ftjob-0123456789abcdef01234567"


def test_default_name_is_the_prefix_the_suffix_and_the_job_id() -> None:
    prefix = Settings().ollama_prefix_for("Livraria_Sebo")
    assert ollama_model_name(prefix, None, "Atendimento Sábado!", JOB) == f"livraria_sebo-atendimento-s-bado-{JOB}"
    assert ollama_model_name(prefix, None, None, JOB) == f"livraria_sebo-{JOB}"


def test_requested_name_keeps_its_tag_and_gets_the_prefix() -> None:
    assert ollama_model_name("acme-", "suporte:v2", None, JOB) == "acme-suporte:v2"
    assert ollama_model_name("acme-", "Suporte", "ignored", JOB) == "acme-suporte"


def test_a_namespace_prefix_is_an_ollama_namespace() -> None:
    name = ollama_model_name("acme/", "suporte:v2", None, JOB)
    assert name == "acme/suporte:v2"
    parsed = parse_ollama_name(name)
    assert parsed is not None and (parsed.namespace, parsed.model, parsed.tag) == ("acme", "suporte", "v2")


def test_prefixes_that_need_changing_stay_distinct() -> None:
    # tenant ids may hold any Unicode letter; Ollama takes ASCII only
    first = ollama_model_name("joão-", "bot", None, JOB)
    second = ollama_model_name("joāo-", "bot", None, JOB)
    assert is_valid_ollama_name(first) and is_valid_ollama_name(second)
    assert first != second and first.startswith("jo-o-")


def test_the_default_name_fits_in_ollamas_80_characters() -> None:
    name = ollama_model_name("a-long-tenant-prefix-", None, "x" * 200, JOB)
    assert len(name) <= 80 and name.endswith(JOB) and is_valid_ollama_name(name)


def test_a_requested_name_too_long_with_the_prefix_is_refused() -> None:
    with pytest.raises(ValueError, match="80 characters"):
        ollama_model_name("acme-", "m" * 79, None, JOB)


@pytest.mark.parametrize("name", ["acme-x", "acme-x:latest", "acme/x:v1.2", "a_b.c-d", "_x"])
def test_valid_names_are_valid_in_ollama_too(name: str) -> None:
    assert is_valid_ollama_name(name)
    assert parse_ollama_name(name) is not None


@pytest.mark.parametrize("name", ["", "-x", ".x", "x y", "x:", "x:-t", "ns.dot/x", "a/b/c/d", "Upper"])
def test_invalid_names(name: str) -> None:
    assert not is_valid_ollama_name(name)

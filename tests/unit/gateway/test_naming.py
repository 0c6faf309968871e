from __future__ import annotations

from afina.core.naming import checkpoint_model_name, fine_tuned_model_name


def test_fine_tuned_model_name_follows_openai() -> None:
    assert fine_tuned_model_name("smollm2-135m-instruct", "acme", "bot", "ftjob-1") == \
        "ft:smollm2-135m-instruct:acme:bot:ftjob-1"


def test_missing_suffix_leaves_its_field_empty() -> None:
    assert fine_tuned_model_name("base", "acme", None, "ftjob-1") == "ft:base:acme::ftjob-1"
    assert fine_tuned_model_name("base", "acme", "", "ftjob-1") == "ft:base:acme::ftjob-1"


def test_checkpoint_name() -> None:
    assert checkpoint_model_name("ft:base:acme::ftjob-1", 88) == "ft:base:acme::ftjob-1:ckpt-step-88"

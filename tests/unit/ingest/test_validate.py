"""Example rules: the OpenAI cookbook's error classes plus roles and alternation, each named with its field."""

from __future__ import annotations

from typing import Any

import pytest

from afina.ingest.records import Example
from afina.ingest.validate import check_example


def chat(*messages: dict[str, Any], split: str | None = None) -> Example:
    return Example("conversas.jsonl", 7, messages=list(messages), split=split)


def user(content: str = "Qual é o prazo de entrega para Recife?") -> dict[str, Any]:
    return {"role": "user", "content": content}


def assistant(content: str = "O prazo para Recife é de 5 dias úteis.", **extra: Any) -> dict[str, Any]:
    return {"role": "assistant", "content": content, **extra}


def found(example: Example) -> list[tuple[str, str]]:
    return [(issue.rule, issue.field) for issue in check_example(example)]


def test_a_valid_conversation_has_no_problem() -> None:
    example = chat({"role": "system", "content": "Você é o atendente da Loja Aurora."}, user(),
                   assistant(weight=1), user("E para Manaus?"), assistant("Para Manaus, 9 dias úteis.", weight=0),
                   split="treino")
    assert check_example(example) == []


def test_a_text_example_needs_text() -> None:
    assert check_example(Example("livro.txt", 1, text="Era uma vez um modelo pequeno.")) == []
    assert found(Example("livro.txt", 2, text="   ")) == [("empty_text", "text")]
    assert found(Example("livro.txt", 3, text=42)) == [("data_type", "text")]  # type: ignore[arg-type]
    assert found(Example("livro.txt", 4)) == [("missing_messages_list", "messages")]


@pytest.mark.parametrize(("messages", "rule", "field"), [
    ([], "missing_messages_list", "messages"),
    ("oi", "missing_messages_list", "messages"),
    (["user: oi", assistant()], "data_type", "messages[0]"),
    ([{"role": "user"}, assistant()], "message_missing_key", "messages[0]"),
    ([{**user(), "humor": "bravo"}, assistant()], "message_unrecognized_key", "messages[0].humor"),
    ([user(), assistant(function_call={"name": "frete"})], "message_unrecognized_key", "messages[1].function_call"),
    ([{"role": "humano", "content": "oi"}, assistant()], "unrecognized_role", "messages[0].role"),
    ([{"role": ["user"], "content": "oi"}, assistant()], "unrecognized_role", "messages[0].role"),
    ([user("   "), assistant()], "missing_content", "messages[0].content"),
    ([user(), assistant("")], "missing_content", "messages[1].content"),
    ([user(), assistant(["parte"])], "data_type", "messages[1].content"),
    ([user()], "example_missing_assistant_message", "messages"),
    ([user(), assistant(weight=2)], "invalid_weight", "messages[1].weight"),
    ([user(), assistant(weight=True)], "invalid_weight", "messages[1].weight"),
    ([{**user(), "weight": 0}, assistant()], "invalid_weight", "messages[0].weight"),
    ([user(), {"role": "system", "content": "Seja breve."}, assistant()], "system_not_first", "messages[1].role"),
    ([assistant("Olá! Como posso ajudar?"), user(), assistant()], "first_turn_not_user", "messages[0].role"),
    ([user(), user("Alô?"), assistant()], "consecutive_same_role", "messages[1].role"),
    ([user(), assistant(), assistant("Mais alguma dúvida?")], "consecutive_same_role", "messages[2].role"),
    ([user(), {"role": "tool", "content": "{\"dias\": 5}"}, assistant()], "tool_without_call", "messages[1].role"),
])
def test_each_rule_is_reported_with_its_field(messages: Any, rule: str, field: str) -> None:
    issues = check_example(Example("conversas.jsonl", 7, messages=messages))
    assert (rule, field) in [(issue.rule, issue.field) for issue in issues]
    assert all(issue.action == "error" and issue.line == 7 and issue.source == "conversas.jsonl"
               for issue in issues)


def test_tool_results_may_follow_the_assistant_turn_that_called_them() -> None:
    assert check_example(chat(user(), assistant("Vou consultar o frete."), {"role": "tool", "content": "5 dias"},
                              {"role": "tool", "content": "R$ 20"}, assistant())) == []


def test_unknown_split_names_are_errors_and_portuguese_names_are_accepted() -> None:
    assert found(chat(user(), assistant(), split="treinamento")) == [("unknown_split", "split")]
    for name in ("treino", "Validação", "teste", "validation"):
        assert check_example(chat(user(), assistant(), split=name)) == []


def test_every_problem_of_a_row_is_reported_not_only_the_first() -> None:
    rules = [rule for rule, _ in found(chat({"role": "humano", "content": ""}, user(), user()))]
    assert {"unrecognized_role", "missing_content", "consecutive_same_role",
            "example_missing_assistant_message"} <= set(rules)

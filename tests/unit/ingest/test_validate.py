"""OpenAI chat-format rules, one per error class of the fine-tuning cookbook."""

from __future__ import annotations

import pytest

from afina.ingest.split import is_validation, record_digest
from afina.ingest.validate import check_example, normalize_example, parse_line


def rules(example: dict) -> list[str]:
    return [problem.rule for problem in check_example(example, line=7)]


def test_a_valid_example_has_no_problem() -> None:
    assert rules({"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "oi"},
                               {"role": "assistant", "content": "Beleza!", "weight": 1}]}) == []


@pytest.mark.parametrize(("example", "rule"), [
    ({"prompt": "x"}, "missing_messages_list"),
    ({"messages": []}, "missing_messages_list"),
    ({"messages": "hi"}, "missing_messages_list"),
    ({"messages": [{"role": "user"}, {"role": "assistant", "content": "a"}]}, "message_missing_key"),
    ({"messages": [{"role": "user", "content": "q", "mood": "x"}, {"role": "assistant", "content": "a"}]},
     "message_unrecognized_key"),
    ({"messages": [{"role": "human", "content": "q"}, {"role": "assistant", "content": "a"}]}, "unrecognized_role"),
    ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": "a"}]}, "missing_content"),
    ({"messages": [{"role": "user", "content": "q"}]}, "example_missing_assistant_message"),
    ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a", "weight": 2}]},
     "invalid_weight"),
    ({"messages": ["user: hi"]}, "data_type"),
])
def test_each_rule_is_reported_with_its_name(example: dict, rule: str) -> None:
    problems = check_example(example, line=7)
    assert rule in [p.rule for p in problems]
    assert all(p.line == 7 for p in problems)


def test_parse_line_names_invalid_json_and_non_objects() -> None:
    value, problem = parse_line(b'{"messages": [', 3)
    assert value is None and problem.rule == "invalid_json" and problem.line == 3
    value, problem = parse_line(b"[1, 2]", 4)
    assert problem.rule == "data_type" and "list" in problem.message
    value, problem = parse_line(b'\xef\xbb\xbf{"messages": []}', 1)
    assert problem is None and value == {"messages": []}


def test_normalize_keeps_training_keys_and_composes_unicode() -> None:
    decomposed = "voce\u0302"  # "ê" as e + combining circumflex
    example = {"messages": [{"role": "user", "content": f"{decomposed}\r\nok"},
                            {"role": "assistant", "content": "a", "weight": 0}]}
    normalized = normalize_example(example)
    assert normalized["messages"][0]["content"] == "você\nok"
    assert normalized["messages"][1] == {"role": "assistant", "content": "a", "weight": 0}


def test_split_is_deterministic_and_stable_when_rows_are_appended() -> None:
    records = [{"messages": [{"role": "user", "content": f"q{i}"}, {"role": "assistant", "content": "a"}]}
               for i in range(500)]
    first = {record_digest(r): is_validation(record_digest(r), 0.1) for r in records}
    again = {record_digest(r): is_validation(record_digest(r), 0.1) for r in records[:300]}
    assert all(first[d] == again[d] for d in again)
    share = sum(first.values()) / len(first)
    assert 0.05 < share < 0.15

"""OpenAI chat-format training data rules (the fine-tuning cookbook's error classes).

Each problem is reported with the 1-based line of the uploaded file, the rule it
broke and the field, so a person can fix the file without guessing.
"""

from __future__ import annotations

import unicodedata
from dataclasses import dataclass
from typing import Any

import orjson

ALLOWED_MESSAGE_KEYS = frozenset({"role", "content", "name", "function_call", "weight"})
ALLOWED_ROLES = frozenset({"system", "user", "assistant", "function", "tool"})
MIN_EXAMPLES = 10


@dataclass(frozen=True)
class RowProblem:
    line: int
    rule: str
    field: str
    message: str

    def describe(self) -> str:
        return f"line {self.line}: {self.message} [{self.rule}] (field {self.field})"


def parse_line(raw: bytes, line: int) -> tuple[dict[str, Any] | None, RowProblem | None]:
    if line == 1 and raw.startswith(b"\xef\xbb\xbf"):
        raw = raw[3:]
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return None, RowProblem(line, "invalid_json", "line", f"not valid JSON: {exc}")
    if not isinstance(value, dict):
        return None, RowProblem(line, "data_type", "line", f"expected a JSON object, got {type(value).__name__}")
    return value, None


def check_example(example: dict[str, Any], line: int) -> list[RowProblem]:
    """Every rule broken by one example (empty when it is valid)."""
    messages = example.get("messages")
    if not isinstance(messages, list) or not messages:
        return [RowProblem(line, "missing_messages_list", "messages", "'messages' must be a non-empty list")]
    problems: list[RowProblem] = []
    has_assistant = False
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            problems.append(RowProblem(line, "data_type", where, "each message must be an object"))
            continue
        if "role" not in message or "content" not in message:
            problems.append(RowProblem(line, "message_missing_key", where, "message needs 'role' and 'content'"))
        unknown = sorted(set(message) - ALLOWED_MESSAGE_KEYS)
        if unknown:
            problems.append(RowProblem(line, "message_unrecognized_key", f"{where}.{unknown[0]}",
                                       f"unrecognized key(s) {unknown}; allowed: {sorted(ALLOWED_MESSAGE_KEYS)}"))
        role = message.get("role")
        if "role" in message and role not in ALLOWED_ROLES:
            problems.append(RowProblem(line, "unrecognized_role", f"{where}.role",
                                       f"role {role!r} is not one of {sorted(ALLOWED_ROLES)}"))
        content = message.get("content")
        if "content" in message and (not isinstance(content, str) or not content.strip()):
            if not (role == "assistant" and message.get("function_call")):
                problems.append(RowProblem(line, "missing_content", f"{where}.content",
                                           "content must be a non-empty string"))
        if "weight" in message and message.get("weight") not in (0, 1):
            problems.append(RowProblem(line, "invalid_weight", f"{where}.weight", "weight must be 0 or 1"))
        if role == "assistant":
            has_assistant = True
    if not has_assistant:
        problems.append(RowProblem(line, "example_missing_assistant_message", "messages",
                                   "the example has no assistant message to learn from"))
    return problems


def normalize_example(example: dict[str, Any]) -> dict[str, Any]:
    """Unicode NFC, CRLF to LF, and only the keys training uses."""
    messages = []
    for message in example["messages"]:
        clean: dict[str, Any] = {"role": message["role"],
                                 "content": unicodedata.normalize("NFC", message["content"]).replace("\r\n", "\n")}
        if "name" in message:
            clean["name"] = message["name"]
        if "weight" in message:
            clean["weight"] = message["weight"]
        messages.append(clean)
    return {"messages": messages}

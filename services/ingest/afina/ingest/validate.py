"""Rules every training example must follow, each reported with its file, line and field.

The OpenAI fine-tuning cookbook's error classes (missing messages, unrecognized keys and roles,
missing content, invalid weight, no assistant message) plus the conversation's shape:

- a ``system`` message may only come first;
- after it, the conversation starts with ``user`` and user/assistant turns alternate
  (``tool``/``function`` results may follow an assistant turn, and each other);
- two consecutive turns of the same role are an error, not silently merged: a doubled user
  turn usually means a reply went missing (a converter bug or a cut log), and merging would
  teach the model to answer two questions as if they were one. Converters that know the
  turns belong together (chat transcripts' continuation lines) merge them themselves;
- every message has non-empty string content (the last assistant turn is what the example teaches).

``check_example`` returns errors only (``action="error"``): strict mode fails the file on the
first, lenient mode drops the row and reports why. Token-level rules (length, nothing to train
on after masking, EOS) live in ``afina.ingest.tokens``.
"""

from __future__ import annotations

from typing import Any

from afina.core.datasets.options import SPLIT_ALIASES
from afina.ingest.records import Example, RowIssue

# ``function_call``/``tool_calls`` are not accepted: the catalog's chat templates render only
# ``content``, so a tool call would silently train as an empty reply.
ALLOWED_MESSAGE_KEYS = frozenset({"role", "content", "name", "weight"})
ALLOWED_ROLES = frozenset({"system", "user", "assistant", "function", "tool"})
TOOL_ROLES = frozenset({"function", "tool"})


def check_example(example: Example) -> list[RowIssue]:
    """Every rule ``example`` breaks, as ``error`` issues naming the field (empty when it is valid)."""
    errors: list[tuple[str, str, str]] = []  # (field, rule, detail)
    if example.split is not None and _split_name(example.split) is None:
        errors.append(("split", "unknown_split", f"split {example.split!r} is not one of "
                                                 "train/treino, validation/validacao, test/teste"))
    if example.messages is not None:
        errors.extend(_check_messages(example.messages))
    elif example.text is not None:
        if not isinstance(example.text, str):
            errors.append(("text", "data_type", f"'text' must be a string, got {type(example.text).__name__}"))
        elif not example.text.strip():
            errors.append(("text", "empty_text", "'text' is empty"))
    else:
        errors.append(("messages", "missing_messages_list", "the example has neither 'messages' nor 'text'"))
    return [RowIssue(example.source, example.line, field, rule, "error", detail) for field, rule, detail in errors]


def _split_name(value: Any) -> str | None:
    return SPLIT_ALIASES.get(value.strip().lower()) if isinstance(value, str) else None


def _check_messages(messages: Any) -> list[tuple[str, str, str]]:
    if not isinstance(messages, list) or not messages:
        return [("messages", "missing_messages_list", "'messages' must be a non-empty list")]
    errors: list[tuple[str, str, str]] = []
    roles: list[tuple[int, str]] = []  # (index, role) of well-formed messages, for the shape rules
    for index, message in enumerate(messages):
        where = f"messages[{index}]"
        if not isinstance(message, dict):
            errors.append((where, "data_type", f"each message must be an object, got {type(message).__name__}"))
            continue
        errors.extend(_check_message(message, where))
        role = message.get("role")
        if isinstance(role, str) and role in ALLOWED_ROLES:
            roles.append((index, role))
    errors.extend(_check_shape(roles))
    return errors


def _check_message(message: dict[str, Any], where: str) -> list[tuple[str, str, str]]:
    errors: list[tuple[str, str, str]] = []
    if "role" not in message or "content" not in message:
        missing = [key for key in ("role", "content") if key not in message]
        errors.append((where, "message_missing_key", f"message needs 'role' and 'content'; missing {missing}"))
    unknown = sorted(set(message) - ALLOWED_MESSAGE_KEYS)
    if unknown:
        errors.append((f"{where}.{unknown[0]}", "message_unrecognized_key",
                       f"unrecognized key(s) {unknown}; allowed: {sorted(ALLOWED_MESSAGE_KEYS)}"
                       + ("; tool calls are not supported: afina's chat templates train on 'content' only"
                          if {"function_call", "tool_calls"} & set(unknown) else "")))
    role = message.get("role")
    if "role" in message and not (isinstance(role, str) and role in ALLOWED_ROLES):
        errors.append((f"{where}.role", "unrecognized_role", f"role {role!r} is not one of {sorted(ALLOWED_ROLES)}"))
    if "content" in message:
        content = message["content"]
        if not isinstance(content, str):
            errors.append((f"{where}.content", "data_type",
                           f"content must be a string, got {type(content).__name__}"))
        elif not content.strip():
            errors.append((f"{where}.content", "missing_content", "content is empty"))
    if "weight" in message:
        weight = message["weight"]
        if isinstance(weight, bool) or weight not in (0, 1):
            errors.append((f"{where}.weight", "invalid_weight", f"weight must be 0 or 1, got {weight!r}"))
        elif role != "assistant":
            errors.append((f"{where}.weight", "invalid_weight", "only assistant messages carry a weight"))
    return errors


def _check_shape(roles: list[tuple[int, str]]) -> list[tuple[str, str, str]]:
    errors: list[tuple[str, str, str]] = []
    turns = [(index, role) for index, role in roles if role != "system"]
    for position, (index, role) in enumerate(roles):
        if role == "system" and position > 0:
            errors.append((f"messages[{index}].role", "system_not_first",
                           "a system message may only be the first message"))
    if turns and turns[0][1] != "user":
        index, role = turns[0]
        errors.append((f"messages[{index}].role", "first_turn_not_user",
                       f"the conversation must start with a user turn (after an optional system message), "
                       f"not {role!r}"))
    for (_, previous), (index, role) in zip(turns, turns[1:], strict=False):
        if role == previous and role in ("user", "assistant"):
            errors.append((f"messages[{index}].role", "consecutive_same_role",
                           f"two {role} turns in a row; user and assistant turns must alternate "
                           f"(was a reply lost, or should the two be one message?)"))
        elif role in TOOL_ROLES and previous not in TOOL_ROLES and previous != "assistant":
            errors.append((f"messages[{index}].role", "tool_without_call",
                           f"a {role} message must follow the assistant turn that called it"))
    if not any(role == "assistant" for _, role in roles):
        errors.append(("messages", "example_missing_assistant_message",
                       "the example has no assistant message to learn from"))
    return errors
